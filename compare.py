"""
Rerun the MPPO paper's comparison at the size your machine allows, fairly: every MPPO variant and
the baselines (SimPO, ORPO, DPO) trained from the same starting model over one learning-rate grid,
the rate chosen per method on a validation split, then the chosen rate trained with several seeds
and reported on a separate test split: a Markdown table in the layout of the paper's Table 2, a
paired comparison of each method with Pair-MNM over the same seeds, and the chosen / rejected p
over training steps for each method, like the paper's Figures 3 and 4.

The embedded demo (no download): a random tiny Llama is fine-tuned once on the demo's sloppy SFT
data, and each method continues from it on the demo's preference groups (train.jsonl); the rate is
chosen on demo/valid.jsonl (greedy task success, the share of prompts whose greedy answer is a
best-scored one; ties broken by pairwise accuracy, then by the lower rate), the table reports
demo/eval.jsonl. A chosen rate at the edge of the grid widens the grid for that method (--widen).
70 runs (11 methods x 4 rates with seed 0, 4 rates past an edge, then seeds 1 and 2 at each
method's rate, two runs at a time): about 41 minutes on this project's 2 CPU cores while other
jobs loaded them, an estimated 20 on idle ones (results/results.md says how it went):
$ python compare.py --report results

CI size (a smaller model, a few steps, every method at two rates, one seed; about a minute):
$ python compare.py --quick

Real models: every flag compare.py does not know goes to train.py unchanged, for every run
(compare.py sets --loss, --seed, --lr and --out itself); --eval_data is the validation split the
rate is chosen on, --test_data the split the table reports (evaluated in this process, on one
device); --launcher runs each job as a subprocess, e.g. under torchrun, and --method_flags adds
flags for one method (an --lr there fixes that method's rate instead of the grid):
$ python compare.py --model Llama-3-8B-SFT --data ultrafeedback.jsonl --eval_data valid.jsonl --test_data test.jsonl \\
    --lrs 3e-7 5e-7 1e-6 --seeds 0 1 --out runs/compare --launcher "torchrun --standalone --nproc_per_node 8" \\
    --batch_size 128 --dtype bfloat16
(greedy task success, --eval_generate, is exact match with a best response: a toy-task metric;
judge real models with MT-Bench / AlpacaEval on the answers of eval.py --generate for each
runs/METHOD/lr-LR/seed-S/final instead)

Writes to --out: runs/METHOD/lr-LR/seed-S/ (train.py's output, and test.json, the final model on
--test_data; a finished run is not repeated when compare.py is run again) and, to --report
(default: --out), results.md (the tables), runs.csv (every run's final metrics on both splits),
curves.csv (p_chosen / p_rejected per logged step, method and seed, at the chosen rates) and
p_curves.png (needs matplotlib: pip install -r requirements-plot.txt; skipped without it).
"""

import csv
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import train
from cli import ArgumentParser
from chat import ChatTokenizer
from data import tokenize_groups
from formats import read_groups
from metrics import evaluate, generation_success
from model import Llama, LlamaConfig
from parallel import Replicated

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "demo")

# rows of the paper's Table 2 (KTO is not implemented here), and the paper's numbers beside ours
METHODS = [
    "dpo",
    "orpo",
    "simpo",
    "point_ce",
    "point_mse",
    "pair_single",
    "pair_mns",
    "pair_mnm",
    "pair_mcs",
    "pair_mcm",
    "list_mle",
]
NAMES = {
    "sft": "SFT",
    "dpo": "DPO",
    "orpo": "ORPO",
    "simpo": "SimPO",
    "point_ce": "Point-CE",
    "point_mse": "Point-MSE",
    "pair_single": "Pair-Single",
    "pair_mns": "Pair-MNS",
    "pair_mnm": "Pair-MNM",
    "pair_mcs": "Pair-MCS",
    "pair_mcm": "Pair-MCM",
    "list_mle": "List-MLE",
}
PAPER = {
    "sft": (4.62, 3.3),
    "dpo": (5.93, 15.9),
    "orpo": (5.49, 10.7),
    "simpo": (5.97, 23.4),
    "point_ce": (4.38, 12.8),
    "point_mse": (4.43, 13.1),
    "pair_single": (5.96, 19.1),
    "pair_mns": (5.84, 5.1),
    "pair_mnm": (6.16, 21.6),
    "pair_mcs": (5.72, 14.6),
    "pair_mcm": (5.77, 7.8),
    "list_mle": (5.87, 5.4),
}  # (MT-Bench, Arena-Hard)
COLUMNS = [
    ("gen_success", "greedy task success"),
    ("pair_acc", "pairwise acc"),
    ("top1_acc", "top-1 acc"),
    ("p_chosen", "p chosen"),
    ("p_rejected", "p rejected"),
]
REFERENCE = "pair_mnm"  # the paper's best loss: every other method is compared with it seed by seed
# two-sided 95% quantiles of Student's t for 1..9 degrees of freedom (the paired test over seeds)
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262]

