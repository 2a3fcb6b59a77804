"""
What a run writes into --out, and how it continues after a crash.

    OUT/args.json             every flag of the run (defaults resolved), torch version, world size, and
                              the history of its resumes (the step, and each flag changed there)
    OUT/metrics.jsonl         one JSON record per log step and per evaluation
    OUT/checkpoint-STEP/      a Hugging Face model folder (float32, what exact resume needs), the
                              optimizer state (optimizer.pt, or sharded/ under --fsdp) and
                              trainer_state.pt: step, schedule, data position, every rank's RNG
    OUT/final/                the trained model, in the starting checkpoint's dtype by default

Guarantees:
  - a run touches only these names (and checkpoint-STEP.tmp / .old, final.tmp / .old while it writes
    them, each holding hf_format.MARKER): a user's results.old/, checkpoint-notes/ or final/paper.tex
    are never deleted, renamed or written over;
  - one run at a time per --out: a second run into a locked --out is refused, naming the PID that holds
    it; the lock is the kernel's (flock on the --out folder) and ends with the process, so a killed run
    leaves none behind;
  - a checkpoint folder appears complete or not at all: it is written as checkpoint-STEP.tmp and
    renamed (hf_format.atomic_dir), so a process killed at any moment leaves the newest complete
    checkpoint usable, and the leftovers are removed when a run next starts in this --out;
  - --resume continues from the newest checkpoint whose every file is readable (a damaged model file,
    optimizer.pt, sharded state or trainer_state.pt falls back to the one before, saying so), and only
    the run that wrote it: a flag that defines the run (RUN_FLAGS) must be unchanged, or named in
    --allow_change, which args.json records;
  - after --resume, metrics.jsonl is cut back to the checkpoint's step first, so every step is
    logged once;
  - nothing is unpickled: trainer_state.pt and optimizer.pt hold only tensors, numbers, strings,
    lists and dicts and are read with torch.load(weights_only=True); a file that would run code
    is refused;
  - a new run never writes over an earlier one: --out holding checkpoints or final/ is refused
    unless --resume (continue it) or --overwrite (delete its outputs, once every flag, the model
    folder and the data have been checked) is given;
  - a save that fails for lack of space (ENOSPC) or permission (EACCES) ends in one line naming the
    newest complete checkpoint, which it left as it was.
"""

import errno
import fcntl
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from cli import fail
from hf_format import MARKER, TOKENIZER_FILES, clean_stale, crash_point
from model import check_pretrained
from parallel import all_gather, all_reduce_sum, barrier, shared_atomic_dir

OWN_FOLDERS = r"checkpoint-\d+|final"  # what a run writes into --out, besides the files below
OWN_FILES = ("args.json", "metrics.jsonl")
# the entries of a folder this project writes: a Hugging Face model folder, and in a checkpoint the training state
FOLDER_ENTRIES = (
    MARKER,
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    *TOKENIZER_FILES,
    "optimizer.pt",
    "trainer_state.pt",
    "sharded",
)
SHARD = r"model-\d{5}-of-\d{5}\.safetensors"
# flags that define what a run computes: a resume that changes one continues a different run than the
# checkpoint's. The others change only how often it logs, evaluates and saves, where results go, or how it
# is computed (micro-batches, layout, device, compilation: float32 summation order at most).
RUN_FLAGS = (
    "model",
    "data",
    "eval_data",
    "data_format",
    "score_field",
    "score_range",
    "template",
    "date_string",
    "loss",
    "beta",
    "gamma_beta_ratio",
    "orpo_lambda",
    "epochs",
    "max_steps",
    "batch_size",
    "lr",
    "warmup_ratio",
    "weight_decay",
    "adam_betas",
    "grad_clip",
    "max_length",
    "max_prompt_length",
    "score_header",
    "seed",
    "dtype",
)
DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}
_lock = None  # the file descriptor of --out, flocked: the lock lives as long as this process (or lock_out's next call)


class CheckpointStateError(ValueError):
    """A trainer_state.pt that cannot be used."""


