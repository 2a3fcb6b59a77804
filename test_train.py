"""
End-to-end tests of train.py on a tiny Llama and the demo's data, on CPU.

Each test says what it compares: a run against its own starting point (the loss falls and the
margin widens), two ways of running the same optimisation (2 DDP processes against 1, resumed
against uninterrupted, checkpointing against none), and train.py's output against transformers.

    python -m pytest test_train.py -q
"""

import os

import pytest
import torch

from conftest import LR, assert_same_training, common, records, run, run_cli, weights
from model import Llama

LOSS_NAMES = ["point_ce", "point_mse", "pair_single", "pair_mns", "pair_mnm", "pair_mcs", "pair_mcm", "list_mle"]


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_each_loss_lowers_loss_and_widens_margin(setup, tmp_path, loss):
    """Eight optimizer steps with each MPPO loss: the loss on the training groups falls and the
    margin p(chosen) - p(rejected) grows, compared with the same model before training."""
    out = tmp_path / loss
    run(*common(setup, out, **{"--loss": loss, "--max_steps": 8, "--eval_data": setup["data"], "--eval_every": 100}))
    before, after = records(out, "eval")
    assert before["step"] == 0 and after["step"] == 8
    assert after["loss"] < before["loss"]
    assert after["margin"] > before["margin"]


def test_metrics_are_logged(setup, tmp_path):
    """metrics.jsonl has every metric the docs promise, finite, at each log step."""
    out = tmp_path / "m"
    run(*common(setup, out, **{"--loss": "pair_mnm", "--max_steps": 2}))
    rows = records(out, "train")
    assert [r["step"] for r in rows] == [1, 2]
    keys = {
        "step",
        "epoch",
        "lr",
        "loss",
        "grad_norm",
        "p_chosen",
        "p_rejected",
        "margin",
        "pair_acc",
        "top1_acc",
        "no_pref_groups",
        "groups_per_s",
        "tokens_per_s",
        "peak_mem_gb",
        "elapsed_s",
        "eta_s",
    }
    assert keys <= set(rows[0])
    assert all(isinstance(v, (int, float)) and v == v for r in rows for k, v in r.items() if k != "split")


def test_ddp_two_processes_equal_one_process(setup, tmp_path):
    """2 gloo processes with 2 groups per micro-batch end with the same weights as 1 process
    with 4 per micro-batch, at the same global batch of 16 groups (DDP averages gradients;
    train.py scales each rank's loss so the sum over the global batch is what counts)."""
    args = common(setup, tmp_path / "x", **{"--loss": "pair_mnm", "--max_steps": 3})
    one = run_cli(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cli(*args, "--out", tmp_path / "two", "--micro_batch_size", 2, nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    assert a.keys() == b.keys()
    start = weights(setup["model"])
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training moved the weights
    assert_same_training(b, a, LR, steps=3)


def test_resume_is_bit_identical(setup, tmp_path):
    """A run of 6 steps writes checkpoint-3; a second run that only has checkpoint-3 (as if the
    first had died after writing it) resumes and ends with exactly the same weights. Pair-Single
    draws random negatives, so this also checks that the RNG state travels in the checkpoint."""
    args = common(
        setup,
        tmp_path / "full",
        **{"--loss": "pair_single", "--max_steps": 6, "--save_every": 3, "--save_total_limit": 5},
    )
    run(*args)
    full = tmp_path / "full"
    assert sorted(os.listdir(full)) == ["args.json", "checkpoint-3", "final", "metrics.jsonl"]
    cut = tmp_path / "cut"
    cut.mkdir()
    os.rename(full / "checkpoint-3", cut / "checkpoint-3")
    (cut / "checkpoint-9.tmp").mkdir()  # a half-written checkpoint must be ignored (and is removed)
    run(*args, "--out", cut, "--resume")
    a, b = weights(full / "final"), weights(cut / "final")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in records(cut, "train")] == [4, 5, 6]
    assert [r["loss"] for r in records(cut, "train")] == [r["loss"] for r in records(full, "train")][3:]


def test_save_total_limit_keeps_newest(setup, tmp_path):
    """With --save_total_limit 2, only the two newest checkpoints remain."""
    run(
        *common(
            setup,
            tmp_path / "s",
            **{"--loss": "pair_mnm", "--max_steps": 4, "--save_every": 1, "--save_total_limit": 2},
        )
    )
    assert sorted(os.listdir(tmp_path / "s")) == ["args.json", "checkpoint-2", "checkpoint-3", "final", "metrics.jsonl"]


def test_adam_betas_reach_the_optimizer(setup, tmp_path):
    """--adam_betas is what AdamW runs with (read back from the checkpoint's optimizer state), and
    it matters: the weights after two steps differ from those of the default betas."""
    run(*common(setup, tmp_path / "a", **{"--loss": "pair_mnm", "--max_steps": 2}))
    run(
        *common(setup, tmp_path / "b", **{"--loss": "pair_mnm", "--max_steps": 2, "--save_every": 1}),
        "--adam_betas",
        0.5,
        0.9,
    )
    state = torch.load(tmp_path / "b" / "checkpoint-1" / "optimizer.pt", weights_only=True)
    assert {tuple(g["betas"]) for g in state["param_groups"]} == {(0.5, 0.9)}
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_same_result(setup, tmp_path):
    """Recomputing activations in backward changes memory, not the optimisation: same weights."""
    run(*common(setup, tmp_path / "a", **{"--loss": "pair_mcm", "--max_steps": 3}))
    run(*common(setup, tmp_path / "b", **{"--loss": "pair_mcm", "--max_steps": 3}), "--gradient_checkpointing")
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=lambda report, k=k: f"{k}: {report}")