# the demo's recipe (train.py's demo, with one epoch), and a smaller one for CI
SIZES = {
    "demo": dict(
        model=None,
        sft_rows=None,
        train_rows=None,
        eval_rows=None,
        eval_generate=200,
        test_generate=300,
        sft_epochs=2,
        batch_size=32,
        lrs=[1e-4, 3e-4, 1e-3, 3e-3],
        seeds=[0, 1, 2],
        widen=2,
        log_every=5,
    ),
    "quick": dict(
        model=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        ),
        sft_rows=256,
        train_rows=64,
        eval_rows=32,
        eval_generate=4,
        test_generate=4,
        sft_epochs=1,
        batch_size=16,
        lrs=[1e-3, 3e-3],
        seeds=[0],
        widen=0,
        log_every=1,
    ),
}


def parse_args(argv=None):
    # no abbreviations: the flags compare.py does not know go to train.py, and train.py's --lr must
    # not be read as an abbreviation of --lrs
    p = ArgumentParser(
        prog="compare.py",
        allow_abbrev=False,
        description="Train every MPPO variant and baseline over a learning-rate grid, choose each "
        "method's rate on validation, report it with several seeds on test; tabulate and plot.",
        epilog="Any other flag is passed to train.py for every run (see python train.py --help).",
    )
    a = p.add_argument
    a(
        "--methods",
        nargs="+",
        default=METHODS,
        choices=METHODS,
        help="methods to train (default: all, in the paper's order)",
    )
    a(
        "--lrs",
        nargs="+",
        type=float,
        default=None,
        help="learning-rate grid, the same for every method (default: 1e-4 3e-4 1e-3 3e-3 for the demo, "
        "1e-3 3e-3 with --quick; pass-through: train.py's --lr default, no grid)",
    )
    a(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="training seeds at each method's chosen rate (data order and Pair-Single's draws); "
        "the first one also trains the grid (default: 0 1 2; 0 with --quick)",
    )
    a(
        "--select_on",
        default="gen_success",
        choices=["gen_success", "pair_acc", "top1_acc"],
        help="validation metric that chooses the rate "
        "(gen_success needs --eval_generate; pair_acc breaks its ties, then the lower rate)",
    )
    a(
        "--widen",
        type=int,
        default=None,
        help="times a method's grid may be extended by one rate past the edge its best rate is at "
        "(default: 2; 0 with --quick)",
    )
    a(
        "--test_data",
        nargs="+",
        default=None,
        help="pass-through: the groups the table reports (default: the demo's eval.jsonl; "
        "pass-through without it: --eval_data, the split the rate was chosen on)",
    )
    a(
        "--test_generate",
        type=int,
        default=None,
        help="greedy-decode this many test prompts for the task success "
        "(default: 300 for the demo, 4 with --quick, else --eval_generate)",
    )
    a("--quick", action="store_true", help="CI size: a smaller model, a few steps, one seed, every method at two rates")
    a("--out", default=None, help="output folder (default: out/compare, or out/compare-quick with --quick)")
    a("--report", default=None, help="folder for results.md, runs.csv, curves.csv, p_curves.png (default: --out)")
    a(
        "--launcher",
        default=None,
        help="run each job as `LAUNCHER train.py ...` (e.g. 'torchrun --nproc_per_node 8'); default: in this process",
    )
    a(
        "--jobs",
        type=int,
        default=None,
        help="CPU only: run this many jobs at once, as `python train.py` subprocesses sharing the cores "
        "(default: 2 for the demo on a machine with 2 or more cores, else 1)",
    )
    a(
        "--method_flags",
        action="append",
        default=[],
        metavar="METHOD=FLAGS",
        help="extra train.py flags for one method, e.g. 'dpo=--beta 0.05'; "
        "an --lr there replaces the grid for that method",
    )
    args, rest = p.parse_known_args(argv)
    rest = [r for r in rest if r != "--"]  # an optional separator before the train.py flags
    for flag, instead in (("--loss", "--methods"), ("--seed", "--seeds"), ("--out", "--out"), ("--lr", "--lrs")):
        if any(r == flag or r.startswith(flag + "=") for r in rest):
            p.error(f"{flag} is set by compare.py for each run; use {instead}")
    args.extra = {}
    for spec in args.method_flags:
        method, _, flags = spec.partition("=")
        if method not in METHODS or not flags:
            p.error(f"--method_flags {spec!r}: expected METHOD=FLAGS with METHOD one of {', '.join(METHODS)}")
        args.extra.setdefault(method, []).extend(shlex.split(flags))
    size = SIZES["quick" if args.quick else "demo"]
    passthrough = any(r == "--model" or r.startswith("--model=") for r in rest)
    args.seeds = args.seeds or size["seeds"]
    args.lrs = args.lrs or ([None] if passthrough else size["lrs"])
    args.widen = size["widen"] if args.widen is None else args.widen
    args.out = args.out or ("out/compare-quick" if args.quick else "out/compare")
    args.report = args.report or args.out
    return args, rest


