"""Checkpoints: DeepSpeed's model/optimizer shards plus our state (step, consumed samples, RNG
states of every rank, the run config).

Each checkpoint goes to a fresh directory `checkpoints/step{N:08d}` (a reused directory with stale
shard files breaks consolidation), and the `latest` pointer moves to it only after every rank has
finished writing, so a run killed mid-save resumes from the previous complete checkpoint. Only
the last `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"


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
    pointer = checkpoint_dir / LATEST
    return pointer.read_text().strip() if pointer.exists() else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, checkpoint_dir: Path, state: TrainerState, config: dict, keep_last: int,
                    model: dict) -> Path:
    """Every rank calls this. `model`: the live model's config (a curriculum changes its loops,
    RoPE base and layer count from those of the run config). Returns the checkpoint's directory."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_of(state.step)
    path = checkpoint_dir / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a fresh directory: no stale shards from an earlier attempt
    _barrier()
    engine.save(checkpoint_dir, tag)
    torch.save(rng_state(), path / f"rng_rank{rank:05d}.pt")
    if rank == 0:
        _write_json(path / "trainer_state.json", {"state": asdict(state), "config": config, "model": model})
    _barrier()  # every rank has written its shards and RNG state
    if rank == 0:
        _write_text(checkpoint_dir / LATEST, tag)
        complete = sorted(p for p in checkpoint_dir.glob("step*") if p.is_dir())
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def load_checkpoint(engine, checkpoint_dir: Path) -> Optional[TrainerState]:
    """Resume from the latest complete checkpoint, if any: model, optimizer, our state, this
    rank's RNG state. Returns None when there is nothing to resume."""
    tag = latest_tag(checkpoint_dir)
    if tag is None:
        return None
    path = checkpoint_dir / tag
    engine.load(checkpoint_dir, tag)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = path / f"rng_rank{rank:05d}.pt"
    if not rng_file.exists():
        raise RuntimeError(f"{rng_file}: missing; was the checkpoint written with a different number of ranks?")
    set_rng_state(torch.load(rng_file, weights_only=False))
    saved = json.loads((path / "trainer_state.json").read_text())
    return TrainerState.from_dict(saved["state"])


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2))
