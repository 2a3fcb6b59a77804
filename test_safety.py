"""
A run touches only what is its own (issue 22): --out cleanup and --overwrite leave a user's files of
the very names that used to be lost, --overwrite deletes only after everything is checked, a lock keeps
a second run out, SIGTERM (a real signal, to a real process) saves before exiting, --resume says which
flags changed and falls back past any damaged file, a full disk or a read-only --out is one line, and
the model folder, flags and data are checked against each other. Each test compares against the files
as they were before the run, or against an uninterrupted run.

    python -m pytest test_safety.py -q
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import eval as eval_py
import sample
import train
from cli import interruptible
from conftest import HERE, common, records, run, save_demo_llama, weights
from hf_format import MARKER

RUN = {"--loss": "pair_single", "--max_steps": 5, "--save_every": 2, "--save_total_limit": 3}  # checkpoint-2, -4


@pytest.fixture(scope="module")
def done(setup, tmp_path_factory):
    """A finished run: checkpoint-2, checkpoint-4, final/, args.json, metrics.jsonl, on its own copy of the data."""
    root = tmp_path_factory.mktemp("done")
    shutil.copy(setup["data"], root / "train.jsonl")
    s = {**setup, "data": root / "train.jsonl"}
    run(*common(s, root / "out", **RUN))
    return s, root / "out"


def copy_run(done, tmp_path, final=True):
    """A copy of the finished run (without final/ when final is False: a run that stopped after checkpoint-4)."""
    s, out = done
    shutil.copytree(out, tmp_path / "out")
    if not final:
        shutil.rmtree(tmp_path / "out" / "final")
    return s, tmp_path / "out"


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_files(out):
    """A user's folders and files, of exactly the names the old cleanup and --overwrite deleted or renamed."""
    for name in ("results.old", "cache.tmp", "runs.old", "checkpoint-notes", "final.tmp.keep"):
        (out / name).mkdir(parents=True)
        (out / name / "notes.txt").write_text(name)
    (out / "paper.tex").write_text("\\section{}")


def fails(match, *argv):
    """train.py in this process ends with one error line matching `match`."""
    with pytest.raises(SystemExit, match=match) as e:
        run(*argv)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# 1, 2: own names only; check everything, then delete


def test_user_folders_named_like_leftovers_survive_every_start(done, tmp_path):
    """results.old/, cache.tmp/, runs.old/ (no runs/ beside it) and checkpoint-notes/ in --out: a run that
    fails on a wrong --model, a run that succeeds and an --overwrite leave each as it was, and runs.old is
    never renamed to runs (the old cleanup deleted the first two and renamed the third)."""
    s, _ = done
    out = tmp_path / "out"
    user_files(out)
    before = snapshot(out)
    fails("no such checkpoint folder", *common(s, out, **{"--model": tmp_path / "typo", "--max_steps": 1}))
    assert snapshot(out) == before
    run(*common(s, out, **{"--max_steps": 1}))
    run(*common(s, out, **{"--max_steps": 1}), "--overwrite")
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before and not (out / "runs").exists()


def test_overwrite_deletes_nothing_until_everything_is_checked(done, tmp_path):
    """--overwrite with a typo in --model, a missing --data file or a broken data row: refused in one line,
    and the earlier run (checkpoints, final/, metrics) is byte for byte as it was."""
    s, out = copy_run(done, tmp_path)
    before = snapshot(out)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(open(s["data"]).read() + '{"prompt": "x", "responses": [\n')
    for flags, match in (
        ({"--model": tmp_path / "typo"}, "no such checkpoint folder"),
        ({"--data": tmp_path / "missing.jsonl"}, "missing.jsonl"),
        ({"--data": broken}, "broken.jsonl"),
    ):
        fails(match, *common(s, out, **{**RUN, **flags}), "--overwrite")
        assert snapshot(out) == before, flags


