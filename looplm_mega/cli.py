"""What every command line of the project shares: a help page where each flag ends with its
default, SIGTERM turned into an exception so that `with` blocks clean up, and one line for an
operating-system error."""

from __future__ import annotations

import argparse
import errno
import os
import signal
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """argparse's formatter that appends "(default: X)" to the help of each option that takes a
    value, without the noise it adds elsewhere: nothing for switches (--flag alone: their default
    is their absence, and a store_false one would read "default: True"), required options or
    options whose default is None (their help says what leaving them out means), nor where the help
    already names its default. The description keeps its line breaks (the tools' docstrings hold
    command examples)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs == 0 or action.required or action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class Terminated(BaseException):
    """SIGTERM, raised where the process happens to be. A BaseException, as KeyboardInterrupt is:
    no `except Exception` swallows it, and every `with` block on the way out runs its cleanup."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def raise_on_sigterm() -> None:
    """Make SIGTERM raise Terminated in this process (and in processes forked from it, until they
    set their own handler: a multiprocessing pool stops its workers with SIGTERM, so they must)."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def os_error_message(error: OSError, output: str | Path) -> str:
    """One line for an OSError of a tool that writes `output` (a file or a prefix of files)."""
    if error.errno == errno.ENOSPC:
        return f"no space left on the device holding {os.path.dirname(os.path.abspath(output))}"
    if error.filename is None or error.strerror is None:
        return str(error)
    return f"{error.filename}: {error.strerror[0].lower()}{error.strerror[1:]}"
