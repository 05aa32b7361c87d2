"""Command-line conventions: every tool's --help says what each flag does and shows its default; OS errors are one line."""

import argparse
import errno
import importlib.util
import sys
from pathlib import Path

import pytest

from looplm_mega.cli import os_error_message

TOOLS = sorted((Path(__file__).resolve().parents[1] / "tools").glob("*.py"))


class _Parsed(Exception):
    """Raised instead of parsing: the tool's parser, caught before it does any work."""


def _tool_parser(path: Path, monkeypatch) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location(f"tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)

    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Parsed) as parsed:
        module.main([])
    return parsed.value.args[0]


@pytest.mark.parametrize("path", TOOLS, ids=[p.stem for p in TOOLS])
def test_every_flag_has_help_and_shows_its_default(path, monkeypatch):
    parser = _tool_parser(path, monkeypatch)
    flags = [a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
    assert flags, f"{path.name}: no flags"
    for action in flags:
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{path.name}: {name} has no help"
        if action.default not in (None, argparse.SUPPRESS) and not action.required and action.nargs != 0:
            help_text = parser._get_formatter()._get_help_string(action) % {**vars(action), "prog": parser.prog}
            assert "default" in help_text.lower(), f"{path.name}: {name} does not show its default"


def test_os_errors_are_one_line(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")
    assert os_error_message(full, tmp_path / "out" / "c") == f"no space left on the device holding {tmp_path / 'out'}"
    denied = PermissionError(errno.EACCES, "Permission denied", "/data/c.bin.tmp")
    assert os_error_message(denied, "/data/c") == "/data/c.bin.tmp: permission denied"
    assert os_error_message(FileNotFoundError("tok.json: tokenizer file does not exist"), ".") == "tok.json: tokenizer file does not exist"
