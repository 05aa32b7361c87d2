import dataclasses
import json
import subprocess
import sys
import typing
import warnings

import pytest
import torch.distributed

from looplm_mega.model.config import LoopLMConfig
from looplm_mega.pretrain import parse_command_line, silence_known_deprecations
from looplm_mega.training.config import RunConfig

HELP_AND_IMPORTS = """
import contextlib, io, sys
from looplm_mega.pretrain import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(["--help"])
    except SystemExit:
        pass
print(out.getvalue())
print("deepspeed imported:", any(name.split(".")[0] == "deepspeed" for name in sys.modules))
"""


def _sections(cls, prefix):
    """(dotted name, the dataclass holding it) of every field, sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, cls
        inner = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
        if f.name == "model" and cls is RunConfig:
            inner = [LoopLMConfig]
        if inner:
            is_list = typing.get_origin(hints[f.name]) is list
            yield from _sections(inner[0], f"{prefix.lstrip('-')}{f.name}[]." if is_list else f"{prefix}{f.name}.")


def test_help_lists_every_field_with_type_default_and_meaning_without_importing_deepspeed():
    result = subprocess.run([sys.executable, "-c", HELP_AND_IMPORTS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("deepspeed imported: False")
    lines = [line.strip() for line in result.stdout.splitlines()]
    headers = {line.split("  ")[0].lstrip("-"): (i, line) for i, line in enumerate(lines) if line.startswith(("--", "curriculum"))}
    names = list(_sections(RunConfig, "--"))
    assert len(names) > 90
    for name, owner in names:
        assert name.lstrip("-") in headers, f"{name} missing from --help"
        i, line = headers[name.lstrip("-")]
        name_, type_, default = line.split("  ")[:3]
        assert type_ and default.startswith(("(default: ", "(required", "(a section")), line
        # Every field of the run config's own sections says what it means (LoopLMConfig's fields
        # document themselves in model/config.py).
        if owner is not LoopLMConfig:
            assert not lines[i + 1].startswith(("--", "curriculum")), f"{name} has no meaning line in --help"
    for expected in ["--training.precision  fp32 | bf16  (default: fp32)",
                     "--optimizer.betas  list[float]  (default: [0.9, 0.95])",
                     "--data  DataConfig  (required)", "--model.preset  str  (default: tiny)",
                     "curriculum[].upcycle.order  stacked | interleaved  (default: stacked)"]:
        assert expected in lines
    assert "--deepspeed_config FILE, --deepspeed-config FILE" in result.stdout


def test_deepspeed_style_command_line(tmp_path):
    run, ds = tmp_path / "run.yaml", tmp_path / "ds_config.json"
    run.write_text("data: {prefixes: [d/x], seq_length: 64}\n"
                   "training: {micro_batch_size: 2, global_batch_size: 8, train_steps: 10}\n")
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    config = parse_command_line(["--local_rank=0", "--config", str(run), "--deepspeed", "--deepspeed_config", str(ds),
                                 "--training.train_steps", "20"])
    assert config.deepspeed.config_file == str(ds) and config.deepspeed.resolved_zero_stage() == 2
    assert config.train_steps == 20
    with pytest.raises(SystemExit, match="config error: .*deepspeed.config_file: .*missing.json does not exist"):
        parse_command_line(["--config", str(run), "--deepspeed_config", str(tmp_path / "missing.json")])


def test_known_deprecations_are_silenced_and_no_others():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_deprecations()
        for collective in (torch.distributed.all_gather_into_tensor, torch.distributed.reduce_scatter_tensor):
            with pytest.raises(Exception):  # no process group: the deprecation warns before the call fails
                collective(torch.zeros(2), torch.zeros(1))
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
