"""Checkpoints: the engine's files, our state (step, consumed samples, RNG states of every rank,
the run and model configs), and a manifest that makes them complete and verifiable.

    checkpoints/step00000010/   one step's checkpoint, written into a fresh directory
        ...                     the engine's files (DeepSpeed's shards, or the pipeline engine's)
        rng_rank00000.pt ...    every rank's RNG states
        trainer_state.json      our state, the run config, the live model config
        manifest.json           written last: the layout and every file's size and xxh3 checksum
    checkpoints/latest          the tag to resume from; moved only after manifest.json exists

A checkpoint is complete once its manifest exists: every rank has written its files (each rank
checksums its own files right after writing them, from the page cache) and a barrier passed.
`latest` moves after that, so a run killed at any moment of a save resumes from a complete
checkpoint. Pruning keeps the `keep_last` newest complete checkpoints by step, never the one
`latest` names, and removes directories that never got their manifest (a killed save's); it runs
after the run's own save, when none of its ranks is writing. Resume checks the manifest (sizes on
every rank before any process group exists, checksums shared among the ranks) and says which file
is damaged and which checkpoints are left.
"""

from __future__ import annotations

import errno
import json
import mmap
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import xxhash

LATEST = "latest"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
_TAG = re.compile(r"step(\d{8})")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or resumed from; the message names the file and the way out."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    segment: int = 0  # the curriculum's data segment being read (training/curriculum.py)
    segment_start_samples: int = 0  # consumed_samples when that segment started

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainerState":
        """The state as saved; counters that older versions kept and this one does not are left out."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_tag(checkpoint_dir: Path) -> Optional[str]:
    """The tag `latest` names (not checked), or None without a pointer."""
    pointer = Path(checkpoint_dir) / LATEST
    return pointer.read_text().strip() if pointer.exists() else None


def read_manifest(path: Path) -> Optional[dict]:
    """A checkpoint directory's manifest, or None when it has none (or an unreadable one)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), list) else None


def complete_checkpoints(checkpoint_dir: Path) -> list[str]:
    """Tags of the complete checkpoints (with a manifest), oldest first."""
    tags = sorted(p.name for p in Path(checkpoint_dir).glob("step*") if _TAG.fullmatch(p.name) and p.is_dir())
    return [tag for tag in tags if read_manifest(Path(checkpoint_dir) / tag) is not None]


HASH_WINDOW = 64 * 2**20  # a multiple of mmap.ALLOCATIONGRANULARITY


def file_entry(path: Path, root: Path) -> dict:
    """Name (relative to the checkpoint), size and xxh3-64 checksum of a file just written."""
    digest = xxhash.xxh3_64()
    size = path.stat().st_size
    if size:
        # Hashed from a mapping of the page cache: reading the file into Python buffers cost three
        # times as long (11% of a save of the small preset instead of 4%). Window by window: a
        # mapped page counts in the rank's resident memory until it is unmapped, and a whole file
        # mapped at once would add its size to the save's peak.
        with open(path, "rb") as f:
            for offset in range(0, size, HASH_WINDOW):
                with mmap.mmap(f.fileno(), min(HASH_WINDOW, size - offset), offset=offset, access=mmap.ACCESS_READ) as pages:
                    digest.update(pages)
    return {"name": path.relative_to(root).as_posix(), "size": size, "xxh3": digest.hexdigest()}


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(value) -> list:
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _describe(error: Exception, path: Path) -> str:
    # torch.save reports a full disk as a RuntimeError of its stream, without the errno.
    full = getattr(error, "errno", None) == errno.ENOSPC or shutil.disk_usage(path.parent).free < 2**20
    if full:
        return f"no space left on the device holding {path}"
    return f"{path}: {getattr(error, 'strerror', None) or error}"


