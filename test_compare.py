"""
compare.py end to end at its --quick size (every method at two learning rates with one seed, a
smaller model), then its pass-through mode on that run's starting model with a subprocess
launcher, and its selection and paired-comparison rules on hand-made numbers. The chosen rate is
checked against each grid run's metrics.jsonl, the table against eval.py's scoring of each final
model on the test split, runs.csv and curves.csv against the runs they summarise.

    python -m pytest test_compare.py -q
"""

import csv
import os
import sys

import pytest

import compare
import eval as evaluation
from conftest import records


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    results = compare.main(["--quick", "--out", str(out)])
    return out, results


def test_choose_takes_the_best_validation_metric():
    """Hand-made validation metrics: the highest selection metric wins; equal ones are split by
    pairwise accuracy, then by the lower rate; a rate that lacks the metric never wins."""
    by_lr = {
        1e-4: {"gen_success": 0.30, "pair_acc": 0.9},
        3e-4: {"gen_success": 0.55, "pair_acc": 0.7},
        1e-3: {"gen_success": 0.50, "pair_acc": 0.99},
        3e-3: {"pair_acc": 1.0},
    }
    assert compare.choose(by_lr, "gen_success") == 3e-4
    assert compare.choose(by_lr, "pair_acc") == 3e-3
    tied = {
        1e-4: {"gen_success": 0.5, "pair_acc": 0.8},
        3e-4: {"gen_success": 0.5, "pair_acc": 0.9},
        1e-3: {"gen_success": 0.5, "pair_acc": 0.9},
    }
    assert compare.choose(tied, "gen_success") == 3e-4
    assert compare.choose({None: {"pair_acc": 0.5}}, "gen_success") is None


def test_widened_steps_past_the_edge():
    """The next rate past an edge is one grid step further (1e-4 * 1e-4 / 3e-4 = 3.33e-5;
    3e-3 * 3e-3 / 1e-3 = 9e-3); a best rate inside the grid, or a one-rate grid, widens nothing."""
    grid = [1e-4, 3e-4, 1e-3, 3e-3]
    assert compare.widened(grid, 1e-4) == pytest.approx(1e-4 / 3)
    assert compare.widened(grid, 3e-3) == pytest.approx(9e-3)
    assert compare.widened(grid, 3e-4) is None and compare.widened(grid, 1e-3) is None
    assert compare.widened([5e-7], 5e-7) is None


def test_paired_difference_and_t_test():
    """Differences (0.1, 0.2, 0.3): mean 0.2, std 0.1, t = 0.2 / (0.1 / sqrt 3) = 3.46 < 4.303
    (Student's t, 2 degrees of freedom, 95% two-sided): 3 of 3 seeds higher, yet not separated.
    Differences (0.1, 0.11, 0.12): t = 0.11 / (0.01 / sqrt 3) = 19.1: separated. One seed: never."""
    mean, std, wins, n, sep = compare.paired([0.6, 0.7, 0.8], [0.5, 0.5, 0.5])
    assert (mean, std, wins, n, sep) == (pytest.approx(0.2), pytest.approx(0.1), 3, 3, False)
    assert compare.paired([0.6, 0.61, 0.62], [0.5, 0.5, 0.5])[4] is True
    assert compare.paired([0.1, 0.2], [0.1, 0.2])[:4] == (0.0, 0.0, 0, 2)
    assert compare.paired([0.9], [0.1])[4] is False