def test_overwrite_removes_only_its_own_outputs(done, tmp_path):
    """--overwrite removes the earlier run's checkpoint-N/, final/, args.json and metrics.jsonl, and nothing
    else: checkpoint-notes/, results.old/, paper.tex stay. A final/ holding a user's paper.tex, or without
    hf_format.MARKER (a model folder another program wrote), is not a folder this project wrote: refused,
    nothing deleted. --resume with --overwrite is refused."""
    s, out = copy_run(done, tmp_path)
    user_files(out)
    (out / "final" / "paper.tex").write_text("mine")
    before = snapshot(out)
    fails(r"final/paper.tex was not written by this project", *common(s, out, **RUN), "--overwrite")
    assert snapshot(out) == before
    fails(r"--resume .* --overwrite .* only one", *common(s, out, **RUN), "--overwrite", "--resume")
    assert snapshot(out) == before
    (out / "final" / "paper.tex").unlink()
    (out / "final" / MARKER).unlink()  # a model folder some other program wrote
    fails(f"final/ was not written by this project \\(no {MARKER} inside\\)", *common(s, out, **RUN), "--overwrite")
    assert snapshot(out) == {k: v for k, v in before.items() if k not in ("final/paper.tex", f"final/{MARKER}")}
    (out / "final" / MARKER).write_text("")
    run(*common(s, out, **{**RUN, "--max_steps": 1, "--save_every": 0}), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == [
        "args.json",
        "cache.tmp",
        "checkpoint-notes",
        "final",
        "final.tmp.keep",
        "metrics.jsonl",
        "paper.tex",
        "results.old",
        "runs.old",
    ]
    assert [r["step"] for r in records(out, "train")] == [1]


def test_leftover_of_our_name_without_marker_is_refused(done, tmp_path):
    """A final.tmp/ or checkpoint-4.old/ that holds no hf_format.MARKER was not made by a save: a run
    needing that name refuses in one line instead of deleting it; with the marker it is repaired."""
    s, out = copy_run(done, tmp_path, final=False)
    (out / "final.tmp").mkdir()
    (out / "final.tmp" / "draft.txt").write_text("mine")
    fails("final.tmp was not written by this project", *common(s, out, **RUN), "--resume")
    assert (out / "final.tmp" / "draft.txt").read_text() == "mine"
    (out / "final.tmp" / MARKER).write_text("")
    (out / "final.tmp" / "draft.txt").unlink()
    run(*common(s, out, **RUN), "--resume")
    assert not (out / "final.tmp").exists() and (out / "final" / "config.json").is_file()


# ----------------------------------------------------------------------------------------------
# 3: a lock on --out


def test_second_run_into_a_locked_out_is_refused_naming_the_pid(done, tmp_path):
    """A process holding --out's lock (checkpoint.lock_out, as a running train.py does): a run into the
    same --out is refused in one line naming that PID (from the kernel's table of locks), and writes
    nothing; once the holder is SIGKILLed the kernel has released the lock and a run goes ahead."""
    s, _ = done
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, checkpoint; checkpoint.lock_out(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(600)",
            str(out),
        ],
        cwd=HERE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        fails(f"in use by another run \\(PID {holder.pid}", *common(s, out, **{"--max_steps": 1}))
        assert not list(out.iterdir())
    finally:
        holder.kill()
        holder.wait()
    run(*common(s, out, **{"--max_steps": 1}))
    assert (out / "final" / "config.json").is_file()


# ----------------------------------------------------------------------------------------------
# 4: SIGTERM


def start(s, out, **flags):
    """train.py as a process of its own, training for a long time (1000 steps) unless stopped."""
    argv = common(s, out, **{"--loss": "pair_single", "--max_steps": 1000, "--log_every": 1, **flags})
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "train.py"), *map(str, argv)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_steps(p, out, n):
    """Until metrics.jsonl holds n training records (or the process ended)."""
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline:
        path = out / "metrics.jsonl"
        lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
        if sum(line.endswith("\n") and '"split": "train"' in line for line in lines) >= n:  # whole lines only
            return
        time.sleep(0.1)
    raise AssertionError(f"no {n} steps: {p.poll()} {p.stderr.read()[-2000:] if p.poll() is not None else ''}")


