"""The recipes are shell scripts for a cluster; here we check what can drift without one: syntax,
the files they name, and that every flag they give a tool is one the tool takes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "examples" / "recipes").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_recipe_is_valid_bash(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_recipes_call_tools_with_flags_they_take_and_name_files_that_exist():
    text = "\n".join(s.read_text().replace("\\\n", " ") for s in SCRIPTS)
    calls = re.findall(r"python ((?:tools|examples/recipes)/\w+\.py)([^\n\"]*)", text)
    assert {tool for tool, _ in calls} >= {"examples/recipes/ouro_data.py", "tools/convert_checkpoint.py",
                                           "tools/upcycle.py", "tools/eval_loops.py"}
    helps = {}
    for tool, args in calls:
        if tool not in helps:
            helps[tool] = subprocess.run([sys.executable, str(ROOT / tool), "--help"], capture_output=True, text=True).stdout
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", args):
            assert flag in helps[tool], f"{tool} has no {flag}"
    for path in set(re.findall(r"(?:configs|examples)/[\w/.]+\.(?:yaml|sbatch)", text)):
        assert (ROOT / path).exists(), path
