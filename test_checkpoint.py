"""
Runs that never lose work (checkpoint.py, train.py): a used --out, a process killed at every
point of a save, an honest metrics.jsonl after resume, no unpickling, and one-line errors for bad
flags, devices and model folders, each checked against an uninterrupted run or the file it names.

    python -m pytest test_checkpoint.py -q
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import mppo
from checkpoint import checkpoints
from conftest import HERE, common, records, run, run_cli, weights
from hf_format import MARKER

CRASH_RUN = {
    "--loss": "pair_single",
    "--max_steps": 4,
    "--save_every": 2,
    "--save_total_limit": 3,
}  # checkpoint-2, final/
FULL_RUN = {**CRASH_RUN, "--max_steps": 5}  # checkpoint-2, checkpoint-4, final/


@pytest.fixture(scope="module")
def crashless(setup, tmp_path_factory):
    """An uninterrupted run of 4 Pair-Single steps with checkpoint-2 (Pair-Single draws random
    negatives, so exact resume needs the RNG state too)."""
    out = tmp_path_factory.mktemp("crashless") / "out"
    run(*common(setup, out, **CRASH_RUN))
    return out


@pytest.fixture(scope="module")
def full(setup, tmp_path_factory):
    """An uninterrupted run of 5 Pair-Single steps with checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("full") / "out"
    run(*common(setup, out, **FULL_RUN))
    return out


def test_used_out_is_refused_before_any_work(setup, full, tmp_path):
    """A new run into a folder that holds a run stops at once, naming --resume and --overwrite, and
    leaves the earlier run as it was; --overwrite replaces it."""
    out = tmp_path / "o"
    shutil.copytree(full, out)
    before = sorted(os.listdir(out))
    r = run_cli(*common(setup, out, **FULL_RUN))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --out") and "--resume" in last and "--overwrite" in last
    assert sorted(os.listdir(out)) == before and "training" not in r.stdout
    run(*common(setup, out, **{**FULL_RUN, "--max_steps": 1, "--save_every": 0}), "--overwrite")
    assert sorted(os.listdir(out)) == ["args.json", "final", "metrics.jsonl"]
    assert [r["step"] for r in records(out, "train")] == [1]


def test_resume_without_checkpoint_starts_from_model(setup, tmp_path):
    """--resume into an empty --out trains from --model, as a plain run would: same weights."""
    run(*common(setup, tmp_path / "a", **{"--loss": "pair_mnm", "--max_steps": 2}))
    run(*common(setup, tmp_path / "b", **{"--loss": "pair_mnm", "--max_steps": 2}), "--resume")
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_args_json_records_the_run(setup, tmp_path):
    """OUT/args.json holds every flag with its resolved default, the torch version and world size."""
    run(*common(setup, tmp_path / "a", **{"--loss": "pair_mnm", "--max_steps": 1}))
    saved = json.loads((tmp_path / "a" / "args.json").read_text())
    assert saved["loss"] == "pair_mnm" and saved["max_steps"] == 1 and saved["adam_betas"] == [0.9, 0.999]
    assert saved["torch_version"] == torch.__version__ and saved["world_size"] == 1


