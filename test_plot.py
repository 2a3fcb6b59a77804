"""
Tests of plot.py: the PNG of real train.py runs, the plotted series against metrics.jsonl, and the
one-line errors for folders and lines it cannot plot.

The runs are a tiny Llama (the demo's tokenizer, hidden 32, 1 layer) trained in-process for a few
Pair-MNM steps on 32 demo groups, with eval records. Run: python -m pytest -q test_plot.py
"""

import json
import os
import struct

import pytest

import plot
import train
from conftest import copy_demo_rows, save_demo_llama

try:
    import matplotlib  # noqa: F401
except ImportError:
    matplotlib = None
needs_matplotlib = pytest.mark.skipif(
    matplotlib is None, reason="plot.py draws with matplotlib (pip install -r requirements-plot.txt)"
)


def png_size(path):
    """(width, height) from a PNG's IHDR chunk, after checking the signature: an independent reader."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short train.py runs (seeds 0 and 1): 4 steps, logged every step, evaluated every 2."""
    root = tmp_path_factory.mktemp("plot")
    model = save_demo_llama(root / "init")
    data = copy_demo_rows("train.jsonl", 32, root / "train.jsonl")
    held_out = copy_demo_rows("eval.jsonl", 16, root / "eval.jsonl")
    folders = []
    for seed in (0, 1):
        out = root / f"seed{seed}"
        train.train(
            train.parse_args(
                [
                    str(a)
                    for a in (
                        "--model",
                        model,
                        "--data",
                        data,
                        "--eval_data",
                        held_out,
                        "--out",
                        out,
                        "--loss",
                        "pair_mnm",
                        "--max_steps",
                        4,
                        "--batch_size",
                        8,
                        "--micro_batch_size",
                        8,
                        "--lr",
                        1e-3,
                        "--max_length",
                        64,
                        "--max_prompt_length",
                        32,
                        "--log_every",
                        1,
                        "--eval_every",
                        2,
                        "--seed",
                        seed,
                    )
                ]
            )
        )
        folders.append(str(out))
    return folders


