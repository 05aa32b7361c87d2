import json
import os
import stat

import pytest

from looplm_mega.outputs import (MARKER, OutputError, check_inputs, check_output_dir, check_output_prefix,
                                 staged_output_dir)

KIND = "model directory"


def _write(output, files: dict, kind=KIND, overwrite=False, inputs=()):
    with staged_output_dir(output, kind, inputs, overwrite) as staging:
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
    return output


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_a_new_output_is_assembled_aside_then_renamed_with_its_marker(tmp_path):
    out = _write(tmp_path / "a" / "b" / "out", {"x.txt": "1", "sub/y.txt": "2"})  # missing parents are created
    assert _listing(out) == [MARKER, "sub", "x.txt"]
    assert json.loads((out / MARKER).read_text()) == {"kind": KIND, "entries": ["sub", "sub/y.txt", "x.txt"]}
    assert _listing(out.parent) == ["out"]  # no temporary directory left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not private like mkdtemp's


def test_a_failing_block_leaves_nothing_and_keeps_the_old_output(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_output_dir(tmp_path / "out", KIND) as staging:
            (staging / "x.txt").write_text("partial")
            raise RuntimeError("interrupted")
    assert _listing(tmp_path) == []
    _write(tmp_path / "out", {"x.txt": "old"})
    with pytest.raises(KeyboardInterrupt):
        with staged_output_dir(tmp_path / "out", KIND, overwrite=True) as staging:
            (staging / "x.txt").write_text("new")
            raise KeyboardInterrupt()
    assert _listing(tmp_path) == ["out"] and (tmp_path / "out" / "x.txt").read_text() == "old"


def test_overwrite_replaces_only_an_output_of_the_same_kind_holding_nothing_else(tmp_path):
    out = _write(tmp_path / "out", {"x.txt": "old", "old_only.txt": "gone after"})
    with pytest.raises(OutputError, match="exists \\(a model directory written earlier\\); pass --overwrite"):
        _write(out, {"x.txt": "new"})
    with pytest.raises(OutputError, match="holds a model directory, not a released-format directory"):
        _write(out, {"x.txt": "new"}, kind="released-format directory", overwrite=True)
    _write(out, {"x.txt": "new"}, overwrite=True)
    assert _listing(out) == [MARKER, "x.txt"] and (out / "x.txt").read_text() == "new"
    assert _listing(tmp_path) == ["out"]
    (out / "notes.md").write_text("a user's file")
    with pytest.raises(OutputError, match="holds notes.md, which was not written with it"):
        _write(out, {"x.txt": "newer"}, overwrite=True)
    assert (out / "notes.md").exists() and (out / "x.txt").read_text() == "new"


def test_what_this_project_did_not_write_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="exists and was not written by looplm-mega"):
        _write(tmp_path / "mine", {"x.txt": "1"}, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file", KIND, overwrite=True)
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    with pytest.raises(OutputError, match="is a symbolic link"):
        check_output_dir(tmp_path / "link", KIND, overwrite=True)
    assert _listing(tmp_path / "mine") == ["thesis.tex"]
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty", {"x.txt": "1"})  # an empty directory is free to use
    assert _listing(tmp_path / "empty") == [MARKER, "x.txt"]


def test_a_parent_that_cannot_be_created_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot create its folder, .*file is not a directory"):
        check_output_dir(tmp_path / "file" / "sub" / "out", KIND)
    with pytest.raises(OutputError, match="cannot create its folder"):
        check_output_prefix(tmp_path / "file" / "tokens")
    check_output_dir(tmp_path / "new" / "sub" / "out", KIND)  # missing parents are fine: created on writing
    assert _listing(tmp_path) == ["file"]


@pytest.mark.parametrize("output, message", [
    ("in", "is also an input"),
    ("in/sub", "lies inside the input"),
    (".", "contains the input"),
])
def test_an_output_may_not_be_contain_or_lie_inside_an_input(tmp_path, output, message):
    (tmp_path / "in").mkdir()
    with pytest.raises(OutputError, match=message):
        check_inputs(tmp_path / output, [tmp_path / "in"])
    (tmp_path / "link").symlink_to(tmp_path / "in")
    with pytest.raises(OutputError, match="is also an input"):  # compared resolved
        check_inputs(tmp_path / "link", [tmp_path / "in"])


def test_a_dataset_prefix_is_replaced_only_with_overwrite_and_only_if_it_is_a_dataset(tmp_path):
    check_output_prefix(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(b"MMIDIDX\x00\x00" + bytes(25))
    (tmp_path / "d.bin").write_bytes(b"")
    with pytest.raises(OutputError, match="d.bin: exists; pass --overwrite"):
        check_output_prefix(tmp_path / "d")
    check_output_prefix(tmp_path / "d", overwrite=True)
    (tmp_path / "e.bin").write_bytes(b"something else")
    with pytest.raises(OutputError, match="e.bin: exists and e.idx is not an indexed dataset's index"):
        check_output_prefix(tmp_path / "e", overwrite=True)
    with pytest.raises(OutputError, match="is also an input"):
        check_output_prefix(tmp_path / "d", [tmp_path / "d.bin", tmp_path / "d.idx"], overwrite=True)
    (tmp_path / "corpus").mkdir()
    with pytest.raises(OutputError, match="lies inside the input"):
        check_output_prefix(tmp_path / "corpus" / "tokens", [tmp_path / "corpus"])
