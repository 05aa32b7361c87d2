"""The model directory: what consolidation writes and what `training.init_from` reads.

    config.yaml                      the LoopLMConfig
    trainer_state.json               step and consumed samples of the checkpoint it came from (optional)
    model.safetensors                full tensors, released names and shapes            (TP = 1)
  or model.safetensors.index.json + shards (Hugging Face's layout, read only)
  or
    model-tp00-of-04.safetensors     TP shards (vocabulary padded), released names       (TP = 4)
    ...
    optimizer.safetensors            Adam's moments, full tensors (optional; training/optimizer.py)

A split directory lets each rank of a run at that TP degree read only its own shard; any other
degree reads the shards and re-splits them (RankWeights, one tensor at a time). Directories are
assembled under a temporary name and renamed when complete; an existing one is replaced only with
overwrite=True, and only if it is a model directory (looplm_mega/outputs.py).
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
from safetensors import safe_open
from tqdm import tqdm
from safetensors.torch import load_file

from looplm_mega.config import load_yaml, save_yaml
from looplm_mega.model.config import LoopLMConfig
from looplm_mega.outputs import staged_output_dir
from looplm_mega.parallel.tensor_parallel import merge, padded_vocab_size, shard

FULL = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
HF_INDEX = "model.safetensors.index.json"  # Hugging Face's sharded layout (released Ouro directories)
MODEL_DIR = "model directory"  # the kind of output (looplm_mega/outputs.py)


def shard_file(rank: int, tp: int) -> str:
    return f"model-tp{rank:02d}-of-{tp:02d}.safetensors"


def tensor_parallel_degree(model_dir: Path) -> int:
    """1 for a full model, else the number of TP shard files; an error for anything else."""
    model_dir = Path(model_dir)
    if (model_dir / FULL).exists() or (model_dir / HF_INDEX).exists():
        return 1
    degrees = {int(m.group(1)) for f in model_dir.glob("model-tp*-of-*.safetensors")
               if (m := re.fullmatch(r"model-tp\d+-of-(\d+)\.safetensors", f.name))}
    if len(degrees) != 1:
        raise FileNotFoundError(f"{model_dir}: neither {FULL} nor one complete set of model-tpXX-of-NN.safetensors")
    tp = degrees.pop()
    missing = [shard_file(r, tp) for r in range(tp) if not (model_dir / shard_file(r, tp)).exists()]
    if missing:
        raise FileNotFoundError(f"{model_dir}: TP shards missing: {', '.join(missing)}")
    return tp


def write_model_dir(output_dir: str | Path, state: Mapping[str, "TensorLike"], config: LoopLMConfig,
                    trainer_state: Optional[dict] = None, tp: int = 1,
                    moments: Optional[Mapping[str, "TensorLike"]] = None, *, overwrite: bool = False,
                    inputs: tuple = ()) -> Path:
    """Write full tensors (released shapes) as one file, or split into `tp` shard files; Adam's
    moments, if given, as one file of full tensors (any TP degree shards them on loading). Values
    may be lazy (MergedTensor, DeepSpeed's GatheredTensor): they are read one at a time, so memory
    stays at the largest tensor. `inputs`: paths the tensors come from, which the output must not
    be, hold or lie in."""
    with staged_output_dir(output_dir, MODEL_DIR, inputs, overwrite) as staging:
        padded = padded_vocab_size(config.vocab_size, tp, config.make_vocab_size_divisible_by) if tp > 1 else None
        for rank in range(tp):
            write_tensors(staging / (FULL if tp == 1 else shard_file(rank, tp)), state,
                          lambda name, t: shard(t, name, rank, tp, padded))
        if moments is not None:
            write_tensors(staging / OPTIMIZER_FILE, moments)
        write_config(staging, config, trainer_state)
    return Path(output_dir)


class MergedTensor:
    """A full tensor from its TP shards (tensors, memory-mapped tensors or lazy ones), merged only
    when read; shape and dtype come from merging meta tensors."""

    def __init__(self, shards: list, name: str, vocab_size: Optional[int] = None):
        self.shards, self.name, self.vocab_size = shards, name, vocab_size
        meta = merge([as_meta(s) for s in shards], name, vocab_size)
        self.shape, self.dtype = meta.shape, torch.float32

    def contiguous(self) -> torch.Tensor:
        return merge([materialize(s) for s in self.shards], self.name, self.vocab_size).float().contiguous()


TensorLike = Union[torch.Tensor, MergedTensor]  # or anything with shape, dtype and contiguous()


def as_meta(t) -> torch.Tensor:
    return torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")


def materialize(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else t.contiguous()


def write_tensors(path: Path, tensors: Mapping[str, "TensorLike"],
                  transform: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, t: t) -> None:
    """A safetensors file of `transform(name, tensor)` for every tensor, read and written one at a
    time; shapes are worked out on meta tensors first (the header precedes the data). Shows its
    progress (tensors, bytes, rate, ETA): a large model takes minutes."""
    out = {name: transform(name, as_meta(t)) for name, t in tensors.items()}
    specs = {name: (_DTYPE_NAMES[meta.dtype], list(meta.shape)) for name, meta in out.items()}
    total = sum(meta.numel() * meta.element_size() for meta in out.values())
    with StreamingSafetensorsWriter(path, specs) as writer, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {path.name}",
                 mininterval=2.0, file=sys.stderr) as progress:
        for done, (name, t) in enumerate(tensors.items(), 1):
            tensor = transform(name, materialize(t)).to(out[name].dtype).contiguous()
            writer.add(name, tensor)
            progress.set_postfix_str(f"{done}/{len(out)} tensors", refresh=False)
            progress.update(tensor.numel() * tensor.element_size())


def write_config(model_dir: Path, config: LoopLMConfig, trainer_state: Optional[dict] = None) -> None:
    save_yaml(config, model_dir / "config.yaml")
    if trainer_state is not None:
        (model_dir / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))


def full_model_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of an unsplit directory: model.safetensors, or Hugging Face's shards."""
    model_dir = Path(model_dir)
    if (model_dir / FULL).exists():
        return [model_dir / FULL]
    if (model_dir / HF_INDEX).exists():
        return [model_dir / f for f in sorted(set(json.loads((model_dir / HF_INDEX).read_text())["weight_map"].values()))]
    raise FileNotFoundError(f"{model_dir}: no {FULL} or {HF_INDEX} (a TP-split directory must be merged first: "
                            "tools/convert_checkpoint.py --model DIR --output OUT --tp 1)")


def read_config(model_dir: str | Path) -> LoopLMConfig:
    return load_yaml(LoopLMConfig, Path(model_dir) / "config.yaml")


def read_trainer_state(model_dir: str | Path) -> Optional[dict]:
    path = Path(model_dir) / "trainer_state.json"
    return json.loads(path.read_text()) if path.exists() else None


class SafetensorsEntry:
    """One tensor of a safetensors file, read when asked (shape and dtype from the header)."""

    def __init__(self, handle, name: str):
        self.handle, self.name = handle, name
        piece = handle.get_slice(name)
        self.shape, self.dtype = torch.Size(piece.get_shape()), _DTYPES[piece.get_dtype()]

    def contiguous(self) -> torch.Tensor:
        return self.handle.get_tensor(self.name)


def lazy_tensors(files: list[Path]) -> dict[str, SafetensorsEntry]:
    """Every tensor of some safetensors files, by name, read only when asked."""
    entries = {}
    for path in files:
        handle = safe_open(str(path), framework="pt")
        entries.update({name: SafetensorsEntry(handle, name) for name in handle.keys()})
    return entries


def read_full_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full tensors with the released shapes, whichever way the directory is split."""
    model_dir = Path(model_dir)
    tp = tensor_parallel_degree(model_dir)
    if tp == 1:
        return {name: tensor for f in full_model_files(model_dir) for name, tensor in load_file(str(f)).items()}
    vocab_size = read_config(model_dir).vocab_size
    shards = [load_file(str(model_dir / shard_file(r, tp))) for r in range(tp)]
    return {name: merge([s[name] for s in shards], name, vocab_size) for name in shards[0]}


class RankWeights:
    """A model directory's tensors as one TP rank's shards (vocabulary rows padded as the model's),
    read one tensor at a time when asked: building a model from them (parallel/build.py) holds
    one tensor beyond the model. A directory split at the same TP degree gives the rank its own
    file's tensors as they are; any other is read whole (or merged from its shards) and split."""

    def __init__(self, model_dir: str | Path, rank: int, tp: int, config: LoopLMConfig):
        model_dir = Path(model_dir)
        self.model_dir, self.rank, self.tp = model_dir, rank, tp
        self.padded_vocab = padded_vocab_size(config.vocab_size, tp, config.make_vocab_size_divisible_by)
        degree = tensor_parallel_degree(model_dir)
        self.own = degree == tp > 1
        if self.own:
            self.tensors = lazy_tensors([model_dir / shard_file(rank, tp)])
        elif degree == 1:
            self.tensors = lazy_tensors(full_model_files(model_dir))
        else:
            vocab_size = read_config(model_dir).vocab_size
            shards = [lazy_tensors([model_dir / shard_file(r, degree)]) for r in range(degree)]
            self.tensors = {name: MergedTensor([s[name] for s in shards], name, vocab_size) for name in shards[0]}

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the directory stores its weights in (that of its first tensor)."""
        return next(iter(self.tensors.values())).dtype

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"{self.model_dir}: no tensor {name}")
        tensor = materialize(self.tensors[name])
        return tensor if self.own else shard(tensor, name, self.rank, self.tp, self.padded_vocab)


_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class StreamingSafetensorsWriter:
    """A safetensors file written one tensor at a time. safetensors' own save_file takes every
    tensor at once; a model grown or converted tensor by tensor would then sit in memory whole.
    The format is simple and fixed (8-byte little-endian header size, a JSON header of dtypes,
    shapes and offsets, the raw little-endian bytes), so the header is written from the tensors'
    specs first and each tensor's bytes follow as it comes, in the order of `specs`."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[str, list[int]]]):
        self.path = Path(path)
        self.specs = specs
        header, offset = {}, 0
        for name, (dtype, shape) in specs.items():
            size = _SAFETENSORS_DTYPES[dtype] * math.prod(shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        self.header = encoded + b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self.pending = list(specs)

    def __enter__(self) -> "StreamingSafetensorsWriter":
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.file.write(struct.pack("<Q", len(self.header)) + self.header)
        return self

    def add(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.pending.pop(0) if self.pending else None
        dtype, shape = self.specs.get(name, (None, None))
        if name != expected or list(tensor.shape) != list(shape) or _SAFETENSORS_DTYPES.get(dtype) != tensor.element_size():
            raise ValueError(f"{self.path}: got {name} {tuple(tensor.shape)}, expected {expected} {shape} ({dtype})")
        self.file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    def __exit__(self, exc_type, exc, tb) -> None:
        self.file.close()
        if exc_type is None and self.pending:
            exc_type = ValueError
            self.tmp.unlink()
            raise ValueError(f"{self.path}: {len(self.pending)} tensors never written, first {self.pending[0]}")
        if exc_type is None:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)
