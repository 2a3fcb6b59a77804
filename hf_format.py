"""
The Hugging Face checkpoint folder format, as transformers reads and writes it.
"""

import os
import re
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path


class ConfigError(ValueError):
    """config.json asks for something this model cannot compute."""


class CheckpointError(ValueError):
    """The files on disk do not match what config.json describes."""


# ----------------------------------------------------------------------------------------------
# atomic folders


_crash_calls = 0


def crash_point():
    """Test hook: with MPPO_CRASH_AFTER=N in the environment, the N-th call in this process kills it
    with SIGKILL, so tests can stop a save at every step between its files and renames."""
    global _crash_calls
    if "MPPO_CRASH_AFTER" in os.environ:
        _crash_calls += 1
        if _crash_calls == int(os.environ["MPPO_CRASH_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def atomic_dir(path):
    """Yield the empty folder <path>.tmp to write into; on success it becomes path (an existing path is
    moved to <path>.old first and removed after), on an exception it is removed. The names are fixed, so a
    process killed at any moment leaves path complete (old or new) or repairable by clean_stale."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    _repair(path)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        crash_point()
        if path.exists():
            path.rename(old)
            crash_point()
        tmp.rename(path)
        crash_point()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():  # failed between the two renames: put the old one back
            old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _repair(path, tmp_name=None, old_name=None):
    """Undo what a crash inside atomic_dir(path) left: remove the temporary folder; an old folder
    is the complete previous version: restore it if path is gone, else remove it."""
    tmp = path.with_name(tmp_name or path.name + ".tmp")
    old = path.with_name(old_name or path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    if old.is_dir() and not path.exists():
        old.rename(path)
        return [f"restored {path.name} from {old.name}"]
    shutil.rmtree(old, ignore_errors=True)
    return []


def clean_stale(folder):
    """Repair what crashed saves left in folder: NAME.tmp removed, NAME.old restored as NAME if NAME is
    missing (else removed), and the same for hidden .NAME.tmp-PID / .NAME.old-PID folders of older
    versions of this code. Returns a line for each folder restored."""
    restored = []
    for entry in sorted(Path(folder).iterdir()):
        if not entry.is_dir():
            continue
        if entry.suffix in (".tmp", ".old") and entry.exists():
            restored += _repair(entry.with_suffix(""))
        elif m := re.fullmatch(r"\.(.+)\.(tmp|old)-(\d+)", entry.name):
            name, pid = m[1], m[3]
            restored += _repair(entry.with_name(name), f".{name}.tmp-{pid}", f".{name}.old-{pid}")
    return restored