def save_checkpoint(engine, checkpoint_dir: Path, state: TrainerState, config: dict, keep_last: int,
                    model: dict) -> Path:
    """Every rank calls this. `model`: the live model's config (a curriculum changes its loops,
    RoPE base and layer count from those of the run config). Returns the checkpoint's directory.
    A rank that cannot write (a full disk) stops the save on every rank: the partial directory is
    removed, `latest` stays where it was, and every rank raises the same CheckpointError."""
    rank, _ = _rank_world()
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag_of(state.step)
    path = checkpoint_dir / tag
    if rank == 0 and path.exists():
        # An earlier attempt of this run reached this step and was lost (`latest` is older): its
        # files would mix with the new ones.
        print(f"checkpoint: replacing {path}, left by an earlier attempt of this run", flush=True)
        shutil.rmtree(path)
    _barrier()
    entries, error = [], None
    try:
        path.mkdir(parents=True, exist_ok=True)
        written = list(engine.save(checkpoint_dir, tag))
        written.append(path / f"rng_rank{rank:05d}.pt")
        torch.save(rng_state(), written[-1])
        if rank == 0:
            written.append(path / STATE)
            _write_text(written[-1], json.dumps({"state": asdict(state), "config": config, "model": model}, indent=2))
        entries = [file_entry(p, path) for p in written]
    except (OSError, RuntimeError) as e:  # a rank that cannot write stops the save everywhere, below
        error = _describe(e, path)
    gathered = _gather((entries, error))
    errors = [e for _, e in gathered if e is not None]
    if not errors and rank == 0:
        manifest = {"step": state.step, "layout": asdict(engine.layout()),
                    "files": sorted((e for rank_entries, _ in gathered for e in rank_entries), key=lambda e: e["name"])}
        try:
            _write_text(path / MANIFEST, json.dumps(manifest, indent=1))
            _write_text(checkpoint_dir / LATEST, tag)
        except OSError as e:
            errors.append(_describe(e, path))
        # The outcome of rank 0's writes travels with the next collective.
    errors = [e for group in _gather(errors) for e in group]
    if errors:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        raise CheckpointError(f"checkpoint of step {state.step} not written: {errors[0]}; the partial {path} was "
                              f"removed and {checkpoint_dir / LATEST} still names {latest_tag(checkpoint_dir)}")
    if rank == 0:
        _prune(checkpoint_dir, keep_last, keep=tag)
    _barrier()
    return path


def _prune(checkpoint_dir: Path, keep_last: int, keep: str) -> None:
    """Keep the keep_last newest complete checkpoints and `keep` (the one `latest` names); remove
    the rest, and directories a killed save left without a manifest. Only rank 0 calls this, after
    the run's own save: no rank of the run is writing then."""
    complete = complete_checkpoints(checkpoint_dir)
    for tag in complete[:-keep_last]:
        if tag != keep:
            shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)
    for path in checkpoint_dir.glob("step*"):
        if _TAG.fullmatch(path.name) and path.is_dir() and path.name not in complete and path.name != keep:
            print(f"checkpoint: removing {path}, an incomplete checkpoint (no {MANIFEST}) of an earlier attempt", flush=True)
            shutil.rmtree(path, ignore_errors=True)