# -----------------------------------------------------------------------------
# the demo's starting model


def head(src, dst, n):
    """The first n lines of src in dst (all of them for n None)."""
    with open(src) as f, open(dst, "w") as g:
        g.writelines(f.readlines()[:n] if n else f.readlines())
    return dst


def demo_setup(out, size):
    """Random init -> SFT on the demo's demonstrations (once; reused when already there).
    Returns the train.py flags every preference run shares, and the test split."""
    s = SIZES[size]
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    files = {
        name: head(os.path.join(DEMO, name), os.path.join(data, name), n)
        for name, n in (
            ("sft.jsonl", s["sft_rows"]),
            ("train.jsonl", s["train_rows"]),
            ("valid.jsonl", s["eval_rows"]),
            ("eval.jsonl", s["eval_rows"]),
        )
    }
    lengths = ["--max_length", "64", "--max_prompt_length", "32"]
    sft = os.path.join(out, "sft", "final")
    if not os.path.isfile(os.path.join(sft, "config.json")):
        with open(os.path.join(DEMO, "config.json")) as f:
            config = json.load(f)
        config.update(s["model"] or {})
        torch.manual_seed(0)
        init = os.path.join(out, "init")
        Llama(LlamaConfig.from_dict(config)).save_pretrained(init, source_dir=DEMO)
        shutil.rmtree(os.path.join(out, "sft"), ignore_errors=True)
        print("== SFT of the starting model on the demo's demonstrations", flush=True)
        train.train(
            train.parse_args(
                [
                    "--model",
                    init,
                    "--data",
                    files["sft.jsonl"],
                    "--loss",
                    "sft",
                    "--out",
                    os.path.join(out, "sft"),
                    "--epochs",
                    str(s["sft_epochs"]),
                    "--batch_size",
                    "32",
                    "--micro_batch_size",
                    "32",
                    "--lr",
                    "3e-3",
                    "--warmup_ratio",
                    "0.05",
                    "--log_every",
                    "50",
                    *lengths,
                ]
            )
        )
    flags = [
        "--model",
        sft,
        "--data",
        files["train.jsonl"],
        "--eval_data",
        files["valid.jsonl"],
        "--eval_generate",
        str(s["eval_generate"]),
        "--epochs",
        "1",
        "--batch_size",
        str(s["batch_size"]),
        "--micro_batch_size",
        "32",
        "--warmup_ratio",
        "0.1",
        "--log_every",
        str(s["log_every"]),
        *lengths,
    ]
    return flags, [files["eval.jsonl"]]


# -----------------------------------------------------------------------------
# runs and their results


def read_metrics(run):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finished(run):
    done = os.path.isfile(os.path.join(run, "final", "config.json"))
    return done and any(r["split"] == "eval" for r in read_metrics(run))


