from pathlib import Path

import pytest

from tools import gpu_wheels

ROOT = Path(__file__).resolve().parents[2]


def test_every_wheel_is_pinned_by_constraints_txt():
    lines = set((ROOT / "constraints.txt").read_text().splitlines())
    requirements = gpu_wheels.pinned(gpu_wheels.BUILT + gpu_wheels.DOWNLOADED)
    assert len(requirements) == len(gpu_wheels.BUILT + gpu_wheels.DOWNLOADED) and set(requirements) <= lines
    assert gpu_wheels.pinned(["Pydantic_Core"]) == gpu_wheels.pinned(["pydantic-core"])  # names compared normalised
    with pytest.raises(ValueError, match="pins no version of no-such-package"):
        gpu_wheels.pinned(["no-such-package"])


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
        gpu_wheels.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and "gpu_wheels.py: error:" in err[0] and expected in err[0]
    assert case != "foreign folder" or (out / "mine.whl").read_text() == "x"