@pytest.mark.parametrize("flag", [("--layout", "padded"), ("--attn_impl", "segments")])
def test_other_layouts_same_result(setup, tmp_path, flag):
    """The naive padded layout (--layout padded) and packed rows with attention per segment train
    like the default (packed rows; for these short groups 'auto' means a dense-mask SDPA)."""
    run(*common(setup, tmp_path / "a", **{"--loss": "pair_mnm", "--max_steps": 3}))
    run(*common(setup, tmp_path / "b", **{"--loss": "pair_mnm", "--max_steps": 3, flag[0]: flag[1]}))
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert_same_training(b, a, LR, steps=3)


def test_checkpoint_loads_in_transformers(setup, tmp_path):
    """A checkpoint written by train.py loads in transformers' LlamaForCausalLM with the same logits."""
    transformers = pytest.importorskip("transformers")
    run(*common(setup, tmp_path / "t", **{"--loss": "pair_mnm", "--max_steps": 2, "--save_every": 1}))
    ckpt = tmp_path / "t" / "checkpoint-1"
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ours = Llama.from_pretrained(ckpt)
    ids = torch.randint(0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "case",
    [
        "unknown_loss",
        "missing_model",
        "missing_data",
        "nothing_usable",
        "batch_too_big",
        "bad_json",
        "flex_on_cpu",
        "bad_betas",
    ],
)
def test_bad_invocations_fail_in_one_line(setup, tmp_path, case):
    """Bad input ends with exit code != 0 and one line 'error: ...' that names the problem; no traceback."""
    data = setup["data"]
    if case == "nothing_usable":  # every group ties: no preference anywhere
        data = tmp_path / "ties.jsonl"
        data.write_text('{"prompt": "sort b a", "responses": ["a b", "b a"], "scores": [5, 5]}\n' * 4)
    if case == "bad_json":
        data = tmp_path / "bad.jsonl"
        data.write_text('{"prompt": "sort b a", "responses": ["a b", "b a"], "scores": [5, 1]}\n{"prompt": \n')
    argv = common(setup, tmp_path / "o", **{"--data": data, "--max_steps": 1})
    expect = {
        "unknown_loss": (["--loss", "dpo_nope"], "--loss"),
        "missing_model": (["--model", tmp_path / "nowhere"], "nowhere"),
        "missing_data": (["--data", tmp_path / "none.jsonl"], "none.jsonl"),
        "nothing_usable": ([], "ties.jsonl"),
        "batch_too_big": (["--batch_size", 1024], "1024"),
        "bad_json": ([], "bad.jsonl:2"),
        "flex_on_cpu": (["--attn_impl", "flex"], "--attn_impl flex needs CUDA"),
        "bad_betas": (["--adam_betas", 0.9, 1.5], "--adam_betas 0.9 1.5"),
    }[case]
    r = run_cli(*argv, *expect[0])
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr
    assert err[-1].startswith("error: ") and expect[1] in err[-1], r.stderr[-1000:]


@pytest.mark.parametrize(
    "fixture, extra",
    [
        ("canonical.jsonl", []),
        ("simpo.jsonl", []),
        ("ultrafeedback.json", []),
        ("pairwise.jsonl", []),
        ("rrhf.jsonl", []),
        ("nectar.jsonl", []),
        ("argilla_pairwise.jsonl", []),
        ("helpsteer2.jsonl", ["--score_field", "helpfulness"]),
    ],
)
def test_trains_a_step_on_each_data_layout(setup, tmp_path, fixture, extra):
    """python train.py on each real-shaped data file of testdata/, read as downloaded: one optimizer
    step runs and logs a finite loss (Pair-MNM; Parquet files and folders: test_data.py)."""
    from formats import read_groups

    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", fixture)
    score_field = extra[1] if extra else None
    n = len(read_groups(data, score_field=score_field)[0])
    out = tmp_path / "o"
    run(
        *common(
            setup,
            out,
            **{
                "--data": data,
                "--loss": "pair_mnm",
                "--max_steps": 1,
                "--batch_size": min(n, 2),
                "--micro_batch_size": 1,
            },
        ),
        *extra,
    )
    (step,) = records(out, "train")
    assert step["step"] == 1 and step["loss"] == step["loss"]


def test_help_shows_every_default(capsys):
    """`python train.py --help` prints each flag's default (argparse's defaults formatter), among
    them the AdamW betas, which are PyTorch's (0.9, 0.999)."""
    import re

    import train

    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = capsys.readouterr().out
    text = " ".join(help_text.split())
    for shown in ("(default: [0.9, 0.999])", "(default: pair_mnm)", "(default: 128)", "(default: out/run)"):
        assert shown in text, shown
    options = help_text[help_text.index("options:") :]
    entries = re.split(r"^  (?=--)", options, flags=re.M)[1:]  # one entry per flag: its line(s) and help
    entries = [e for e in entries if not e.startswith("--help")]
    assert len(entries) > 40
    for entry in entries:
        assert "(default: " in " ".join(entry.split()), entry


def test_readme_metrics_table_matches_the_records(setup, tmp_path):
    """The field names in the README's metrics table are exactly the keys train.py writes to
    metrics.jsonl (train and eval records), so the table cannot drift from the code."""
    import re

    out = tmp_path / "m"
    run(
        *common(
            setup, out, **{"--loss": "pair_mnm", "--max_steps": 1, "--eval_data": setup["data"], "--eval_generate": 2}
        )
    )
    written = {k for r in records(out) for k in r} - {"split", "step"}
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    table = readme[readme.index("| field | meaning | TRL's name |") :]
    table = table[: table.index("\n\n")]
    documented = {name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert documented == written
