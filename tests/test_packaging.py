"""setup.py declares every third-party import of the package, its tools and examples, and
constraints.txt pins every distribution setup.py names (so a fresh install gets what CI tested)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import names whose distribution is not installed here (GPU-only extras), by the name setup.py uses.
NOT_INSTALLED_HERE = {"flash_attn": "flash-attn"}


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
    # The GPU extra builds against CUDA and is not installable on the CPU machines that make the lock.
    wanted = set().union(*(names for extra, names in groups.items() if extra != "gpu"))
    assert not wanted - set(pinned), f"declared in setup.py but not pinned in constraints.txt: {sorted(wanted - set(pinned))}"
    assert "+" not in pinned["torch"], "torch is pinned with a local build label: the lock must admit CPU and CUDA builds"