def run_train(argv, launcher, log=None, threads=None):
    """One train.py job: in this process, or as `launcher train.py argv` (output to log, if given)."""
    if launcher is None:
        train.train(train.parse_args(argv))
        return
    cmd = shlex.split(launcher) + [os.path.join(HERE, "train.py")] + argv
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    if log is None:
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
        return
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit {done.returncode}); see {log}")


@torch.no_grad()
def evaluate_model(model_dir, flags, data, n_generate):
    """One model on the groups in data (files), as train.py's final evaluation does it: the
    ranking metrics and, for n_generate > 0, greedy task success on the first n_generate prompts."""
    args = train.parse_args(flags + ["--loss", "pair_mnm", "--model", model_dir])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = ChatTokenizer.from_pretrained(args.model, template=args.template, date_string=args.date_string)
    groups, _ = read_groups(data, format=args.data_format)
    groups, _ = tokenize_groups(groups, tok, args.max_length, args.max_prompt_length, include_header=args.score_header)
    model = Llama.from_pretrained(args.model, device=device)
    scoring = train.scoring_of(args, tok.pad_id)
    m = evaluate(model, groups, train.make_loss("pair_mnm"), scoring, Replicated(device, dtype))
    if n_generate:
        m["gen_success"] = generation_success(model, tok, groups, n_generate)
    return m


def heldout_metrics(run, flags, test, n_generate):
    """The run's final model on the test split, computed once and kept in RUN/test.json."""
    path = os.path.join(run, "test.json")
    if os.path.isfile(path):
        with open(path) as f:
            kept = json.load(f)
        if kept.get("data") == test and kept.get("generate") == n_generate:
            return kept["metrics"]
    m = evaluate_model(os.path.join(run, "final"), flags, test, n_generate)
    with open(path + ".tmp", "w") as f:
        json.dump({"data": test, "generate": n_generate, "metrics": m}, f)
    os.replace(path + ".tmp", path)
    return m


def valid_metrics(run):
    """The run's last evaluation on --eval_data (the validation split), as train.py logged it."""
    return [r for r in read_metrics(run) if r["split"] == "eval"][-1]


def choose(by_lr, key):
    """The learning rate whose validation metrics are best: highest key, then highest pairwise
    accuracy, then the lower rate (None sorts as the only rate)."""
    return max(
        by_lr, key=lambda lr: (by_lr[lr].get(key, -math.inf), by_lr[lr].get("pair_acc", -math.inf), -(lr or 0.0))
    )


def widened(grid, best):
    """The next rate past the edge of grid that best is at (None when best is inside), one grid
    step further: the ratio of the two rates at that edge."""
    if len(grid) < 2 or best not in (grid[0], grid[-1]):
        return None
    return grid[0] ** 2 / grid[1] if best == grid[0] else grid[-1] ** 2 / grid[-2]


def lr_tag(lr):
    return "default" if lr is None else f"{lr:g}"


def mean_spread(values):
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, std


def paired(values, reference):
    """Seed-by-seed differences values[s] - reference[s]: (mean, std, wins, n, separated), where
    separated says a paired t-test over the seeds rejects "no difference" at the 5% level."""
    diffs = [v - r for v, r in zip(values, reference)]
    mean, std = mean_spread(diffs)
    n = len(diffs)
    if n < 2:
        separated = False
    elif std == 0:
        separated = mean != 0
    else:
        separated = abs(mean) / (std / n**0.5) > T95[min(n - 2, len(T95) - 1)]
    return mean, std, sum(d > 0 for d in diffs), n, separated


def cell(values):
    if not values:
        return "-"
    return f"{values[0]:.3f}" if len(values) == 1 else "{:.3f} ± {:.3f}".format(*mean_spread(values))


