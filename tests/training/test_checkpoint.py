"""Checkpoints without a trainer: an engine that writes one file, in one process. What a save
leaves, which checkpoints pruning keeps, and what resume says about damaged ones."""

import errno
import json
import mmap
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from looplm_mega.training import checkpoint
from looplm_mega.training.checkpoint import (LATEST, MANIFEST, CheckpointError, TrainerState, complete_checkpoints,
                                             load_checkpoint, resume_tag, save_checkpoint)
from looplm_mega.training.engine import Layout


class FileEngine:
    """Writes one file of `size` bytes per save."""

    def __init__(self, size: int = 1000, fail: bool = False):
        self.size, self.fail, self.loaded = size, fail, None

    def save(self, checkpoint_dir: Path, tag: str) -> list[Path]:
        path = Path(checkpoint_dir) / tag / "engine.pt"
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        torch.save({"weights": torch.arange(self.size // 8, dtype=torch.float64)}, path)
        return [path]

    def load(self, checkpoint_dir: Path, tag: str) -> None:
        self.loaded = torch.load(Path(checkpoint_dir) / tag / "engine.pt")

    def layout(self) -> Layout:
        return Layout(1, 1, 1, 0)


def _save(directory: Path, step: int, keep_last: int = 3, engine=None) -> Path:
    return save_checkpoint(engine or FileEngine(), directory, TrainerState(step=step), {}, keep_last, {})


def test_a_save_writes_a_manifest_last_and_moves_latest(tmp_path):
    path = _save(tmp_path, 10)
    manifest = json.loads((path / MANIFEST).read_text())
    assert {f["name"] for f in manifest["files"]} == {"engine.pt", "rng_rank00000.pt", "trainer_state.json"}
    assert all(f["size"] == (path / f["name"]).stat().st_size for f in manifest["files"])
    assert manifest["layout"] == {"dp": 1, "tp": 1, "pp": 1, "zero_stage": 0, "sequence_parallel": False, "sub_group_size": None}
    assert (tmp_path / LATEST).read_text() == "step00000010" and resume_tag(tmp_path, "latest") == "step00000010"


def test_pruning_counts_complete_checkpoints_and_never_removes_latest(tmp_path, capsys):
    for step in (10, 20, 30):
        _save(tmp_path, step, keep_last=2)
    assert complete_checkpoints(tmp_path) == ["step00000020", "step00000030"]
    # A save of step 40 killed before its manifest, then a run resumed at 20 that ends at 25 with
    # keep_last 1: the half-written directory goes, the new checkpoint stays.
    (tmp_path / "step00000040").mkdir()
    (tmp_path / "step00000040" / "engine.pt").write_bytes(b"half")
    (tmp_path / LATEST).write_text("step00000020")
    _save(tmp_path, 25, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step00000025", "step00000030"]
    assert (tmp_path / LATEST).read_text() == "step00000025"
    out = capsys.readouterr().out
    assert "removing" in out and "step00000040" in out
    # keep_last counts by step: 30 is newer than 25 and kept, but `latest` (25) is never removed.
    _save(tmp_path, 26, keep_last=1)
    assert complete_checkpoints(tmp_path) == ["step00000026", "step00000030"]


def test_a_full_disk_leaves_no_partial_checkpoint_and_latest_unchanged(tmp_path):
    _save(tmp_path, 10)
    with pytest.raises(CheckpointError, match=f"no space left on the device holding {tmp_path / 'step00000020'}"):
        _save(tmp_path, 20, engine=FileEngine(fail=True))
    assert not (tmp_path / "step00000020").exists() and (tmp_path / LATEST).read_text() == "step00000010"


def test_a_full_disk_for_real(tmp_path):
    from tests.helpers import small_filesystem

    with small_filesystem(tmp_path / "disk", "1m") as disk:
        _save(disk, 10, engine=FileEngine(size=100_000))
        with pytest.raises(CheckpointError, match="no space left on the device holding"):
            _save(disk, 20, engine=FileEngine(size=2_000_000))
        assert sorted(p.name for p in disk.iterdir()) == [LATEST, "step00000010"]
        assert (disk / LATEST).read_text() == "step00000010"


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "state", "latest", "empty_latest", "manifest"])
def test_damage_is_named_with_the_way_out(tmp_path, damage):
    _save(tmp_path, 10)
    path = _save(tmp_path, 20)
    engine_file = path / "engine.pt"
    if damage == "flip":
        data = bytearray(engine_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        engine_file.write_bytes(bytes(data))
    elif damage == "truncate":
        engine_file.write_bytes(engine_file.read_bytes()[:100])
    elif damage == "remove":
        engine_file.unlink()
    elif damage == "state":
        (path / "trainer_state.json").write_text("{\"state\": {")
    elif damage == "latest":
        (tmp_path / LATEST).write_text("garbage")
    elif damage == "empty_latest":
        (tmp_path / LATEST).write_text("")
    elif damage == "manifest":
        (path / MANIFEST).write_text("{")
    expected = {"flip": "engine.pt: its checksum differs", "truncate": "engine.pt: 100 bytes, the manifest says",
                "remove": "engine.pt: missing", "state": "trainer_state.json: ", "latest": "names 'garbage'",
                "empty_latest": "names ''", "manifest": "manifest.json: missing or unreadable"}[damage]
    with pytest.raises(CheckpointError, match=expected) as error:
        tag = resume_tag(tmp_path, "latest")
        load_checkpoint(FileEngine(), tmp_path, tag)
    assert "step00000010" in str(error.value) and "--training.resume_from" in str(error.value)
    # The way out works.
    engine = FileEngine()
    assert load_checkpoint(engine, tmp_path, resume_tag(tmp_path, "step00000010")).step == 10 and engine.loaded is not None


def test_resume_from_none_or_nothing_to_resume(tmp_path):
    assert resume_tag(tmp_path / "absent", "latest") is None
    _save(tmp_path, 10)
    assert resume_tag(tmp_path, "none") is None
    with pytest.raises(CheckpointError, match="step00000099: no such checkpoint; the complete checkpoints are step00000010"):
        resume_tag(tmp_path, "step00000099")


def test_a_checkpoint_written_before_manifests_resumes_unchecked(tmp_path, capsys):
    path = _save(tmp_path, 10)
    (path / MANIFEST).unlink()
    assert resume_tag(tmp_path, "latest") == "step00000010"
    assert "no manifest.json" in capsys.readouterr().out
    assert load_checkpoint(FileEngine(), tmp_path, "step00000010").step == 10


def test_checksum_of_a_file_hashed_window_by_window_is_the_checksum_of_its_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "HASH_WINDOW", mmap.ALLOCATIONGRANULARITY)
    data = np.random.default_rng(0).bytes(3 * mmap.ALLOCATIONGRANULARITY + 123)
    (tmp_path / "states.pt").write_bytes(data)
    entry = checkpoint.file_entry(tmp_path / "states.pt", tmp_path)
    assert entry == {"name": "states.pt", "size": len(data), "xxh3": xxhash.xxh3_64(data).hexdigest()}