def test_sigterm_saves_the_step_it_finished_and_names_resume(done, tmp_path, monkeypatch):
    """SIGTERM to a training process (no --save_every): it finishes its step N, writes checkpoint-N and exits 1
    with one line naming the folder and --resume; every step up to N is logged. checkpoint-N equals the
    checkpoint an uninterrupted run (in this process) saves at step N with --save_every N."""
    s, _ = done
    out = tmp_path / "out"
    p = start(s, out)
    wait_for_steps(p, out, 3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    step = [r["step"] for r in records(out, "train")][-1]
    folder = out / f"checkpoint-{step}"
    assert (
        last == f"error: stopped by SIGTERM after step {step}, saved in {folder}: run the same command with "
        "--resume to continue"
    )
    assert "SIGTERM: finishing this step" in err
    assert [c.name for c in checkpoint.checkpoints(out)] == [folder.name]
    assert [r["step"] for r in records(out, "train")] == list(range(1, step + 1))

    ref = tmp_path / "ref"
    real_step = train.train_step

    def stop_after(run_, groups, i, stats):  # the step after N: stop as Ctrl-C would, after checkpoint-N was saved
        if i == step:
            raise KeyboardInterrupt
        return real_step(run_, groups, i, stats)

    monkeypatch.setattr(train, "train_step", stop_after)
    fails(
        "interrupted at step",
        *common(s, ref, **{"--loss": "pair_single", "--max_steps": 1000, "--log_every": 1, "--save_every": step}),
    )
    a, b = weights(ref / f"checkpoint-{step}"), weights(folder)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = checkpoint.load_trainer_state(folder)
    assert state["step"] == step and state["loader"] == checkpoint.load_trainer_state(ref / folder.name)["loader"]


def test_second_sigterm_exits_at_once(done, tmp_path):
    """Two SIGTERMs: the first asks for a checkpoint after the step (it says so on stderr), the second, sent
    once that line is out, ends the process at once by the signal (exit -SIGTERM, no 'stopped' line).
    128 groups in micro-batches of 1 make a step long enough for the second signal to land inside it."""
    s, _ = done
    out = tmp_path / "out"
    p = start(s, out, **{"--batch_size": 128, "--micro_batch_size": 1})
    wait_for_steps(p, out, 1)
    p.send_signal(signal.SIGTERM)
    for line in p.stderr:  # what else the run says on stderr comes first
        if line.startswith("SIGTERM: finishing this step"):
            break
    assert line.startswith("SIGTERM: finishing this step"), line  # (the old code died at the first SIGTERM)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGTERM and "stopped by SIGTERM" not in err, (p.returncode, err[-2000:])


def children(pid):
    """PIDs of a process's children (Linux /proc)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(done, tmp_path):
    """torchrun with 2 processes (gloo), SIGTERM to one worker only: the ranks agree (an all-reduced flag
    each step) and save one checkpoint together, at the step the signalled rank finished; both exit 1."""
    s, _ = done
    out = tmp_path / "out"
    argv = common(s, out, **{"--loss": "pair_single", "--max_steps": 1000, "--log_every": 1})
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            os.path.join(HERE, "train.py"),
            *map(str, argv),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_steps(p, out, 2)
    workers = children(p.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0
    stopped = [line for line in err.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(stopped) == 2 and stopped[0] == stopped[1], err[-3000:]
    step = [r["step"] for r in records(out, "train")][-1]
    assert f"after step {step}," in stopped[0]
    assert [c.name for c in checkpoint.checkpoints(out)] == [f"checkpoint-{step}"]
    assert checkpoint.load_trainer_state(out / f"checkpoint-{step}")["world_size"] == 2


# ----------------------------------------------------------------------------------------------
# 5: resume compares the flags that define the run


def test_resume_with_a_changed_flag_is_refused_naming_each(done, tmp_path):
    """--resume --lr 5e-2 --seed 1 (the checkpoint was trained at 1e-3, seed 0): refused in one line naming
    both flags with both values; args.json is left as it was. --log_every may change freely."""
    s, out = copy_run(done, tmp_path, final=False)
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        run(*common(s, out, **{**RUN, "--lr": 5e-2, "--seed": 1, "--log_every": 3}), "--resume")
    msg = str(e.value)
    assert "--lr 0.001 there, 0.05 now" in msg and "--seed 0 there, 1 now" in msg and "--allow_change lr seed" in msg
    assert snapshot(out) == before


def test_allowed_change_is_applied_and_recorded(done, tmp_path):
    """--resume --lr 5e-2 --max_steps 8 --allow_change lr max_steps: the steps after checkpoint-4 follow the
    new schedule, lr_k = 5e-2 * (1 + cos(pi k / 8)) / 2 with no warmup (metrics.jsonl logs the lr after
    step k), the steps before it are untouched, and args.json holds the new values and the history:
    resumed at step 4, with both changes."""
    s, out = copy_run(done, tmp_path, final=False)
    old = {r["step"]: r["lr"] for r in records(out, "train")}
    run(*common(s, out, **{**RUN, "--lr": 5e-2, "--max_steps": 8}), "--resume", "--allow_change", "lr", "max_steps")
    new = {r["step"]: r["lr"] for r in records(out, "train")}
    assert [new[k] for k in (1, 2, 3, 4)] == [old[k] for k in (1, 2, 3, 4)]
    assert [new[k] for k in (5, 6, 7, 8)] == pytest.approx(
        [5e-2 * (1 + math.cos(math.pi * k / 8)) / 2 for k in (5, 6, 7, 8)], rel=1e-12, abs=1e-18
    )
    saved = json.loads((out / "args.json").read_text())
    assert saved["lr"] == 0.05 and saved["max_steps"] == 8
    assert saved["history"] == [
        {"resumed_at": 4, "world_size": 1, "changed": {"lr": [0.001, 0.05], "max_steps": [5, 8]}}
    ]


# ----------------------------------------------------------------------------------------------
# 6: fallback covers every file of a checkpoint


@pytest.mark.parametrize(
    "damage, named",
    [
        ("truncate optimizer.pt", "checkpoint-4/optimizer.pt: unreadable"),
        ("delete optimizer.pt", "checkpoint-4/optimizer.pt: missing"),
        ("truncate model", "truncated"),
        ("delete model", "is missing"),
    ],
)
def test_damaged_file_of_the_newest_checkpoint_falls_back(done, tmp_path, capsys, damage, named):
    """One file of checkpoint-4 truncated or deleted: --resume says so in one line, continues from
    checkpoint-2 and ends with exactly the uninterrupted run's weights."""
    s, out = copy_run(done, tmp_path, final=False)
    what, name = damage.split(" ", 1)
    path = out / "checkpoint-4" / ("model-00001-of-00001.safetensors" if name == "model" else name)
    path.unlink() if what == "delete" else path.write_bytes(path.read_bytes()[:-200])
    run(*common(s, out, **RUN), "--resume")
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--resume:")]
    assert len(said) == 1 and named in said[0] and "trying the checkpoint before it" in said[0], said
    end, got = weights(done[1] / "final"), weights(out / "final")
    assert all(torch.equal(end[k], got[k]) for k in end)


def test_optimizer_pt_that_would_run_code_is_refused(done, tmp_path):
    """An optimizer.pt whose pickle calls os.system: refused in one line, and the call never runs."""
    s, out = copy_run(done, tmp_path, final=False)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": Evil()}, out / "checkpoint-4" / "optimizer.pt")
    fails("checkpoint-4/optimizer.pt: refusing", *common(s, out, **RUN), "--resume")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# 7: a full disk, an unwritable --out


def test_disk_full_during_a_save_is_one_line(done, tmp_path):
    """--out on a tmpfs with room for two checkpoints (mounted in a user namespace): the third save
    fails with one line saying ENOSPC and naming checkpoint-2, the newest complete one, which loads."""
    s, _ = done
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"], capture_output=True, text=True
    )
    if probe.returncode:
        pytest.skip(f"cannot mount a tmpfs here (unshare -rm: {probe.stderr.strip()})")
    size = sum(f.stat().st_size for f in (done[1] / "checkpoint-2").rglob("*") if f.is_file())
    out, copy = tmp_path / "out", tmp_path / "copy"
    out.mkdir()
    argv = common(s, out, **{"--loss": "pair_single", "--max_steps": 20, "--save_every": 1, "--save_total_limit": 0})
    script = (
        f'mount -t tmpfs -o size={size * 5 // 2 // 1024}k tmpfs "$1" && "$2" {os.path.join(HERE, "train.py")} '
        f'{" ".join(map(str, argv))}; rc=$?; cp -r "$1" "$3"; exit $rc'
    )
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", out, sys.executable, copy],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: saving {out}/checkpoint-3 failed: no space left on the device (ENOSPC)"), last
    assert last.endswith(f"the newest complete checkpoint is {out}/checkpoint-2, and --resume continues from it")
    assert [c.name for c in checkpoint.checkpoints(copy)] == ["checkpoint-1", "checkpoint-2"]
    checkpoint.check_checkpoint_files(copy / "checkpoint-2", fsdp=False)
    assert checkpoint.load_trainer_state(copy / "checkpoint-2")["step"] == 2


