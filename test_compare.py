"""
compare.py end to end at its --quick size (every method, one seed, a smaller model), then its
pass-through mode on that run's starting model with a subprocess launcher. The table, runs.csv
and curves.csv are checked against the metrics.jsonl of each run they summarise.

    python -m pytest test_compare.py -q
"""

import csv
import json
import os
import sys

import pytest

import compare
from conftest import records


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    results = compare.main(["--quick", "--out", str(out)])
    return out, results


def test_quick_end_to_end(quick):
    """Every method trained once; results.md has the Table 2 rows in the paper's order with the
    paper's numbers beside; runs.csv holds each run's last eval record; curves.csv holds its train
    records step by step; the plot exists when matplotlib does, else the report says why not."""
    out, results = quick
    assert list(results) == compare.METHODS
    report = (out / "results.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0].strip("| *") for r in rows] == ["SFT (start)"] + [compare.NAMES[m] for m in compare.METHODS]
    assert "| **Pair-MNM** |" in report and "| 6.16 | 21.6 |" in report
    with open(out / "runs.csv") as f:
        runs = {(r["method"], r["seed"]): r for r in csv.DictReader(f)}
    with open(out / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    for method in compare.METHODS:
        run = out / "runs" / method / "seed-0"
        final = records(run, "eval")[-1]
        for key in ("top1_acc", "pair_acc", "gen_success"):
            assert float(runs[(method, "0")][key]) == pytest.approx(final[key], abs=1e-12)
        assert f"{final['top1_acc']:.3f}" in next(r for r in rows if compare.NAMES[method] in r)
        train = records(run, "train")
        mine = [c for c in curves if c["method"] == method]
        assert [int(c["step"]) for c in mine] == [r["step"] for r in train]
        assert [float(c["p_chosen"]) for c in mine] == pytest.approx([r["p_chosen"] for r in train], rel=1e-5)
    try:
        import matplotlib  # noqa: F401

        assert (out / "p_curves.png").stat().st_size > 1000
    except ImportError:
        assert "No plot: matplotlib is not installed" in report


def test_rerun_skips_finished_runs(quick):
    """Running the same comparison again trains nothing: each finished run is read back."""
    out, results = quick
    stamps = {m: os.path.getmtime(out / "runs" / m / "seed-0" / "metrics.jsonl") for m in compare.METHODS}
    again = compare.main(["--quick", "--out", str(out), "--report", str(out / "again")])
    assert again == results
    assert stamps == {m: os.path.getmtime(out / "runs" / m / "seed-0" / "metrics.jsonl") for m in compare.METHODS}


def test_pass_through_with_launcher(quick, tmp_path):
    """Real-model mode: --model and every train.py flag passed on, --method_flags for one method,
    each run a `python train.py` subprocess. The logged learning rate shows the method's flags
    arrived: --lr 2e-3 without warmup, after 1 of 2 cosine steps, is 2e-3 * 0.5 (train.py's default is 5e-7)."""
    out, _ = quick
    flags = ["--model", str(out / "sft" / "final"), "--data", str(out / "data" / "train.jsonl"), "--eval_data", str(out / "data" / "eval.jsonl"),
             "--batch_size", "32", "--micro_batch_size", "32", "--max_length", "64", "--max_prompt_length", "32", "--log_every", "1"]
    results = compare.main(["--methods", "simpo", "--seeds", "3", "--out", str(tmp_path), "--launcher", sys.executable,
                            "--method_flags", "simpo=--beta 1.5 --lr 2e-3 --warmup_ratio 0", *flags])
    assert list(results) == ["simpo"] and len(results["simpo"]) == 1
    train = records(tmp_path / "runs" / "simpo" / "seed-3", "train")
    assert len(train) == 2  # 64 groups, 32 per step, one epoch
    assert train[0]["lr"] == pytest.approx(1e-3)
    assert "| SimPO |" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit, match="--loss is set by compare.py"):
        compare.main(["--out", str(tmp_path), *flags, "--loss", "dpo"])