def table(results, start, seeds, chosen, test_name):
    """Markdown in the layout of the paper's Table 2 on the test split, with each method's chosen
    rate, its paired difference with Pair-MNM, and the paper's numbers beside ours."""
    cols = [c for c in COLUMNS if c[0] in start or any(c[0] in r for rs in results.values() for r in rs)]
    deltas = []
    if REFERENCE in results and len(seeds) > 1:
        deltas = [k for k in ("gen_success", "pair_acc") if any(k == c for c, _ in cols)]
    head = (
        ["method", "lr"]
        + [name for _, name in cols]
        + [f"Δ {dict(cols)[k]} vs Pair-MNM" for k in deltas]
        + ["paper: MT-Bench", "paper: Arena-Hard"]
    )
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines.append(
        "| SFT (start) | - | "
        + " | ".join(cell([start[k]] if k in start else []) for k, _ in cols)
        + " | -" * len(deltas)
        + " | %.2f | %.1f |" % PAPER["sft"]
    )
    for method, runs in results.items():
        name = f"**{NAMES[method]}**" if method == REFERENCE else NAMES[method]
        row = [name, lr_tag(chosen[method])] + [cell([r[k] for r in runs if k in r]) for k, _ in cols]
        for k in deltas:
            if method == REFERENCE:
                row.append("-")
                continue
            mean, std, wins, n, sep = paired([r[k] for r in runs], [r[k] for r in results[REFERENCE]])
            row.append(f"{mean:+.3f} ± {std:.3f} ({wins}/{n}){' †' if sep else ''}")
        lines.append("| " + " | ".join(row) + " | %.2f | %.1f |" % PAPER[method])
    note = (
        f"\nOn {test_name}, at each method's chosen rate (lr); mean ± sample standard deviation over "
        f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}); the SFT row has no seed. p chosen / p rejected: "
        f"mean p = exp(mean token log-prob) of the best-scored / strictly lower-scored responses."
    )
    if deltas:
        note += (
            " Δ vs Pair-MNM: the seed-by-seed difference from Pair-MNM (same seed, same data order), "
            "mean ± std over seeds, (seeds where the method is higher / seeds); † where a paired t-test over "
            "the seeds rejects no difference at 5%."
        )
    return "\n".join(lines) + "\n" + note + "\n"


