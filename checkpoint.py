"""
What a run writes into --out, and how it continues after a crash.

    OUT/args.json             every flag of the run (defaults resolved), torch version, world size
    OUT/metrics.jsonl         one JSON record per log step and per evaluation
    OUT/checkpoint-STEP/      a Hugging Face model folder (float32, what exact resume needs), the
                              optimizer state (optimizer.pt, or sharded/ under --fsdp) and
                              trainer_state.pt: step, schedule, data position, every rank's RNG
    OUT/final/                the trained model, in the starting checkpoint's dtype by default

Guarantees:
  - a checkpoint folder appears complete or not at all: it is written as checkpoint-STEP.tmp and
    renamed (model.atomic_dir), so a process killed at any moment leaves the newest complete
    checkpoint usable, and the leftovers are removed when a run next starts in this --out;
  - after --resume, metrics.jsonl is cut back to the checkpoint's step first, so every step is
    logged once;
  - nothing is unpickled: trainer_state.pt and optimizer.pt hold only tensors, numbers, strings,
    lists and dicts and are read with torch.load(weights_only=True); a file that would run code
    is refused;
  - a new run never writes over an earlier one: --out holding checkpoints or final/ is refused
    unless --resume (continue it) or --overwrite (delete its outputs first) is given.
"""

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from cli import fail
from hf_format import clean_stale, crash_point
from parallel import all_gather, barrier, shared_atomic_dir

OUTPUTS = ("args.json", "metrics.jsonl", "final")  # besides checkpoint-*: what --overwrite deletes


class CheckpointStateError(ValueError):
    """A trainer_state.pt that cannot be used."""


def checkpoints(out):
    """The complete checkpoint folders in out, oldest first. Complete: named checkpoint-STEP
    (a half-written one is checkpoint-STEP.tmp) and holding trainer_state.pt, written last."""
    found = [d for d in Path(out).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", d.name)]
    found = [d for d in found if (d / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda d: int(d.name.rsplit("-", 1)[1]))


def prepare_out(out, resume, overwrite):
    """Rank 0, before anything is loaded: --out must be a writable folder; a new run into the
    folder of an earlier one is refused unless resume or overwrite; crash leftovers are removed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointStateError(f"--out {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CheckpointStateError(f"--out {out}: cannot write there ({e.strerror})") from None
    clean_stale(out)
    earlier = [p.name for p in sorted(out.iterdir()) if p.name.startswith("checkpoint-") or p.name == "final"]
    if earlier and overwrite:
        for p in [out / name for name in OUTPUTS] + list(out.glob("checkpoint-*")):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    elif earlier and not resume:
        raise CheckpointStateError(f"--out {out} already holds a run ({', '.join(earlier[:3])}); "
                                   f"pass --resume to continue it or --overwrite to replace it")


def write_args(out, args, world):
    record = {**vars(args), "torch_version": torch.__version__, "world_size": world}
    with open(Path(out) / "args.json", "w") as f:
        json.dump(record, f, indent=2)


def rng_state(generators):
    """This process's random state, as tensors, lists and numbers only (no pickled objects)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state(), "generators": {k: g.get_state() for k, g in generators.items()}}
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
    with shared_atomic_dir(Path(out) / f"checkpoint-{step}") as tmp:
        parallel.save(tmp, optimizer, source_dir=trainer_state["args"]["model"])
        if master:
            torch.save(state, tmp / "trainer_state.pt")
            crash_point()
    if master and keep > 0:
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_trainer_state(folder):
    """trainer_state.pt of a checkpoint, read without unpickling any object."""
    path = Path(folder) / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # a well-formed pickle that names a function or class to call
            raise CheckpointStateError(f"{path}: refusing to load it: it holds pickled objects that could run code "
                                       f"(a checkpoint written by something else?)") from None
        raise CheckpointStateError(f"{path}: unreadable (not a checkpoint file)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointStateError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None


def resume_point(out, log):
    """(folder, trainer state) of the newest usable checkpoint in out, or (None, None) when there is
    none yet. An unreadable trainer_state.pt (a truncated copy, a full disk) falls back to the
    checkpoint before it; when none is readable, that is an error."""
    found = checkpoints(out)
    for folder in reversed(found):
        try:
            return folder, load_trainer_state(folder)
        except CheckpointStateError as e:
            if "refusing" in str(e):
                raise
            log(f"--resume: {e}; trying the checkpoint before it")
    if found:
        raise CheckpointStateError(f"--resume: no readable checkpoint in {out} (see above); start afresh with --overwrite")
    return None, None


def check_resumable(state, args, folder):
    """A checkpoint continues only the run that wrote it: same data, batch, seed and loss, and the
    same optimizer-state layout (one file, or DCP shards under --fsdp)."""
    for key in ("data", "batch_size", "seed", "loss"):
        if state["args"][key] != getattr(args, key):
            fail(f"--resume: --{key} is {getattr(args, key)!r} but {folder} was trained with {state['args'][key]!r}")
    if state["args"]["fsdp"] != args.fsdp:
        fail(f"--resume: {folder} was written {'without' if args.fsdp else 'with'} --fsdp; resume the same way, "
             f"or start a new run from its weights with --model {folder} (AdamW state starts afresh)")


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