def test_quick_end_to_end(quick):
    """Every method trained at both rates of the grid; the rate marked chosen in runs.csv is the
    best on validation by a naive scan of the grid runs' metrics.jsonl; results.md has the Table 2
    rows in the paper's order with the chosen rate and the paper's numbers; its numbers equal the
    runs' test.json, which equals eval.py's own scoring of the final model on the test split;
    curves.csv holds the chosen run's train records step by step; the plot exists when matplotlib
    does, else the report says why not."""
    out, results = quick
    assert list(results) == compare.METHODS
    report = (out / "results.md").read_text()
    table = report.split("## Learning rate")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0].strip("| *") for r in rows] == ["SFT (start)"] + [
        compare.NAMES[m] for m in compare.METHODS
    ]
    assert "| **Pair-MNM** |" in report and "| 6.16 | 21.6 |" in report and "DPO beta 0.1" in report
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    for method in compare.METHODS:
        grid = {}
        for lr in ("0.001", "0.003"):
            final = records(out / "runs" / method / f"lr-{lr}" / "seed-0", "eval")[-1]
            grid[lr] = (final["gen_success"], final["pair_acc"], -float(lr))
        best = max(grid, key=grid.get)
        mine = [r for r in runs if r["method"] == method]
        assert [r["lr"] for r in mine if r["chosen"] == "1"] == [best]
        run = out / "runs" / method / f"lr-{best}" / "seed-0"
        reference = evaluation.main(
            [
                "--model",
                str(run / "final"),
                "--data",
                str(out / "data" / "eval.jsonl"),
                "--bootstrap",
                "0",
                "--max_length",
                "64",
                "--max_prompt_length",
                "32",
                "--device",
                "cpu",
                "--dtype",
                "float32",
            ]
        )["metrics"]
        test = results[method][0]
        for key in ("top1_acc", "pair_acc", "p_chosen", "p_rejected"):
            assert test[key] == pytest.approx(reference[key], abs=1e-5)
        row = next(r for r in rows if r.split(" | ")[0].strip("| *") == compare.NAMES[method])
        cells = row.strip("|").split(" | ")
        assert cells[1] == best
        assert cells[2:7] == [
            f"{test[k]:.3f}" for k in ("gen_success", "pair_acc", "top1_acc", "p_chosen", "p_rejected")
        ]
        chosen = next(r for r in mine if r["chosen"] == "1")
        assert float(chosen["test_pair_acc"]) == pytest.approx(test["pair_acc"], abs=1e-12)
        assert float(chosen["valid_gen_success"]) == pytest.approx(grid[best][0], abs=1e-12)
        train = records(run, "train")
        mine_curves = [c for c in curves if c["method"] == method]
        assert [int(c["step"]) for c in mine_curves] == [r["step"] for r in train]
        assert [float(c["p_chosen"]) for c in mine_curves] == pytest.approx([r["p_chosen"] for r in train], rel=1e-5)
    try:
        import matplotlib  # noqa: F401

        assert (out / "p_curves.png").stat().st_size > 1000
    except ImportError:
        assert "No plot: matplotlib is not installed" in report


def test_rerun_skips_finished_runs(quick):
    """Running the same comparison again trains nothing: each finished run (and its test
    evaluation) is read back, and the results are the same."""
    out, results = quick
    files = sorted(out.glob("runs/*/lr-*/seed-0/metrics.jsonl")) + sorted(out.glob("runs/*/lr-*/seed-0/test.json"))
    assert len(files) == 2 * len(compare.METHODS) + len(compare.METHODS)
    stamps = [os.path.getmtime(f) for f in files]
    again = compare.main(["--quick", "--out", str(out), "--report", str(out / "again")])
    assert again == results
    assert stamps == [os.path.getmtime(f) for f in files]
    assert "0 of 22 runs trained by this command" in (out / "again" / "results.md").read_text()


def test_pass_through_with_launcher(quick, tmp_path):
    """Real-model mode: --model and every train.py flag passed on, --method_flags for one method
    (its --lr replaces the grid), each run a `python train.py` subprocess, no --test_data (the
    table reports the validation split). The logged learning rate shows the method's flags
    arrived: --lr 2e-3 without warmup, after 1 of 2 cosine steps, is 2e-3 * 0.5."""
    out, _ = quick
    flags = [
        "--model",
        str(out / "sft" / "final"),
        "--data",
        str(out / "data" / "train.jsonl"),
        "--eval_data",
        str(out / "data" / "valid.jsonl"),
        "--batch_size",
        "32",
        "--micro_batch_size",
        "32",
        "--max_length",
        "64",
        "--max_prompt_length",
        "32",
        "--log_every",
        "1",
    ]
    results = compare.main(
        [
            "--methods",
            "simpo",
            "--seeds",
            "3",
            "--out",
            str(tmp_path),
            "--launcher",
            sys.executable,
            "--method_flags",
            "simpo=--beta 1.5 --lr 2e-3 --warmup_ratio 0",
            *flags,
        ]
    )
    assert list(results) == ["simpo"] and len(results["simpo"]) == 1
    train = records(tmp_path / "runs" / "simpo" / "lr-0.002" / "seed-3", "train")
    assert len(train) == 2  # 64 groups, 32 per step, one epoch
    assert train[0]["lr"] == pytest.approx(1e-3)
    report = (tmp_path / "results.md").read_text()
    assert "| SimPO | 0.002 |" in report and "the validation split (no --test_data given)" in report
    with pytest.raises(SystemExit, match="--loss is set by compare.py"):
        compare.main(["--out", str(tmp_path), *flags, "--loss", "dpo"])
    with pytest.raises(SystemExit, match="--lr is set by compare.py for each run; use --lrs"):
        compare.main(["--out", str(tmp_path), *flags, "--lr", "1e-3"])