def lr_table(grid_metrics, chosen, key, at_edge):
    """Validation metric of every method at every rate of its grid; the chosen rate in bold."""
    lrs = sorted({lr for by_lr in grid_metrics.values() for lr in by_lr}, key=lambda lr: lr or 0.0)
    lines = ["| method | " + " | ".join(f"lr {lr_tag(lr)}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for method, by_lr in grid_metrics.items():
        cells = []
        for lr in lrs:
            v = by_lr.get(lr, {}).get(key)
            text = "-" if v is None else f"{v:.3f}"
            cells.append(f"**{text}**" if lr == chosen[method] else text)
        edge = " (best at the edge)" if method in at_edge else ""
        lines.append(f"| {NAMES[method]}{edge} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_curves(path, curves):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "step", "p_chosen", "p_rejected", "loss"])
        for (method, seed), rows in curves.items():
            for r in rows:
                w.writerow(
                    [
                        method,
                        seed,
                        r["step"],
                        f"{r.get('p_chosen', float('nan')):.6g}",
                        f"{r.get('p_rejected', float('nan')):.6g}",
                        f"{r['loss']:.6g}",
                    ]
                )


def plot_curves(path, curves, methods):
    """One panel per method: chosen (solid) and rejected (dashed) p over steps, the mean over seeds
    with the seeds' range shaded. Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cols = 4
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), sharex=True, sharey=True, squeeze=False)
    for ax, method in zip(axes.flat, methods):
        runs = [rs for (m, _), rs in curves.items() if m == method and rs]
        for key, style, color in (("p_chosen", "-", "tab:blue"), ("p_rejected", "--", "tab:red")):
            steps = [r["step"] for r in runs[0]] if runs else []
            series = [[r.get(key, float("nan")) for r in rs] for rs in runs if len(rs) == len(steps)]
            if not series:
                continue
            by_step = list(zip(*series))
            ax.plot(steps, [sum(v) / len(v) for v in by_step], style, color=color, label=key.replace("p_", "p "))
            ax.fill_between(
                steps, [min(v) for v in by_step], [max(v) for v in by_step], color=color, alpha=0.2, linewidth=0
            )
        ax.set_title(NAMES[method], fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.supxlabel("training step")
    fig.supylabel("mean p = exp(mean token log-prob), training batches")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def main(argv=None):
    args, rest = parse_args(argv)
    given_model = any(r == "--model" or r.startswith("--model=") for r in rest)
    mode = "pass-through" if given_model else "quick" if args.quick else "demo"
    if args.jobs is None:
        args.jobs = 2 if mode == "demo" and (os.cpu_count() or 1) >= 2 else 1
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    # Torch processes that each use every core slow each other down far more than the 2x that
    # sharing costs (their OpenMP threads spin waiting for each other), so with parallel jobs this
    # process's own work (SFT, the test evaluations in the job threads) gets one share of the cores
    # too, and the --quick size, a model too small to gain from threads, runs on one core.
    previous = torch.get_num_threads()
    if mode == "quick" or (args.jobs > 1 and args.launcher is None):
        torch.set_num_threads(1 if mode == "quick" else threads)
    try:
        return compare(args, rest, mode, threads, argv)
    finally:
        torch.set_num_threads(previous)


def compare(args, rest, mode, threads, argv):
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.report, exist_ok=True)
    # the demo: train.py flags given here override its recipe (argparse keeps the last value)
    if mode == "pass-through":
        flags, test = rest, args.test_data
    else:
        flags, test = demo_setup(args.out, mode)
        flags += rest
    targs = train.parse_args(flags + ["--loss", "pair_mnm"])
    test = test or targs.eval_data  # pass-through without --test_data: reported on the validation split
    if args.test_generate is None:
        args.test_generate = targs.eval_generate if mode == "pass-through" else SIZES[mode]["test_generate"]
    n_generate = args.test_generate
    key = args.select_on if args.select_on != "gen_success" or targs.eval_generate else "pair_acc"

    def grid_of(method):  # an --lr in --method_flags fixes that method's rate
        fixed = train.parse_args(flags + args.extra.get(method, []) + ["--loss", method]).lr
        given = any(x == "--lr" or x.startswith("--lr=") for x in args.extra.get(method, []))
        return [fixed] if given else list(args.lrs)

    run_dir = lambda m, lr, s: os.path.join(args.out, "runs", m, f"lr-{lr_tag(lr)}", f"seed-{s}")  # noqa: E731
    trained = []

    def run_jobs(jobs, with_test):
        """Train the (method, lr, seed) jobs not finished yet, `--jobs` at a time; with_test: also
        evaluate each one's final model on the test split (in the job's thread, in this process)."""
        todo = [job for job in jobs if not finished(run_dir(*job))]
        for job in todo:
            shutil.rmtree(run_dir(*job), ignore_errors=True)  # a partial run: start it over

        def one(job):
            m, lr, s = job
            run, t = run_dir(m, lr, s), time.time()
            if job in todo:
                argv = (
                    flags
                    + ([] if lr is None else ["--lr", repr(lr)])
                    + args.extra.get(m, [])
                    + ["--loss", m, "--seed", str(s), "--out", run]
                )
                if args.jobs > 1:  # subprocesses, each with its share of the cores
                    run_train(argv, args.launcher or sys.executable, log=run + ".log", threads=threads)
                else:
                    print(f"== {NAMES[m]}, lr {lr_tag(lr)}, seed {s}", flush=True)
                    run_train(argv, args.launcher)
                trained.append(job)
            if with_test and test != targs.eval_data:
                heldout_metrics(run, flags, test, n_generate)
            if args.jobs > 1:
                print(f"== {NAMES[m]}, lr {lr_tag(lr)}, seed {s}: {time.time() - t:.0f} s", flush=True)

        if args.jobs > 1:
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(one, jobs))
        else:
            for job in jobs:
                one(job)

    # 1. every method at every rate of the grid with the first seed; each method's rate chosen on validation,
    # the grid widened by one rate at a time past an edge where a method's best rate sits
    seed0 = args.seeds[0]
    grids = {m: grid_of(m) for m in args.methods}
    for step in range(args.widen + 1):
        run_jobs([(m, lr, seed0) for m in args.methods for lr in grids[m]], with_test=False)
        grid_metrics = {m: {lr: valid_metrics(run_dir(m, lr, seed0)) for lr in grids[m]} for m in args.methods}
        chosen = {m: choose(grid_metrics[m], key) for m in args.methods}
        wider = {m: widened(sorted(grids[m]), chosen[m]) for m in args.methods if len(grids[m]) > 1}
        wider = {m: lr for m, lr in wider.items() if lr is not None}
        if step == args.widen or not wider:
            break
        for m, lr in wider.items():
            grids[m] = sorted(grids[m] + [lr])
    at_edge = set(wider)

    # 2. every seed at each method's chosen rate, on the test split
    print("== the starting model on the test split", flush=True)
    start = evaluate_model(targs.model, flags, test, n_generate)
    report_jobs = [(m, chosen[m], s) for m in args.methods for s in args.seeds]
    run_jobs(report_jobs, with_test=True)
    results, curves = {m: [] for m in args.methods}, {}
    for m, lr, s in report_jobs:
        run = run_dir(m, lr, s)
        on_valid = test == targs.eval_data
        results[m].append(valid_metrics(run) if on_valid else heldout_metrics(run, flags, test, n_generate))
        curves[(m, s)] = [r for r in read_metrics(run) if r["split"] == "train"]

    keys = ["gen_success", "pair_acc", "top1_acc", "p_chosen", "p_rejected", "loss"]
    with open(os.path.join(args.report, "runs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "lr", "seed", "chosen", *[f"valid_{k}" for k in keys], *[f"test_{k}" for k in keys]])
        w.writerow(["sft", "", "", "", *[""] * len(keys), *[start.get(k, "") for k in keys]])
        for m in args.methods:
            for lr in sorted({lr for lr in grids[m]} | {chosen[m]}, key=lambda lr: lr or 0.0):
                for s in args.seeds if lr == chosen[m] else [seed0]:
                    run = run_dir(m, lr, s)
                    v = valid_metrics(run)
                    t = results[m][args.seeds.index(s)] if lr == chosen[m] else {}
                    w.writerow(
                        [
                            m,
                            lr_tag(lr),
                            s,
                            int(lr == chosen[m]),
                            *[v.get(k, "") for k in keys],
                            *[t.get(k, "") for k in keys],
                        ]
                    )
    write_curves(os.path.join(args.report, "curves.csv"), curves)
    plotted = plot_curves(os.path.join(args.report, "p_curves.png"), curves, args.methods)
    minutes = (time.time() - t0) / 60
    command = "python compare.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    test_name = (
        "the test split (" + " ".join(test) + ")"
        if test != targs.eval_data
        else "the validation split (no --test_data given)"
    )
    n_runs = len({run_dir(m, lr, seed0) for m in args.methods for lr in grids[m]} | {run_dir(*j) for j in report_jobs})
    report = [
        f"# MPPO and baselines, {mode} size\n",
        table(results, start, args.seeds, chosen, test_name),
        "Baselines at their papers' settings: DPO beta 0.1; SimPO beta 2.0, gamma 1.0 (gamma/beta 0.5, SimPO's "
        "Llama-3-Base recipe); ORPO lambda 0.1 (train.py's defaults"
        + "".join(f"; {m} `{' '.join(map(shlex.quote, x))}`" for m, x in args.extra.items())
        + "). "
        "MPPO's losses have no such parameter.\n",
        f"## Learning rate chosen on validation\n\nValidation {dict(COLUMNS)[key]} "
        f"({' '.join(targs.eval_data)}) of every run with seed {seed0}; the chosen rate in bold (highest {key}, "
        f"ties broken by pairwise accuracy, then by the lower rate). The grid is the same for every method; "
        f"a method whose best rate was at an edge got the next rate past it, "
        f"up to {args.widen} time(s) (- = not run).\n",
        lr_table(grid_metrics, chosen, key, at_edge),
        f"`{command}`: {minutes:.1f} min on {os.cpu_count()} CPU core(s), "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
        f"{', CUDA' if torch.cuda.is_available() else ''}; {len(trained)} of {n_runs} runs trained "
        f"by this command (the others were read back from {args.out}).\n",
        "train.py flags of every run: `" + " ".join(shlex.quote(f) for f in flags) + "`, with `--lr` from the grid.\n",
        "p_curves.png: chosen and rejected p over training steps at the chosen rates (mean over seeds, range "
        "shaded); raw numbers in curves.csv.\n"
        if plotted
        else "No plot: matplotlib is not installed (pip install -r requirements-plot.txt); "
        "the curves are in curves.csv.\n",
    ]
    with open(os.path.join(args.report, "results.md"), "w") as f:
        f.write("\n".join(report))
    print("\n" + "\n".join(report))
    return results


if __name__ == "__main__":
    main()
