"""
Plot the training curves of one or several train.py runs into one PNG.

    python plot.py out/mnm                                  # -> out/mnm/metrics.png
    python plot.py out/mnm out/simpo --title "lr 5e-7"      # -> ./runs.png, the runs overlaid
    python plot.py out/mnm --output curves.png

Reads each run folder's metrics.jsonl (the records train.py writes: "split" "train" or "eval", a
"step" and the metrics) and draws, over steps, one row of panels per quantity, the training
records on the left and the eval records on the right:

    loss                 loss
    p                    p_chosen, p_rejected (the reward p = exp(mean token log-prob))
    mean token log-prob  logps_chosen, logps_rejected
    accuracy             pair_acc, top1_acc

A quantity no record has is left out (older runs have no logps_*; an SFT run has no p), and so is
the eval column when no run evaluated. Needs matplotlib (pip install -r requirements-plot.txt).
"""

import argparse
import json
import os
import sys

# one row of panels per quantity: (title, the metric keys it draws)
PANELS = [
    ("loss", ["loss"]),
    ("p", ["p_chosen", "p_rejected"]),
    ("mean token log-prob", ["logps_chosen", "logps_rejected"]),
    ("accuracy", ["pair_acc", "top1_acc"]),
]
STYLES = ["-", "--"]  # first key of a panel solid (chosen, pairwise), second dashed (rejected, top-1)
SPLITS = ["train", "eval"]
PANEL_SIZE = (5.0, 2.6)  # inches per panel (width, height)
DPI = 100


class PlotError(ValueError):
    """A run folder or metrics.jsonl line that cannot be plotted; the message names the file and line."""


def read_run(folder):
    """{split: [record, ...]} of folder/metrics.jsonl, each split's records in file order.

    Records of other splits are ignored. A last line without its newline that is not JSON is a
    record train.py is writing right now (plotting a live run) and is skipped; any other empty or
    malformed line is an error naming the file and line."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isdir(folder):
        raise PlotError(f"{folder}: no such folder")
    if not os.path.isfile(path):
        raise PlotError(f"{folder}: no metrics.jsonl (expected a train.py --out folder)")
    with open(path) as f:
        lines = f.readlines()
    runs = {split: [] for split in SPLITS}
    for n, line in enumerate(lines, 1):
        where = f"{path} line {n}"
        if not line.strip():
            raise PlotError(f"{where}: empty line")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and not line.endswith("\n"):
                print(f"plot.py: {where}: skipped an unfinished last record", file=sys.stderr)
                break
            raise PlotError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise PlotError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for key in ("split", "step"):
            if key not in record:
                raise PlotError(f"{where}: no {key!r} key")
        if record["split"] not in runs:
            continue
        if isinstance(record["step"], bool) or not isinstance(record["step"], (int, float)):
            raise PlotError(f"{where}: 'step' is {record['step']!r}, expected a number")
        for _, keys in PANELS:
            for key in keys:
                value = record.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise PlotError(f"{where}: {key!r} is {value!r}, expected a number")
        runs[record["split"]].append(record)
    if not any(runs.values()):
        raise PlotError(f"{path}: no train or eval record")
    return runs


def labels(folders):
    """A short name per run: the folder's base name, or the path as given where base names repeat."""
    names = [os.path.basename(os.path.normpath(f)) for f in folders]
    return [name if names.count(name) == 1 else os.path.normpath(f) for name, f in zip(names, folders)]


def curves(runs):
    """What to draw, without drawing it: {(panel title, split): [(run label, key, steps, values)]}.

    runs: {label: {split: [record, ...]}} (read_run per folder). A (run, key) pair appears only
    where some record of that split has the key; steps and values are those records' own."""
    out = {}
    for title, keys in PANELS:
        for split in SPLITS:
            lines = []
            for label, run in runs.items():
                for key in keys:
                    records = [r for r in run[split] if r.get(key) is not None]
                    if records:
                        lines.append((label, key, [r["step"] for r in records], [float(r[key]) for r in records]))
            if lines:
                out[title, split] = lines
    return out


def draw(runs, title=None):
    """A matplotlib Figure of the runs' curves (see curves()); rows: quantities present, columns:
    the splits present. Each run has one colour; each key of a panel its line style."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "error: plot.py needs matplotlib: pip install matplotlib (or pip install -r requirements-plot.txt)"
        ) from None
    data = curves(runs)
    rows = [t for t, _ in PANELS if any((t, s) in data for s in SPLITS)]
    cols = [s for s in SPLITS if any((t, s) in data for t in rows)]
    fig, axes = plt.subplots(
        len(rows),
        len(cols),
        figsize=(PANEL_SIZE[0] * len(cols), PANEL_SIZE[1] * len(rows)),
        dpi=DPI,
        sharex=True,
        squeeze=False,
    )
    colour = {label: f"C{i % 10}" for i, label in enumerate(runs)}
    for i, row in enumerate(rows):
        keys = dict(PANELS)[row]
        for j, split in enumerate(cols):
            ax = axes[i, j]
            for label, key, steps, values in data.get((row, split), []):
                # eval has a handful of points: mark each one
                ax.plot(
                    steps,
                    values,
                    STYLES[keys.index(key)],
                    color=colour[label],
                    marker="o" if split == "eval" else None,
                    markersize=3,
                    label=f"{label}: {key}" if len(runs) > 1 else key,
                )
            ax.set_title(f"{split}: {row}", fontsize=10)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
            if i == len(rows) - 1:
                ax.set_xlabel("optimizer step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def default_output(folders):
    return os.path.join(folders[0], "metrics.png") if len(folders) == 1 else "runs.png"


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Plot loss, p, mean log-probs and accuracies of train.py runs into one PNG."
    )
    p.add_argument("runs", nargs="+", metavar="OUT", help="train.py --out folders (each holds metrics.jsonl)")
    p.add_argument(
        "--output", default=None, help="PNG to write (default: OUT/metrics.png for one run, ./runs.png for several)"
    )
    p.add_argument("--title", default=None, help="title above the panels")
    args = p.parse_args(argv)
    try:
        runs = {label: read_run(folder) for label, folder in zip(labels(args.runs), args.runs)}
    except PlotError as e:
        raise SystemExit(f"error: {e}") from None
    fig = draw(runs, args.title)
    output = args.output or default_output(args.runs)
    fig.savefig(output)  # no bbox_inches="tight": the PNG keeps the figure's size
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