def checkpoints(out):
    """The complete checkpoint folders in out, oldest first. Complete: named checkpoint-STEP
    (a half-written one is checkpoint-STEP.tmp) and holding trainer_state.pt, written last."""
    found = [d for d in Path(out).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", d.name)]
    found = [d for d in found if (d / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda d: int(d.name.rsplit("-", 1)[1]))


def check_out_flags(args):
    """The --out flags that contradict each other or name nothing, before anything is read."""
    if args.resume and args.overwrite:
        fail("--resume continues the run in --out and --overwrite deletes it: pass only one of them")
    for flag in args.allow_change:
        if flag not in RUN_FLAGS:
            fail(
                f"--allow_change {flag}: not a flag that defines the run (those are {', '.join(RUN_FLAGS)}); "
                f"the others may change on --resume as they are"
            )
    if args.allow_change and not args.resume:
        fail("--allow_change applies to --resume only")


def lock_out(out):
    """Rank 0, first of all: --out is a folder this process can write, and no other run is using it. The
    lock is an advisory flock on the --out folder itself (so the run adds no file of its own for it), which
    the kernel releases when this process ends, however it ends: a SIGKILLed run leaves no stale lock."""
    global _lock
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointStateError(f"--out {out}: is a file, not a folder")
    if _lock is not None:  # an earlier run in this process (the demo, tests) is over
        os.close(_lock)
        _lock = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        fd = os.open(out, os.O_RDONLY)
    except OSError as e:
        raise CheckpointStateError(f"--out {out}: cannot write there ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointStateError(
            f"--out {out} is in use by another run ({lock_holder(out)}); wait for it to end or choose another --out"
        ) from None
    _lock = fd


def lock_holder(folder):
    """'PID n' of the process holding a flock on folder, from the kernel's table of locks (Linux's
    /proc/locks: 'N: FLOCK ADVISORY WRITE PID MAJOR:MINOR:INODE 0 EOF'), or what is known."""
    inode = os.stat(folder).st_ino
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and fields[-3].endswith(f":{inode}"):
                    return f"PID {fields[-4]}"
    except (OSError, IndexError):
        pass
    return "PID unknown"


def own_outputs(out):
    """What an earlier run left in out: its folders (checkpoint-STEP, final) and files, by name."""
    out = Path(out)
    folders = sorted(p for p in out.iterdir() if p.is_dir() and re.fullmatch(OWN_FOLDERS, p.name))
    return folders, [out / name for name in OWN_FILES if (out / name).is_file()]


def not_ours(folder):
    """Why folder is not one this project wrote (no MARKER in it, or a file it never writes there, a user's
    paper.tex), or None: a run deletes or replaces only its own."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        return f"{folder.name}/ was not written by this project (no {MARKER} inside)"
    for p in sorted(folder.iterdir()):
        if p.name not in FOLDER_ENTRIES and not re.fullmatch(SHARD, p.name):
            return f"{folder.name}/{p.name} was not written by this project"
    return None


def check_out(out, resume, overwrite):
    """Rank 0, holding the lock, before anything is deleted: crash leftovers of our own are repaired; a new
    run into the folder of an earlier one is refused unless resume or overwrite; a folder the run would
    delete or replace (--overwrite, save_total_limit, final/) holds only what this project writes; and no
    folder of someone else's has a name a save needs."""
    out = Path(out)
    clean_stale(out, OWN_FOLDERS)
    folders, _ = own_outputs(out)
    if folders and not (resume or overwrite):
        names = ", ".join(p.name for p in folders[:3])
        raise CheckpointStateError(
            f"--out {out} already holds a run ({names}); pass --resume to continue it or --overwrite to replace it"
        )
    for folder in folders:
        if why := not_ours(folder):
            raise CheckpointStateError(
                f"--out {out}: {why}, and the run would delete or replace it with {folder.name}/; move it out of --out"
            )
    for p in sorted(out.iterdir()):
        name, dot, suffix = p.name.rpartition(".")
        if dot and suffix in ("tmp", "old") and re.fullmatch(OWN_FOLDERS, name):
            raise CheckpointStateError(
                f"--out {out}: {p.name} was not written by this project (no {MARKER} "
                f"inside), and a save needs that name; move it away"
            )


def clear_out(out):
    """--overwrite, once every flag, the model folder and the data are checked: delete what the earlier
    run wrote (check_out made sure that is all its folders hold)."""
    folders, files = own_outputs(out)
    for p in folders:
        shutil.rmtree(p)
    for p in files:
        p.unlink()


def write_args(out, args, world, resumed=None):
    """OUT/args.json: the flags in force, the torch version, the world size, and the run's history:
    resumed = (step, {flag: [checkpoint's value, this run's]}) on a resume adds an entry to the history
    of the earlier args.json (the changes undone in reverse give the flags the run started with)."""
    path = Path(out) / "args.json"
    history = []
    if resumed is not None:
        step, changed = resumed
        try:
            history = [h for h in json.loads(path.read_text())["history"] if h["resumed_at"] < step]
        except (OSError, ValueError, KeyError, TypeError):  # no args.json yet, or one older than the history
            history = []
        history.append({"resumed_at": step, "world_size": world, "changed": changed})
    record = {**vars(args), "torch_version": torch.__version__, "world_size": world, "history": history}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def rng_state(generators):
    """This process's random state, as tensors, lists and numbers only (no pickled objects)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generators):
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out, step, parallel, optimizer, trainer_state, generators, keep):
    """OUT/checkpoint-STEP/, complete or not at all. Collective: every rank contributes its RNG state
    (and under FSDP its shards); rank 0 writes trainer_state.pt last, then renames the folder.
    Keeps the newest `keep` checkpoints (0: all)."""
    state = {**trainer_state, "step": step, "rng": all_gather(rng_state(generators))}
    master = parallel.rank == 0
    with saving(out, f"checkpoint-{step}") as tmp:
        parallel.save(tmp, optimizer, source_dir=trainer_state["args"]["model"])
        if master:
            torch.save(state, tmp / "trainer_state.pt")
            crash_point()
    if master and keep > 0:
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


@contextmanager
def saving(out, name):
    """shared_atomic_dir(OUT/name), where a save that fails for want of space or permission (a full disk,
    a quota, --out made read-only) ends in one line naming the cause and the newest complete checkpoint;
    the temporary folder is removed, so nothing earlier is touched."""
    try:
        with shared_atomic_dir(Path(out) / name) as tmp:
            try:
                yield tmp
            except Exception as e:
                cause = disk_error(e, tmp)
                if cause is None:
                    raise
                raise cause from e
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        newest = checkpoints(out)
        fail(
            f"saving {Path(out) / name} failed: {DISK_ERRORS[e.errno]} ({errno.errorcode[e.errno]}); the newest "
            f"complete checkpoint is {newest[-1] if newest else 'none (nothing saved yet)'}"
            + (", and --resume continues from it" if newest else "")
        )


def disk_error(e, folder):
    """e as an OSError with the errno of a lack of space or permission, or None when it is something else.
    torch.save reports a failed write as a RuntimeError, safetensors as a SafetensorError, neither with its
    errno, so then the folder being written is asked: under 1 MiB free means the write filled the disk."""
    for cause in (e, e.__cause__, e.__context__):
        if isinstance(cause, OSError) and cause.errno in DISK_ERRORS:
            return cause
    try:
        code = errno.ENOSPC if shutil.disk_usage(folder).free < 2**20 else None
        code = code or (errno.EACCES if not os.access(folder, os.W_OK) else None)
    except OSError:
        return None
    return OSError(code, os.strerror(code)) if code else None


def load_state_file(path, what="a checkpoint file", mmap=False):
    """A torch.save file read without unpickling any object (mmap: without reading its tensors yet)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointStateError(f"{path}: missing") from None
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # a well-formed pickle that names a function or class to call
            raise CheckpointStateError(
                f"{path}: refusing to load it: it holds pickled objects that could run code "
                f"(a checkpoint written by something else?)"
            ) from None
        raise CheckpointStateError(f"{path}: unreadable (not {what})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointStateError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None


def load_trainer_state(folder):
    """trainer_state.pt of a checkpoint, read without unpickling any object."""
    return load_state_file(Path(folder) / "trainer_state.pt", "a checkpoint file")


def check_checkpoint_files(folder, fsdp):
    """Every other file a resume reads from folder, checked without reading the tensors: the model's
    safetensors headers against config.json (a truncated or missing shard is caught there), and the
    optimizer state: optimizer.pt opened memory-mapped (a truncated zip has no central directory), or
    under --fsdp the metadata and shard files of sharded/."""
    try:
        check_pretrained(folder)
    except (OSError, ValueError) as e:
        raise CheckpointStateError(str(e)) from None
    if fsdp:
        sharded = Path(folder) / "sharded"
        if not (sharded / ".metadata").is_file() or not list(sharded.glob("*.distcp")):
            raise CheckpointStateError(f"{sharded}: missing or incomplete (no .metadata or no *.distcp file)")
    else:
        load_state_file(Path(folder) / "optimizer.pt", "an optimizer state", mmap=True)


def resume_point(out, log):
    """(folder, trainer state) of the newest usable checkpoint in out, or (None, None) when there is
    none yet. A checkpoint with any file unreadable or missing (a truncated copy, a full disk, a deleted
    shard) falls back to the one before it, saying so; when none is usable, that is an error, and so is
    a file that would run code."""
    found = checkpoints(out)
    for folder in reversed(found):
        try:
            state = load_trainer_state(folder)
            check_checkpoint_files(folder, state["args"].get("fsdp", False))
            return folder, state
        except CheckpointStateError as e:
            if "refusing" in str(e):
                raise
            log(f"--resume: {e}; trying the checkpoint before it")
    if found:
        raise CheckpointStateError(
            f"--resume: no usable checkpoint in {out} (see above); start afresh with --overwrite"
        )
    return None, None


def _flag(value):
    """A flag's value as it is typed."""
    return "(unset)" if value is None else " ".join(map(str, value)) if isinstance(value, list) else str(value)


def check_resumable(state, args, folder):
    """A checkpoint continues only the run that wrote it: every flag of RUN_FLAGS as it was, unless named in
    --allow_change, and the same optimizer-state layout (one file, or DCP shards under --fsdp). Returns
    {flag: [checkpoint's value, this run's]} of the changes let through."""
    saved = state["args"]
    if saved["fsdp"] != args.fsdp:
        fail(
            f"--resume: {folder} was written {'without' if args.fsdp else 'with'} --fsdp; resume the same way, "
            f"or start a new run from its weights with --model {folder} (AdamW state starts afresh)"
        )
    changed = {k: [saved[k], getattr(args, k)] for k in RUN_FLAGS if k in saved and saved[k] != getattr(args, k)}
    refused = [k for k in changed if k not in args.allow_change]
    if refused:
        diffs = ", ".join(f"--{k} {_flag(saved[k])} there, {_flag(getattr(args, k))} now" for k in refused)
        fail(
            f"--resume: {folder} was trained with other flags ({diffs}); resume with its flags, or pass "
            f"--allow_change {' '.join(refused)} to continue with the new ones from step {state['step']} "
            f"(args.json records the change)"
        )
    return changed


def data_fingerprint(groups):
    """sha256 of the tokenized training groups (prompt and response ids, scores), in order: a resume
    finds out whether the data changed since the checkpoint even where the number of groups did not.
    All the groups of a data.TokenizedSet (train.py's) are hashed from its arrays (TokenizedSet.fingerprint)."""
    whole = getattr(groups[0], "data", None) if len(groups) else None
    if whole is not None and groups is whole.groups:
        return whole.fingerprint()
    h = hashlib.sha256()
    for g in groups:
        for ids in [g.prompt_ids, *g.response_ids]:
            h.update(np.asarray(ids, dtype=np.int64).tobytes() + b";")
        h.update(np.asarray(g.scores, dtype=np.float64).tobytes() + b"|")
    return h.hexdigest()


def check_same_data(state, groups, args, folder):
    """The training groups are those the checkpoint was trained on, unless --allow_change data."""
    if "data_sha256" in state and "data" not in args.allow_change and data_fingerprint(groups) != state["data_sha256"]:
        then = state["loader"]["num_groups"]
        how = f"{len(groups)} groups now, {then} then" if then != len(groups) else "other tokens or scores"
        fail(
            f"--resume: {' '.join(args.data)} is not the data {folder} was trained on (edited since?): {how}; "
            f"restore it, or pass --allow_change data to continue on the new data"
        )


class Preemption:
    """SIGTERM, what Slurm, Kubernetes and most schedulers send some time before they kill, taken as a
    request: the loop finishes its optimizer step, saves a checkpoint and exits (train.py). A second
    SIGTERM exits at once, as the default action would. restore() puts the previous handler back."""

    def __init__(self, loud=True):
        self.requested, self.loud = False, loud
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.requested = True
        if self.loud:  # os.write: print could be inside another write to the same stream right now
            os.write(2, b"SIGTERM: finishing this step, then saving a checkpoint (a second SIGTERM stops at once)\n")

    def agreed(self, device):
        """Collective, once per step: whether any rank was asked to stop, so that all stop after the same step
        (a scheduler's signals reach the ranks at slightly different times)."""
        return all_reduce_sum([float(self.requested)], device)[0] > 0

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


def trim_metrics(out, step):
    """Drop the records after step from OUT/metrics.jsonl (they are about to be logged again);
    step None drops them all (a resumed run that had no checkpoint yet starts over)."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if step is not None and json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by the crash
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
