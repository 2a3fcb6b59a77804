"""
The command-line conventions of cli.py across every entry point that uses it: `--help` states each
flag's default once (argparse's own "(default: ...)" is not added where the help already says it in
words, as eval.py's --date_string did: "(default: today), as in training (default: None)").

    python -m pytest test_cli.py -q
"""

import importlib
import re
import sys

import pytest

ENTRY_POINTS = ["train", "eval", "compare", "generate", "memory", "onpolicy", "data", "sample"]


def help_text(name, capsys):
    module = importlib.import_module(name)
    entry = module.parse_args if hasattr(module, "parse_args") else module.main
    with pytest.raises(SystemExit) as done:
        entry(["--help"])
    assert done.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_states_each_default_once(name, capsys):
    """Each option's entry in `python NAME.py --help` (the block from its flag to the next flag) holds
    "(default:" at most once, and most options state one."""
    text = help_text(name, capsys)
    options = text[text.index("options:") :]
    entries = re.split(r"\n  (?=-)", options)[1:]
    assert len(entries) >= 2, text
    counts = {entry.split()[0]: entry.count("(default:") for entry in entries}
    assert max(counts.values()) == 1, {flag: n for flag, n in counts.items() if n > 1}
    if name == "eval":
        assert counts["--date_string"] == 1


def test_a_failing_command_writes_its_line_in_one_write(monkeypatch):
    """cli.one_line_errors around a main that calls fail(): stderr receives exactly one write, the whole line
    with its newline (Python's own printing of the SystemExit takes two, between which another torchrun rank's
    line can land), and the process exits with code 1; other exits pass through unchanged."""
    from cli import fail, one_line_errors

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

    stderr = Recorder()
    monkeypatch.setattr("sys.stderr", stderr)
    with pytest.raises(SystemExit) as done:
        one_line_errors(lambda argv: fail("stopped by SIGTERM after step 5"))()
    assert done.value.code == 1 and stderr.writes == ["error: stopped by SIGTERM after step 5\n"]
    with pytest.raises(SystemExit) as done:
        one_line_errors(lambda argv: sys.exit(0))()
    assert done.value.code == 0 and len(stderr.writes) == 1
    assert one_line_errors(lambda argv: argv)(["x"]) == ["x"]
