#!/usr/bin/env python
"""Fetch and tokenize the corpora of the Ouro recipe, as listed in examples/recipes/ouro_data.yaml.

    python examples/recipes/ouro_data.py list                                   # sources and outputs
    python examples/recipes/ouro_data.py download --artifacts /shared/ouro      # login node: files to disk
    python examples/recipes/ouro_data.py decode-mds --artifacts /shared/ouro    # in a venv with mosaicml-streaming
    python examples/recipes/ouro_data.py preprocess --artifacts /shared/ouro --tokenizer tok.json --data-dir data

`download` fetches what cannot be streamed (Common Crawl files, split gzip parts, token shards);
`decode-mds` turns token shards into text (mosaicml-streaming pins numpy, transformers and cloud
SDKs that the project does not take, so it runs in a virtual environment of its own:
download_artifacts.sh makes one); `preprocess` tokenizes every source into
DATA_DIR/<source>_<key>_document.bin/.idx, streaming Hugging Face datasets through `datasets`.
`--only a,b` restricts any of them to some sources. A failed source stops the run with its name;
outputs are written under temporary names and renamed when complete, so a rerun redoes only what
is missing (`download` skips files already there, `preprocess` sources whose output exists).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[2]
SOURCES = Path(__file__).with_name("ouro_data.yaml")
KINDS = ("hub", "parts", "commoncrawl", "hub_files", "mds", "local")
HUB_FIELDS = {"repo", "name", "data_dir", "split"}
FIELDS = {"hub": HUB_FIELDS, "commoncrawl": {"paths", "keep"}, "hub_files": {"repo", "include", "join"},
          "mds": {"repo", "tokenizer"}, "local": {"env"}}
DOCUMENTS_PER_FILE = 100_000  # decode-mds: documents per JSONL shard


class SourceError(ValueError):
    """A source entry or its input is wrong; the message names the source."""


@dataclass
class Source:
    name: str  # the output prefix's stem: DATA_DIR/<name>_<key>_document
    paper: str  # the name in the paper's tables
    kind: str
    spec: dict | list
    key: str = "text"
    parts: list[dict] = field(default_factory=list)

    def output(self, data_dir: str | Path) -> str:
        """The prefix tools/preprocess_data.py writes (Megatron's `{prefix}_{key}_document`)."""
        return f"{Path(data_dir) / self.name}_{self.key}_document"


def load_sources(path: str | Path = SOURCES) -> dict[str, Source]:
    with open(path, encoding="utf-8") as f:
        entries = (yaml.safe_load(f) or {}).get("sources")
    if not isinstance(entries, dict) or not entries:
        raise SourceError(f"{path}: no `sources:` mapping")
    sources = {}
    for name, entry in entries.items():
        where = f"{path}: source {name}"
        if not re.fullmatch(r"[a-z0-9_]+", str(name)) or not isinstance(entry, dict):
            raise SourceError(f"{where}: a lower-case name with a mapping of fields is needed")
        kinds = [k for k in KINDS if k in entry]
        unknown = set(entry) - set(KINDS) - {"paper", "key"}
        if len(kinds) != 1 or unknown or "paper" not in entry:
            raise SourceError(f"{where}: needs `paper` and exactly one of {', '.join(KINDS)} "
                              f"(has {', '.join(sorted(entry))})")
        kind = kinds[0]
        spec = entry[kind]
        hubs = spec if kind == "parts" else [spec] if kind == "hub" else []
        if kind == "parts" and (not isinstance(spec, list) or not spec):
            raise SourceError(f"{where}: parts must be a list of hub entries")
        for part in hubs:
            if not isinstance(part, dict) or "repo" not in part or set(part) - HUB_FIELDS:
                raise SourceError(f"{where}: a hub entry takes {', '.join(sorted(HUB_FIELDS))} (repo required), got {part}")
        if kind not in ("hub", "parts") and (not isinstance(spec, dict) or set(spec) - FIELDS[kind]):
            raise SourceError(f"{where}: {kind} takes {', '.join(sorted(FIELDS[kind]))}, got {spec}")
        sources[name] = Source(name, str(entry["paper"]), kind, spec, str(entry.get("key", "text")), hubs)
    return sources


def select(sources: dict[str, Source], only: str | None) -> list[Source]:
    if not only:
        return list(sources.values())
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise SourceError(f"--only: no source {', '.join(unknown)} (sources: {', '.join(sources)})")
    return [sources[n] for n in names]


# -- download ------------------------------------------------------------------------------------------

def commoncrawl_dir(artifacts: str | Path) -> Path:
    """Common Crawl files by their path on data.commoncrawl.org, shared by the sources that read them."""
    return Path(artifacts) / "commoncrawl"


def local_name(path: str) -> str:
    """Nemotron-CC names its files .jsonl.zstd; the readers know zstandard as .zst."""
    return path[: -len(".zstd")] + ".zst" if path.endswith(".zstd") else path


def _fetch(url: str, target: Path) -> None:
    """Download to a temporary name, then rename: a file present is a complete one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
        while chunk := response.read(1 << 22):
            out.write(chunk)
    partial.rename(target)


def commoncrawl_paths(source: Source) -> list[str]:
    """The paths of the source's path list that contain every `keep` substring."""
    with urllib.request.urlopen(source.spec["paths"]) as response:
        lines = gzip.decompress(response.read()).decode().split()
    return [p for p in lines if all(k in p for k in source.spec.get("keep", []))]


def download(source: Source, artifacts: Path, log: Callable[[str], None] = print) -> None:
    if source.kind == "commoncrawl":
        root = source.spec["paths"].split("/contrib/")[0] + "/"  # the host the paths are relative to
        paths = commoncrawl_paths(source)
        have = 0
        for i, path in enumerate(paths, 1):
            target = commoncrawl_dir(artifacts) / local_name(path)
            if target.exists():
                have += 1
                continue
            _fetch(root + path, target)
            if i % 100 == 0:
                log(f"{source.name}: {i}/{len(paths)} files")
        log(f"{source.name}: {len(paths)} files in {commoncrawl_dir(artifacts)} ({have} were there)")
    elif source.kind in ("hub_files", "mds"):
        from huggingface_hub import snapshot_download

        target = artifacts / "datasets" / source.name / ("mds" if source.kind == "mds" else "")
        patterns = source.spec.get("include") if source.kind == "hub_files" else None
        snapshot_download(source.spec["repo"], repo_type="dataset", local_dir=target, allow_patterns=patterns)
        if source.kind == "mds":
            snapshot_download(source.spec["tokenizer"], local_dir=artifacts / "datasets" / source.name / "tokenizer",
                              allow_patterns=["tokenizer.json", "tokenizer_config.json"])
        log(f"{source.name}: {source.spec['repo']} in {target}")
    else:
        log(f"{source.name}: nothing to download ({source.kind} is read when tokenizing)")


# -- decode-mds -----------------------------------------------------------------------------------------

def mds_documents(sample: dict, decode: Callable[[list[int]], str]) -> Iterator[str]:
    """The documents of one packed sample: `input_ids` cut at its `indices` (start, end) pairs, or
    the whole sequence where there are none."""
    ids = [int(t) for t in sample["input_ids"]]
    spans = sample.get("indices")
    for start, end in (spans if spans is not None and len(spans) else [(0, len(ids))]):
        text = decode(ids[int(start):int(end)])
        if text.strip():
            yield text


def write_jsonl_shards(documents: Iterable[str], out_dir: Path, per_file: int = DOCUMENTS_PER_FILE) -> int:
    """{"text": ...} lines, zstandard-compressed, `per_file` to a shard; each shard written under a
    temporary name and renamed. Returns the number of documents."""
    import zstandard

    out_dir.mkdir(parents=True, exist_ok=True)
    count, shard, writer, partial = 0, 0, None, None
    with contextlib.ExitStack() as stack:
        for text in documents:
            if writer is None:
                partial = out_dir / f"part-{shard:05d}.jsonl.zst.partial"
                writer = stack.enter_context(zstandard.ZstdCompressor().stream_writer(open(partial, "wb")))
            writer.write((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode())
            count += 1
            if count % per_file == 0:
                writer.close()
                partial.rename(partial.with_suffix(""))
                writer, shard = None, shard + 1
        if writer is not None:
            writer.close()
            partial.rename(partial.with_suffix(""))
    return count


def decode_mds(source: Source, artifacts: Path, log: Callable[[str], None] = print) -> None:
    from streaming import LocalDataset  # mosaicml-streaming, in its own environment (see the module doc)
    from tokenizers import Tokenizer

    base = artifacts / "datasets" / source.name
    tokenizer = Tokenizer.from_file(str(base / "tokenizer" / "tokenizer.json"))
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    total = 0
    for index in sorted((base / "mds").rglob("index.json")):  # one dataset per folder of shards
        folder = index.parent
        out = base / "text" / folder.relative_to(base / "mds")
        if out.exists():
            continue  # decoded by an earlier run (written under a temporary name, then renamed)
        partial = out.with_name(out.name + ".partial")
        dataset = LocalDataset(local=str(folder))
        documents = (text for i in range(len(dataset)) for text in mds_documents(dataset[i], decode))
        total += write_jsonl_shards(documents, partial)
        partial.rename(out)
    log(f"{source.name}: {total} documents decoded into {base / 'text'}")


# -- preprocess -----------------------------------------------------------------------------------------

def _joined_inputs(files: Sequence[Path], stack: contextlib.ExitStack, fifo_dir: Path) -> list[str]:
    """Files cut into parts (x.jsonl.gz.part01, part02, ...) become one named pipe each, fed by
    `cat` in part order, named like the whole file so that the reader decompresses it."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(files):
        groups.setdefault(re.sub(r"\.part\d+$", "", path.name), []).append(path)
    inputs = []
    for whole, parts in groups.items():
        fifo = fifo_dir / whole
        os.mkfifo(fifo)
        stack.callback(fifo.unlink)
        feeder = subprocess.Popen(["bash", "-c", 'exec cat "${@:2}" > "$1"', "cat", str(fifo), *map(str, parts)])
        stack.callback(_stop, feeder)
        inputs.append(str(fifo))
    return inputs


def _stop(feeder: subprocess.Popen) -> None:
    """A feeder whose pipe was never read to the end (tokenizing failed) would block for ever."""
    if feeder.poll() is None:
        feeder.kill()
    feeder.wait()


def preprocess_plan(source: Source, artifacts: Path) -> list[dict]:
    """The tools/preprocess_data.py settings of each tokenizing pass of the source (several for
    `parts`). Inputs of joined parts are returned as the part files; preprocess joins them."""
    def hub(entry: dict) -> dict:
        return {"input": [entry["repo"]], "input_format": "hf", "hf_name": entry.get("name"),
                "hf_data_dir": entry.get("data_dir"), "hf_split": entry.get("split", "train")}

    if source.kind in ("hub", "parts"):
        return [hub(entry) for entry in source.parts]
    if source.kind == "commoncrawl":
        keep = source.spec.get("keep", [])
        files = [f for f in sorted(glob.glob(str(commoncrawl_dir(artifacts) / "**" / "*.jsonl.zst"), recursive=True))
                 if all(k in f for k in keep)]
        if not files:
            raise SourceError(f"{source.name}: no downloaded files in {commoncrawl_dir(artifacts)} (run `download` first)")
        return [{"input": files, "input_format": "jsonl"}]
    if source.kind == "hub_files":
        folder = artifacts / "datasets" / source.name
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.relative_to(folder).parts[0].startswith("."))
        if not files:
            raise SourceError(f"{source.name}: no downloaded files in {folder} (run `download` first)")
        return [{"input": [str(p) for p in files], "input_format": "jsonl", "join": bool(source.spec.get("join"))}]
    if source.kind == "mds":
        folder = artifacts / "datasets" / source.name / "text"
        if not folder.is_dir():
            raise SourceError(f"{source.name}: no decoded text in {folder} (run `download`, then `decode-mds`)")
        return [{"input": [str(folder)], "input_format": "jsonl"}]
    variable = source.spec["env"]
    if not os.environ.get(variable):
        raise SourceError(f"{source.name}: set {variable} to its files (JSONL with a `text` field), e.g. "
                          f"{variable}=/shared/sft/*.jsonl")
    return [{"input": os.environ[variable].split(), "input_format": "jsonl"}]


def preprocess_source(source: Source, artifacts: Path, tokenizer: str, data_dir: Path, workers: int,
                      log: Callable[[str], None] = print) -> None:
    from looplm_mega.data.preprocess import PreprocessConfig, merge_datasets, output_prefix, preprocess

    final = source.output(data_dir)
    if Path(final + ".idx").exists():
        log(f"{source.name}: {final} is there")
        return
    passes = preprocess_plan(source, artifacts)
    data_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for i, settings in enumerate(passes):
            stem = data_dir / (source.name if len(passes) == 1 else f"{source.name}_part{i}")
            with contextlib.ExitStack() as stack:
                inputs = settings.pop("input")
                if settings.pop("join", False):
                    inputs = _joined_inputs([Path(p) for p in inputs], stack, data_dir)
                config = PreprocessConfig(input=inputs, output_prefix=str(stem), tokenizer=tokenizer,
                                          json_keys=[source.key], append_eod=True, workers=workers, **settings)
                log(f"{source.name}: tokenizing {', '.join(inputs[:3])}{' ...' if len(inputs) > 3 else ''}")
                written.append(output_prefix(stem, source.key))
                log(preprocess(config).format())
        if len(passes) > 1:
            merge_datasets(written, final)
    finally:
        if len(passes) > 1:  # the parts are this run's own intermediate files
            for prefix in written:
                for suffix in (".bin", ".idx"):
                    Path(prefix + suffix).unlink(missing_ok=True)
    log(f"{source.name}: {final}.bin/.idx")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("command", choices=["list", "download", "decode-mds", "preprocess"])
    p.add_argument("--sources", default=str(SOURCES), help="the list of sources")
    p.add_argument("--only", default=None, help="comma-separated source names")
    p.add_argument("--artifacts", default="artifacts", help="where downloads go (shared storage)")
    p.add_argument("--data-dir", default="data", help="where tokenized sources go")
    p.add_argument("--tokenizer", default=None, help="preprocess: tokenizer.json or a tokenizer directory")
    p.add_argument("--workers", type=int, default=1, help="preprocess: tokenizing processes")
    args = p.parse_args(argv)
    try:
        sources = select(load_sources(args.sources), args.only)
        artifacts = Path(args.artifacts)
        for source in sources:
            if args.command == "list":
                where = ", ".join(f"{k}={v}" for part in (source.parts or [source.spec]) for k, v in part.items())
                print(f"{source.name}\t{source.paper}\t{source.kind}: {where}\t-> {source.output(args.data_dir)}")
            elif args.command == "download":
                download(source, artifacts)
            elif args.command == "decode-mds":
                if source.kind == "mds":
                    decode_mds(source, artifacts)
            else:
                if args.tokenizer is None:
                    p.error("preprocess needs --tokenizer")
                preprocess_source(source, artifacts, args.tokenizer, Path(args.data_dir), args.workers)
    except SourceError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
