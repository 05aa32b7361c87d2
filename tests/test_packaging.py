"""setup.py declares every third-party import of the package, its tools and examples;
constraints.txt pins every distribution setup.py names (so a fresh install gets what CI tested);
a plain install carries every file the package reads."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import names whose distribution is not installed here (GPU-only extras), by the name setup.py uses.
NOT_INSTALLED_HERE = {"flash_attn": "flash-attn", "streaming": "mosaicml-streaming"}


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, set[str]]:
    """{"install": {...}, extra: {...}}: canonical distribution names from setup.py's literals."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    groups = {"install": {_canonical(_requirement_name(r)) for r in keywords["install_requires"]}}
    for extra, requirements in keywords["extras_require"].items():
        groups[extra] = {_canonical(_requirement_name(r)) for r in requirements}
    return groups


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the files importing it, over looplm_mega, tools and examples."""
    found: dict[str, set[str]] = {}
    local = {"looplm_mega", "tools", "tests"}
    for folder in ("looplm_mega", "tools", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_import_is_declared_in_setup_py():
    distributions = importlib.metadata.packages_distributions()
    everything = set().union(*declared().values())
    undeclared = {}
    for module, files in third_party_imports().items():
        names = {_canonical(d) for d in distributions.get(module, [])} or {NOT_INSTALLED_HERE.get(module, module)}
        if not names & everything:
            undeclared[module] = sorted(files)
    assert not undeclared, f"imported but not declared in setup.py (install_requires or an extra): {undeclared}"


def test_the_lock_pins_every_declared_distribution():
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pinned[_canonical(name)] = version
    groups = declared()
    # The GPU extra builds against CUDA and is not installable on the CPU machines that make the lock;
    # the recipes' mosaicml-streaming lives in an environment of its own.
    wanted = set().union(*(names for extra, names in groups.items() if extra not in ("gpu", "recipes")))
    assert not wanted - set(pinned), f"declared in setup.py but not pinned in constraints.txt: {sorted(wanted - set(pinned))}"
    assert "+" not in pinned["torch"], "torch is pinned with a local build label: the lock must admit CPU and CUDA builds"


def test_a_plain_install_carries_the_model_presets_and_task_files(tmp_path):
    """`pip install .` (not editable) in a fresh environment: the package finds its presets and the
    local evaluation tasks from wherever it is installed."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "looplm_mega", source / "looplm_mega", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # The dependencies come from the environment running the tests, as a plain path: its .pth files
    # (an editable install of this project among them) are not read.
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([python, "-m", "pip", "install", "--no-deps", str(source)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    shutil.rmtree(source)  # nothing may be read from the source tree any more
    code = ("import looplm_mega, pathlib\n"
            "from looplm_mega.model import LoopLMConfig\n"
            "from looplm_mega.model.config import PRESET_DIR\n"
            "print(looplm_mega.__file__)\n"
            "print(sorted(p.stem for p in PRESET_DIR.glob('*.yaml')))\n"
            "print(LoopLMConfig.from_preset('ouro_1_4b').num_hidden_layers)\n"
            "tasks = pathlib.Path(looplm_mega.__file__).parent / 'eval' / 'tasks' / 'looplm_local'\n"
            "print(sorted(p.name for p in tasks.glob('*.jsonl')))\n")
    done = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    where, presets, layers, tasks = done.stdout.splitlines()[-4:]
    assert where.startswith(str(venv)), where
    assert presets == str(["medium", "ouro_1_4b", "ouro_2_6b", "small", "tiny"]) and layers == "24"
    assert tasks == str(["choice.jsonl", "generation.jsonl", "perplexity.jsonl"])
