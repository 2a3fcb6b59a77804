"""
The command-line conventions every entry point shares (train.py, eval.py, compare.py, sample.py,
data.py): `--help` shows each flag's default, and a mistake ends in one line on stderr with exit
code 1, never in argparse's usage block or a traceback.
"""

import argparse


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to each flag's help, unless the help already says its default in words."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the defaults in --help and one-line errors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise SystemExit(f"error: {message} (see python {self.prog} --help)")


def fail(msg):
    """One line on stderr and exit code 1, instead of a traceback from deep inside."""
    raise SystemExit(f"error: {msg}")