def resume_tag(checkpoint_dir: Path, resume_from: str) -> Optional[str]:
    """The checkpoint to resume from (training.resume_from: latest, a tag, or none), checked
    without any process group: that it is complete, that its files exist with their sizes and that
    its state reads. Every rank calls this and raises the same CheckpointError for a bad one."""
    checkpoint_dir = Path(checkpoint_dir)
    if resume_from == "none":
        return None
    if resume_from == "latest":
        pointer = checkpoint_dir / LATEST
        if not pointer.exists():
            return None
        try:
            tag = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{pointer}: unreadable ({e}); {_way_out(checkpoint_dir)}") from None
        if not tag or not (checkpoint_dir / tag).is_dir():
            raise CheckpointError(f"{pointer}: names {tag!r}, which is no checkpoint in {checkpoint_dir}; {_way_out(checkpoint_dir)}")
    else:
        tag = resume_from
        if not (checkpoint_dir / tag).is_dir():
            raise CheckpointError(f"{checkpoint_dir / tag}: no such checkpoint; {_way_out(checkpoint_dir)}")
    path = checkpoint_dir / tag
    manifest = read_manifest(path)
    if manifest is None:
        if (path / MANIFEST).exists() or resume_from != "latest":
            raise CheckpointError(f"{path / MANIFEST}: missing or unreadable, so {path} is not a complete checkpoint; "
                                  f"{_way_out(checkpoint_dir, tag)}")
        # Written before checkpoints had manifests, and complete (`latest` names it): resumed unchecked.
        print(f"checkpoint: {path} has no {MANIFEST} (an older version wrote it); resuming without checking its files",
              flush=True)
    else:
        for entry in manifest["files"]:
            file = path / entry["name"]
            size = file.stat().st_size if file.exists() else None
            if size != entry["size"]:
                found = "missing" if size is None else f"{size:,} bytes, the manifest says {entry['size']:,}"
                raise CheckpointError(f"{file}: {found}; {_way_out(checkpoint_dir, tag)}")
    try:
        TrainerState.from_dict(json.loads((path / STATE).read_text())["state"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / STATE}: unreadable ({e}); {_way_out(checkpoint_dir, tag)}") from None
    return tag


def _way_out(checkpoint_dir: Path, bad: Optional[str] = None) -> str:
    others = [t for t in complete_checkpoints(checkpoint_dir) if t != bad]
    if others:
        return (f"the complete checkpoints are {', '.join(others)}: name one (--training.resume_from TAG to resume, "
                "--tag for the tools), or start afresh with --training.resume_from none")
    return "no other complete checkpoint is left: start afresh with --training.resume_from none (or another run_dir)"


def damaged_files(checkpoint_dir: Path, tag: str, rank: int = 0, world: int = 1) -> list[str]:
    """The files of share `rank` of `world` of the manifest (every file with the defaults) whose
    checksum differs from the manifest's."""
    path = Path(checkpoint_dir) / tag
    manifest = read_manifest(path)
    if manifest is None:
        return []  # an older checkpoint without a manifest (resume_tag said so)
    return [entry["name"] for entry in manifest["files"][rank::world]
            if file_entry(path / entry["name"], path)["xxh3"] != entry["xxh3"]]


def check_damage(checkpoint_dir: Path, tag: str, damaged: list[str]) -> None:
    if damaged:
        extra = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise CheckpointError(f"{Path(checkpoint_dir) / tag / damaged[0]}: its checksum differs from the manifest's, "
                              f"the file is damaged{extra}; {_way_out(checkpoint_dir, tag)}")


def load_checkpoint(engine, checkpoint_dir: Path, tag: str) -> TrainerState:
    """Resume from checkpoint `tag` (resume_tag's): checksums, the engine's files, this rank's RNG
    state and our state."""
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / tag
    rank, world = _rank_world()
    # Every rank checksums its share of the files (they are read once in all); a damaged file
    # anywhere stops every rank with the same message.
    check_damage(checkpoint_dir, tag, sorted(n for names in _gather(damaged_files(checkpoint_dir, tag, rank, world))
                                             for n in names))
    rng_file = path / f"rng_rank{rank:05d}.pt"
    if not rng_file.exists():
        raise CheckpointError(f"{rng_file}: missing; was the checkpoint written with another number of ranks? "
                              f"{_way_out(checkpoint_dir, tag)}")
    engine.load(checkpoint_dir, tag)
    set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainerState.from_dict(json.loads((path / STATE).read_text())["state"])


def saved_layout(checkpoint_dir: Path, tag: str) -> Optional[dict]:
    """The layout (engine.Layout's fields) a checkpoint was written at, if its manifest says."""
    manifest = read_manifest(Path(checkpoint_dir) / tag)
    return None if manifest is None else manifest.get("layout")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
