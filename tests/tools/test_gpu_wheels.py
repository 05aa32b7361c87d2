import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "tools/gpu_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_wheel_is_pinned_by_constraints_txt():
    tool = _tool()
    lines = set((ROOT / "constraints.txt").read_text().splitlines())
    requirements = tool.pinned(tool.BUILT + tool.DOWNLOADED)
    assert len(requirements) == len(tool.BUILT + tool.DOWNLOADED) and set(requirements) <= lines
    assert tool.pinned(["Pydantic_Core"]) == tool.pinned(["pydantic-core"])  # names compared normalised
    with pytest.raises(ValueError, match="pins no version of no-such-package"):
        tool.pinned(["no-such-package"])


@pytest.mark.parametrize("case", ["not a wheel", "foreign folder"])
def test_refusals_come_before_any_download(case, tmp_path, capsys):
    out = tmp_path / "wheels"
    args = ["--output", str(out)]
    if case == "not a wheel":
        (tmp_path / "notes.txt").write_text("x")
        args += ["--add", str(tmp_path / "notes.txt")]
        expected = "notes.txt: not a wheel file"
    else:
        out.mkdir()
        (out / "mine.whl").write_text("x")
        expected = "not written by looplm-mega"
    with pytest.raises(SystemExit) as stopped:
        _tool().main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and "gpu_wheels.py: error:" in err[0] and expected in err[0]
    assert case != "foreign folder" or (out / "mine.whl").read_text() == "x"
