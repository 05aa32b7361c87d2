"""Every tool that writes a directory or a dataset prefix, against every kind of output it may be
pointed at: an unrelated folder, its own earlier output with and without --overwrite, an output
that is, lies inside or contains an input, and a missing parent (looplm_mega/outputs.py)."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from looplm_mega.data.tokenizer import train_bpe_tokenizer
from looplm_mega.model import LoopLM
from looplm_mega.training.model_dir import write_model_dir

from tests.data.synthetic_datasets import write_random_dataset
from tests.helpers import tiny_config

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    config = tiny_config(vocab_size=300, make_vocab_size_divisible_by=1)
    torch.manual_seed(0)
    write_model_dir(root / "model", LoopLM(config).state_dict(), config)
    write_random_dataset(root / "tokens", num_documents=60, min_length=5, max_length=40, vocab_size=300)
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) for i in range(40)]
    (root / "corpus").mkdir()
    (root / "corpus" / "c.jsonl").write_text("\n".join(lines) + "\n")
    train_bpe_tokenizer([json.loads(line)["text"] for line in lines], 300, root / "tokenizer.json")
    return root


def _arguments(tool: str, root: Path, out: Path) -> list:
    return {
        "convert_checkpoint": ["--model", root / "model", "--output", out],
        "convert_checkpoint --to-hf": ["--model", root / "model", "--to-hf", out, "--tokenizer", root / "tokenizer.json"],
        "upcycle": ["--source", root / "model", "--output", out, "--no-check"],
        "eval_loops": ["--model", root / "model", "--data", root / "tokens", "--seq-length", 16, "--batch-size", 2,
                       "--num-batches", 1, "--split", "0,1,0", "--output", out, "--cache-dir", root / "eval_cache"],
        "preprocess_data": ["--input", root / "corpus", "--tokenizer", root / "tokenizer.json", "--output-prefix", out,
                            "--workers", 1],
        "merge_datasets": ["--inputs", root / "tokens", "--output-prefix", out],
    }[tool]


DIRECTORY_TOOLS = ["convert_checkpoint", "convert_checkpoint --to-hf", "upcycle", "eval_loops"]
PREFIX_TOOLS = ["preprocess_data", "merge_datasets"]
INPUT = {"convert_checkpoint": "model", "convert_checkpoint --to-hf": "model", "upcycle": "model",
         "eval_loops": "model", "preprocess_data": "corpus", "merge_datasets": "tokens"}


def run(tool: str, root: Path, out: Path, *extra) -> int:
    """The tool's main() in this process (no fresh interpreter per case); its exit code."""
    name = tool.split()[0]
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.main([str(a) for a in _arguments(tool, root, out) + list(extra)])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def refused(tool, root, out, capsys, *extra) -> str:
    """The tool's one-line error (exit code 2, as argparse's); fails unless it refused."""
    capsys.readouterr()
    code = run(tool, root, out, *extra)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], err
    return lines[0]


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def outputs(tool: str, out: Path) -> list[Path]:
    """What the tool writes for `out`: a directory, or the files of a dataset prefix."""
    if tool in DIRECTORY_TOOLS:
        return [out]
    stem = f"{out}_text_document" if tool == "preprocess_data" else str(out)
    return [Path(stem + ".bin"), Path(stem + ".idx")]


@pytest.mark.parametrize("tool", DIRECTORY_TOOLS + PREFIX_TOOLS)
def test_an_unrelated_output_is_refused_even_with_overwrite(tool, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    for path in outputs(tool, out):
        if tool in DIRECTORY_TOOLS:
            path.mkdir()
            (path / "thesis.tex").write_text("years of work")
        else:
            path.write_text("a file that is not an indexed dataset")
    before = [digest(p) for p in outputs(tool, out)]
    line = refused(tool, inputs, out, capsys, "--overwrite")
    assert "was not written by looplm-mega" in line or "is not an indexed dataset's index" in line
    assert [digest(p) for p in outputs(tool, out)] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in outputs(tool, out))


@pytest.mark.parametrize("tool", DIRECTORY_TOOLS + PREFIX_TOOLS)
def test_its_own_output_is_replaced_only_with_overwrite_and_whole(tool, inputs, tmp_path, capsys):
    out = tmp_path / "parent" / "out"  # a missing parent is created
    assert run(tool, inputs, out) == 0
    written = [digest(p) for p in outputs(tool, out)]
    assert "pass --overwrite" in refused(tool, inputs, out, capsys)
    assert [digest(p) for p in outputs(tool, out)] == written
    inodes = [p.stat().st_ino for p in outputs(tool, out)]
    assert run(tool, inputs, out, "--overwrite") == 0
    assert all(p.stat().st_ino not in inodes for p in outputs(tool, out))  # a new output, renamed into place
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(p.name for p in outputs(tool, out))  # nothing beside it


# A dataset prefix names files: it can equal an input file (merge_datasets) or lie inside an input
# folder (preprocess_data), but contain nothing.
OVERLAPS = [(tool, where) for tool in DIRECTORY_TOOLS for where in ("equal", "inside", "containing")] + [
    ("preprocess_data", "inside"), ("merge_datasets", "equal")]
MESSAGES = {"equal": "is also an input", "inside": "lies inside the input", "containing": "contains the input"}


@pytest.mark.parametrize("tool, where", OVERLAPS)
def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused(tool, where, inputs, capsys):
    source = inputs / INPUT[tool]
    out = {"equal": source, "inside": source / "sub", "containing": inputs}[where]
    before = digest(inputs)
    assert MESSAGES[where] in refused(tool, inputs, out, capsys, "--overwrite")
    assert digest(inputs) == before


@pytest.mark.parametrize("tool", DIRECTORY_TOOLS + PREFIX_TOOLS)
def test_a_parent_that_cannot_be_created_is_one_line(tool, inputs, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in refused(tool, inputs, tmp_path / "file" / "sub" / "out", capsys)


def test_the_quickstart_refuses_an_unrelated_out_before_any_work(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("quickstart", TOOLS.parent / "examples/quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.md").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--out", str(tmp_path / "out"), "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "was not written by looplm-mega" in err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["notes.md", "out"]