def test_unwritable_out_during_a_save_is_one_line(done, tmp_path):
    """--out made read-only (chmod 555) while the run trains: the next save fails with one line saying
    EACCES and naming the newest complete checkpoint, which is intact. As root, the run drops the
    capability that ignores permissions (setpriv), as an ordinary user's process has none."""
    s, _ = done
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(HERE, "train.py")]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: permissions cannot be made to apply")
        cmd = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    argv = common(s, out, **{"--loss": "pair_single", "--max_steps": 1000, "--save_every": 1, "--log_every": 1})
    p = subprocess.Popen(
        cmd + list(map(str, argv)),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_steps(p, out, 2)
        out.chmod(0o555)
        _, err = p.communicate(timeout=300)
    finally:
        out.chmod(0o755)
    assert p.returncode == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "failed: permission denied (EACCES); the newest complete checkpoint is" in last, last
    newest = last.split("the newest complete checkpoint is ")[1].split(",")[0]
    assert newest == str(checkpoint.checkpoints(out)[-1])
    checkpoint.check_checkpoint_files(newest, fsdp=False)


# ----------------------------------------------------------------------------------------------
# 9, 10: the model folder, the flags and the data checked against each other


def test_tokenizer_larger_than_the_model_is_refused_before_out_is_written(done, tmp_path):
    """A model whose vocab_size (200) is below the tokenizer's largest id (the demo's 289): one line naming
    both, with nothing written into --out; the old code ended in an IndexError after writing args.json."""
    s, _ = done
    model = save_demo_llama(tmp_path / "small", vocab_size=200)
    out = tmp_path / "out"
    fails(
        r"tokenizer.json has token id 289, but config.json's vocab_size is 200",
        *common(s, out, **{"--model": model, "--max_steps": 1}),
    )
    assert not list(out.iterdir())


def test_max_length_past_the_model_is_a_warning(done, tmp_path, capsys):
    """--max_length 1000 on a model with max_position_embeddings 256: one warning line naming both (it runs,
    as transformers' LlamaForCausalLM runs such sequences), and training goes ahead."""
    s, _ = done
    run(*common(s, tmp_path / "out", **{"--max_length": 1000, "--max_steps": 1}))
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "--max_length 1000" in warned[0] and "max_position_embeddings 256" in warned[0]


@pytest.mark.parametrize(
    "flags, match",
    [
        ({"--max_prompt_length": 65}, "--max_prompt_length 65 is longer than --max_length 64"),
        ({"--eval_every": 2}, "--eval_every 2 evaluates on --eval_data, which is not given"),
        ({"--eval_generate": 4}, "--eval_generate 4 evaluates on --eval_data"),
        ({"--allow_change": "lr"}, "--allow_change applies to --resume only"),
        ({"--allow_change": "log_every"}, "--allow_change log_every: not a flag that defines the run"),
    ],
)
def test_contradicting_flags_are_refused(done, tmp_path, flags, match):
    """Flags that cannot all hold (the old code accepted each and silently did nothing or cut every prompt)."""
    s, _ = done
    fails(match, *common(s, tmp_path / "out", **{"--max_steps": 1, **flags}))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    "script, argv, match",
    [
        ("eval", ["--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),
        ("sample", ["--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),
        ("eval", ["--bootstrap", "-5"], "--bootstrap -5: must be 0 or more"),
        ("eval", ["--max_prompt_length", "4096"], "--max_prompt_length 4096 is longer than --max_length 2048"),
        ("eval", ["--model", "nowhere"], "--model nowhere: no such folder"),
        ("sample", ["--model", "nowhere"], "--model nowhere: no such folder"),
    ],
)
def test_eval_and_sample_share_trains_checks(done, script, argv, match):
    """eval.py and sample.py answer a CUDA device on a CPU machine, a negative --bootstrap and a missing
    --model with train.py's one line (cli.py), not an AssertionError, a TypeError or 'tokenizer.json: no such
    file'."""
    s, _ = done
    base = {"--model": str(s["model"]), **({"--data": str(s["data"])} if script == "eval" else {"--prompt": "hi"})}
    base.update(dict(zip(argv[::2], argv[1::2])))
    main = eval_py.main if script == "eval" else sample.main
    with pytest.raises(SystemExit, match=match):
        main([x for kv in base.items() for x in kv])


def test_ctrl_c_while_data_loads_is_one_line(done, tmp_path, monkeypatch):
    """KeyboardInterrupt while the data is read and tokenized (train.load_data): train.py's main ends in
    one line, and eval.py's / sample.py's entry points alike (cli.interruptible)."""
    s, _ = done

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "load_data", interrupted)
    with pytest.raises(SystemExit, match="^error: interrupted"):
        train.main([str(x) for x in common(s, tmp_path / "out", **{"--max_steps": 1})])
    monkeypatch.setattr(eval_py, "read_groups", interrupted)
    with pytest.raises(SystemExit, match="^error: interrupted"):
        interruptible(eval_py.main)(["--model", str(s["model"]), "--data", str(s["data"])])


@pytest.mark.parametrize("edit", ["one score", "one row fewer"])
def test_data_edited_in_place_before_resume_is_one_line(setup, tmp_path, edit):
    """The training file changed in place between checkpoint-2 and --resume (a score edited: as many groups
    as before; a row removed): refused in one line saying the data is not what the checkpoint was trained
    on (the old code: a ValueError traceback, or nothing at all when the count stayed)."""
    data, out = tmp_path / "train.jsonl", tmp_path / "out"
    shutil.copy(setup["data"], data)
    s = {**setup, "data": data}
    flags = {**RUN, "--max_steps": 3, "--save_every": 2}
    run(*common(s, out, **flags))
    shutil.rmtree(out / "final")
    lines = data.read_text().splitlines(keepends=True)
    if edit == "one score":
        row = json.loads(lines[0])
        row["scores"][0] += 0.5
        lines[0] = json.dumps(row) + "\n"
        how = "other tokens or scores"
    else:
        lines = lines[:-16]
        how = "112 groups now, 128 then"
    data.write_text("".join(lines))
    fails(f"is not the data .* was trained on \\(edited since\\?\\): {how}", *common(s, out, **flags), "--resume")
