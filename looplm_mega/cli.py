"""What every command line of the project shares: a help page where each flag ends with its
default."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """argparse's formatter that appends "(default: X)" to each flag's help, without the noise it
    adds elsewhere: nothing for required flags or flags whose default is None (their help says what
    leaving them out means), nor where the help already names its default. The description keeps
    its line breaks (the tools' docstrings hold command examples)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)