def plotted(fig):
    """{(panel title, legend label): (xs, ys)} of every line of the figure, read back from matplotlib."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            out[ax.get_title(), line.get_label()] = (list(line.get_xdata()), list(line.get_ydata()))
    return out


@needs_matplotlib
def test_one_run_png_and_series_equal_the_metrics_file(runs):
    """`python plot.py OUT` writes OUT/metrics.png, a valid PNG of the figure's size (2 columns x
    one row per quantity present, at plot.DPI); every line drawn equals, point by point, the steps
    and values of that split's records in metrics.jsonl, and every plottable key present in the
    file is drawn (absent ones, e.g. logps_* before train.py logs them, are not)."""
    folder = runs[0]
    assert plot.main([folder]) == os.path.join(folder, "metrics.png")
    records = metrics(folder)
    present = {key for r in records for _, keys in plot.PANELS for key in keys if key in r}
    assert {"loss", "p_chosen", "p_rejected", "pair_acc", "top1_acc"} <= present
    rows = sum(any(k in present for k in keys) for _, keys in plot.PANELS)
    w, h = plot.PANEL_SIZE
    assert png_size(os.path.join(folder, "metrics.png")) == (round(2 * w * plot.DPI), round(rows * h * plot.DPI))

    lines = plotted(plot.draw({"seed0": plot.read_run(folder)}))
    expected = {}
    for title, keys in plot.PANELS:
        for split in plot.SPLITS:
            for key in keys:
                rs = [r for r in records if r["split"] == split and key in r]
                if rs:
                    expected[f"{split}: {title}", key] = ([r["step"] for r in rs], [r[key] for r in rs])
    assert lines == expected
    assert expected["eval: loss", "loss"][0] == [0, 2, 4]  # before training, at step 2, at the end
    assert expected["train: loss", "loss"][0] == [1, 2, 3, 4]


@needs_matplotlib
def test_several_runs_overlaid(runs, tmp_path, monkeypatch):
    """Two runs: the default output is ./runs.png; each panel has one line per run and key, labelled
    with the run's folder name, and each run's line equals its own metrics file."""
    monkeypatch.chdir(tmp_path)
    assert plot.main(runs + ["--title", "two seeds"]) == "runs.png"
    png_size(tmp_path / "runs.png")
    fig = plot.draw({os.path.basename(f): plot.read_run(f) for f in runs}, title="two seeds")
    assert fig._suptitle.get_text() == "two seeds"
    lines = plotted(fig)
    for folder in runs:
        name = os.path.basename(folder)
        train_records = [r for r in metrics(folder) if r["split"] == "train"]
        assert lines["train: p", f"{name}: p_rejected"] == (
            [r["step"] for r in train_records],
            [r["p_rejected"] for r in train_records],
        )
    # the two seeds drew different batches, so their curves differ: the panel really holds two runs
    assert lines["train: loss", "seed0: loss"] != lines["train: loss", "seed1: loss"]


@needs_matplotlib
def test_logps_panel_and_missing_eval(tmp_path):
    """A hand-written metrics file with logps_chosen/logps_rejected and no eval records: the
    log-prob panel shows exactly those values, and the figure has only the train column."""
    rows = [
        {"split": "train", "step": s, "loss": 1.0 / s, "logps_chosen": -0.5 * s, "logps_rejected": -1.0 * s}
        for s in (1, 2, 3)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot.main([str(tmp_path), "--output", str(tmp_path / "x.png")])
    w, h = plot.PANEL_SIZE
    assert png_size(out) == (round(w * plot.DPI), round(2 * h * plot.DPI))
    lines = plotted(plot.draw({"r": plot.read_run(tmp_path)}))
    assert lines == {
        ("train: loss", "loss"): ([1, 2, 3], [1.0, 0.5, 1 / 3]),
        ("train: mean token log-prob", "logps_chosen"): ([1, 2, 3], [-0.5, -1.0, -1.5]),
        ("train: mean token log-prob", "logps_rejected"): ([1, 2, 3], [-1.0, -2.0, -3.0]),
    }


def test_unfinished_last_record_is_skipped(tmp_path):
    """A live run: the last line is half written (no newline, not JSON yet); the records before it plot."""
    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 2.0}\n{"split": "train", "st')
    assert plot.read_run(tmp_path)["train"] == [{"split": "train", "step": 1, "loss": 2.0}]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no metrics.jsonl"),
        ("", "no train or eval record"),
        (
            '{"split": "train", "step": 1, "loss": 2.0}\n\n{"split": "train", "step": 2, "loss": 1.0}\n',
            "metrics.jsonl line 2: empty line",
        ),
        (
            '{"split": "train", "step": 1, "loss": 2.0}\n{"split": "train", "step": 2, "loss": 1.0\n',
            "metrics.jsonl line 2: not JSON",
        ),
        ("[1, 2]\n", "metrics.jsonl line 1: expected a JSON object"),
        ('{"split": "train", "loss": 2.0}\n', "metrics.jsonl line 1: no 'step' key"),
        (
            '{"split": "train", "step": 1, "loss": "nan?"}\n',
            "metrics.jsonl line 1: 'loss' is 'nan?', expected a number",
        ),
    ],
)
def test_errors_name_the_file_and_line(tmp_path, capsys, content, message):
    """Each unplottable input ends plot.py with one line (SystemExit 'error: ...') naming the file
    and, for a bad line, its number."""
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path)])
    text = str(e.value)
    assert text.startswith(f"error: {tmp_path}") and message in text and "\n" not in text


def test_missing_folder(tmp_path):
    """A folder that does not exist: one line naming it."""
    with pytest.raises(SystemExit, match=f"error: {tmp_path / 'nope'}: no such folder"):
        plot.main([str(tmp_path / "nope")])


def test_without_matplotlib_one_line(runs, monkeypatch):
    """matplotlib not importable: plot.py stops with one line naming `pip install matplotlib`."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        plot.main([runs[0], "--output", os.devnull])