def test_killed_at_every_point_of_a_save_resumes_bit_identical(setup, crashless, tmp_path):
    """SIGKILL at each successive crash point (model.crash_point: after every file written and around
    every rename) of the save of checkpoint-2, and at the first points of final/'s: the newest
    complete checkpoint is usable, --resume ends with exactly the weights of the uninterrupted run,
    metrics.jsonl holds every step once, and no temporary folder is left."""
    killed, after_checkpoint = [], 0
    for first in range(1, 60, 2):  # two runs at a time on two cores
        procs = []
        for k in (first, first + 1):
            out = tmp_path / f"k{k}"
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MPPO_CRASH_AFTER": str(k)}
            cmd = [sys.executable, os.path.join(HERE, "train.py"), *map(str, common(setup, out, **CRASH_RUN))]
            procs.append((k, out, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        for k, out, p in procs:
            assert p.wait(timeout=600) in (0, -signal.SIGKILL), k
            if p.returncode == -signal.SIGKILL:
                killed.append((k, out))
                after_checkpoint += (out / "checkpoint-2" / "trainer_state.pt").is_file()
        if after_checkpoint >= 2:  # killed twice more once checkpoint-2 was complete: inside final/'s save
            break
    assert len(killed) >= 8  # the model's files, the trainer state and the renames of one save
    end = weights(crashless / "final")
    for k, out in killed:
        run(*common(setup, out, **CRASH_RUN), "--resume")
        got = weights(out / "final")
        assert all(torch.equal(end[n], got[n]) for n in end), f"killed at crash point {k}"
        steps = [r["step"] for r in records(out, "train")]
        assert steps == [1, 2, 3, 4], (k, steps)
        assert not [p for p in os.listdir(out) if "tmp" in p or "old" in p], (k, os.listdir(out))


def test_stale_temporary_folders_are_removed(setup, full, tmp_path):
    """Leftovers of an earlier crash (checkpoint-N.tmp holding hf_format.MARKER, as atomic_dir makes it)
    are removed when a run starts in that --out, and never renamed over."""
    out = tmp_path / "o"
    shutil.copytree(full, out)
    shutil.rmtree(out / "final")
    (out / "checkpoint-4.tmp").mkdir()
    (out / "checkpoint-4.tmp" / MARKER).write_text("")
    (out / "checkpoint-4.tmp" / "model-00001-of-00001.safetensors").write_text("x")
    run(*common(setup, out, **FULL_RUN), "--resume")
    assert sorted(p for p in os.listdir(out) if not p.startswith("checkpoint-")) == [
        "args.json",
        "final",
        "metrics.jsonl",
    ]
    assert not (out / "checkpoint-4.tmp").exists()
    end, got = weights(full / "final"), weights(out / "final")
    assert all(torch.equal(end[n], got[n]) for n in end)


def test_pickle_that_would_run_code_is_refused(setup, full, tmp_path):
    """A trainer_state.pt whose pickle calls os.system is refused in one line, and the call never runs."""
    out = tmp_path / "o"
    shutil.copytree(full, out)
    shutil.rmtree(out / "final")
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": 4, "evil": Evil()}, out / "checkpoint-4" / "trainer_state.pt")
    r = run_cli(*common(setup, out, **FULL_RUN), "--resume")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "checkpoint-4/trainer_state.pt" in last and "refusing" in last
    assert not marker.exists()


def test_truncated_trainer_state_falls_back(setup, full, tmp_path):
    """A truncated trainer_state.pt in the newest checkpoint: --resume says so, continues from the one
    before and still ends bit-identical; with no readable checkpoint at all it stops in one line."""
    out = tmp_path / "o"
    shutil.copytree(full, out)
    shutil.rmtree(out / "final")
    state = out / "checkpoint-4" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    r = run_cli(*common(setup, out, **FULL_RUN), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        "checkpoint-4/trainer_state.pt: unreadable" in r.stdout
        and "resumed from" in r.stdout
        and "checkpoint-2" in r.stdout
    )
    end, got = weights(full / "final"), weights(out / "final")
    assert all(torch.equal(end[n], got[n]) for n in end)
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        (out / ckpt / "trainer_state.pt").write_bytes(b"not a checkpoint")
    r = run_cli(*common(setup, out, **FULL_RUN), "--resume")
    assert (
        r.returncode == 1
        and "Traceback" not in r.stderr
        and "no usable checkpoint" in r.stderr.strip().splitlines()[-1]
    )


def test_nan_mid_run_stops_with_the_checkpoint_intact(setup, crashless, tmp_path, monkeypatch):
    """A loss that turns NaN at step 3 stops the run before the weights change, in one line; the
    checkpoint of step 2 is intact, and --resume (the fault gone) ends as the uninterrupted run."""
    out = tmp_path / "o"
    calls = {"n": 0}
    clean = mppo.LOSSES["pair_single"]

    def poisoned(logps, scores, mask=None, generator=None):
        calls["n"] += 1
        loss = clean(logps, scores, mask, generator=generator)
        return loss * float("nan") if calls["n"] > 8 else loss  # 4 micro-batches a step: step 3 onwards

    monkeypatch.setitem(mppo.LOSSES, "pair_single", poisoned)
    with pytest.raises(SystemExit, match="step 3: the gradient norm is nan"):
        run(*common(setup, out, **CRASH_RUN))
    monkeypatch.setitem(mppo.LOSSES, "pair_single", clean)
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2"]
    run(*common(setup, out, **CRASH_RUN), "--resume")
    end, got = weights(crashless / "final"), weights(out / "final")
    assert all(torch.equal(end[n], got[n]) for n in end)


def test_evaluation_never_changes_the_run(setup, tmp_path):
    """Pair-Single with evaluation every step (its own negatives drawn too) ends with the same
    weights as without evaluation."""
    run(*common(setup, tmp_path / "a", **{"--loss": "pair_single", "--max_steps": 3}))
    run(
        *common(
            setup,
            tmp_path / "b",
            **{"--loss": "pair_single", "--max_steps": 3, "--eval_data": setup["data"], "--eval_every": 1},
        )
    )
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(records(tmp_path / "b", "eval")) == 4  # steps 0, 1, 2 and the final one


def test_ctrl_c_is_one_line_naming_the_checkpoint(setup, tmp_path):
    """SIGINT during training: exit without a traceback, one line naming the checkpoint --resume would use."""
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = common(setup, out, **{"--loss": "pair_mnm", "--max_steps": 100000, "--save_every": 1, "--log_every": 1000})
    p = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "train.py"), *map(str, argv)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not checkpoints(out) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert (
        last.startswith("error: interrupted at step")
        and "--resume would continue from" in last
        and "checkpoint-" in last
    )


def bad_model(setup, tmp_path, fault):
    """A copy of setup's model folder with one fault."""
    model = tmp_path / "model"
    shutil.copytree(setup["model"], model)
    config = json.loads((model / "config.json").read_text())
    if fault == "config_json":
        (model / "config.json").write_text('{"hidden_size": 64,')
    elif fault == "hidden_act":
        (model / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    elif fault == "hidden_size_str":
        (model / "config.json").write_text(json.dumps({**config, "hidden_size": "64"}))
    elif fault == "truncated_weights":
        shard = next(p for p in model.iterdir() if p.suffix == ".safetensors")
        shard.write_bytes(shard.read_bytes()[:-1000])
    elif fault == "tokenizer_json":
        (model / "tokenizer.json").write_text((model / "tokenizer.json").read_text()[:500])
    return model


@pytest.mark.parametrize(
    "fault, names",
    [
        ("config_json", "config.json"),
        ("hidden_act", "hidden_act"),
        ("hidden_size_str", "hidden_size"),
        ("truncated_weights", ".safetensors"),
        ("tokenizer_json", "tokenizer.json"),
    ],
)
def test_model_folder_faults_are_one_line_before_any_data_work(setup, tmp_path, fault, names):
    """Each fault in the model folder: exit 1, one line naming the file and key, no traceback, and
    nothing read from the data yet (the data summary is never printed)."""
    model = bad_model(setup, tmp_path, fault)
    r = run_cli(*common(setup, tmp_path / "o", **{"--model": model, "--max_steps": 1}))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and names in last and str(model) in last, last
    assert "groups" not in r.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "nan"], "--lr nan"),
        (["--log_every", "0"], "--log_every 0"),
        (["--chunk_size", "0"], "--chunk_size 0"),
        (["--device", "gpu"], "--device gpu"),
        (["--max_steps", "-1"], "--max_steps -1"),
        (["--epochs", "0", "--max_steps", "0"], "--epochs 0"),
        (["--dtype", "float16"], "bfloat16"),
        (["--device", "cuda"], "no CUDA"),
        (["--out", "FILE"], "is a file"),
        (["--out", "FILE/sub"], "cannot write there"),
    ],
)
def test_bad_flags_fail_in_one_line_before_loading(setup, tmp_path, flags, message):
    """Bad flags: exit 1 with one line naming the flag, before any data or model is read."""
    if torch.cuda.is_available() and "cuda" in flags:
        pytest.skip("this machine has CUDA")
    (tmp_path / "FILE").write_text("x")
    flags = [str(tmp_path / f) if f.startswith("FILE") else f for f in flags]
    r = run_cli(*common(setup, tmp_path / "o", **{"--max_steps": 1}), *flags)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert "groups" not in r.stdout
