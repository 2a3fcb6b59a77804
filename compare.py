"""
Rerun the MPPO paper's comparison at the size your machine allows: every MPPO variant and the
baselines (SimPO, ORPO, DPO) trained from the same starting model with several seeds, then a
Markdown table in the layout of the paper's Table 2 and the chosen / rejected p over training
steps for each method, like its Figures 3 and 4.

The embedded demo (no download): a random tiny Llama is fine-tuned once on the demo's sloppy
SFT data, and each method continues from it on the demo's preference groups; the held-out groups
give the ranking metrics and the greedy task success (share of prompts whose greedy answer is the
sorted one). About 15 minutes on 2 CPU cores (11 methods x 5 seeds, two runs at a time):
$ python compare.py --report results

CI size (a smaller model, a few steps, every method once; under a minute):
$ python compare.py --quick

Real models: every flag compare.py does not know goes to train.py unchanged, for every run
(compare.py sets --loss, --seed and --out itself); --launcher runs each job as a subprocess, e.g.
under torchrun, and --method_flags adds flags for one method (the paper tuned the learning rate):
$ python compare.py --model Llama-3-8B-SFT --data ultrafeedback.jsonl --eval_data heldout.jsonl \\
    --seeds 0 1 --out runs/compare --launcher "torchrun --standalone --nproc_per_node 8" \\
    --method_flags "dpo=--lr 5e-7" --method_flags "simpo=--lr 1e-6" --batch_size 128 --lr 5e-7 --dtype bfloat16
(greedy task success, --eval_generate, is exact match with the best response: a toy-task metric;
judge real models with MT-Bench / AlpacaEval on the answers of eval.py --generate for each
runs/METHOD/seed-S/final instead)

Writes to --out: runs/METHOD/seed-S/ (train.py's output; a finished run is not repeated when
compare.py is run again) and, to --report (default: --out), results.md (the table), runs.csv
(every run's final metrics), curves.csv (p_chosen / p_rejected per logged step, method and seed)
and p_curves.png (needs matplotlib: pip install -r requirements-plot.txt; skipped without it).
"""

import csv
import json
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
from data import ChatTokenizer, read_groups, tokenize_groups
from metrics import evaluate, generation_success
from model import Llama, LlamaConfig
from parallel import Replicated

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "demo")

# rows of the paper's Table 2 (KTO is not implemented here), and the paper's numbers beside ours
METHODS = ["dpo", "orpo", "simpo", "point_ce", "point_mse", "pair_single", "pair_mns", "pair_mnm", "pair_mcs", "pair_mcm", "list_mle"]
NAMES = {"sft": "SFT", "dpo": "DPO", "orpo": "ORPO", "simpo": "SimPO", "point_ce": "Point-CE", "point_mse": "Point-MSE",
         "pair_single": "Pair-Single", "pair_mns": "Pair-MNS", "pair_mnm": "Pair-MNM", "pair_mcs": "Pair-MCS",
         "pair_mcm": "Pair-MCM", "list_mle": "List-MLE"}
PAPER = {"sft": (4.62, 3.3), "dpo": (5.93, 15.9), "orpo": (5.49, 10.7), "simpo": (5.97, 23.4), "point_ce": (4.38, 12.8),
         "point_mse": (4.43, 13.1), "pair_single": (5.96, 19.1), "pair_mns": (5.84, 5.1), "pair_mnm": (6.16, 21.6),
         "pair_mcs": (5.72, 14.6), "pair_mcm": (5.77, 7.8), "list_mle": (5.87, 5.4)}  # (MT-Bench, Arena-Hard)
COLUMNS = [("top1_acc", "held-out top-1 acc"), ("pair_acc", "held-out pairwise acc"), ("gen_success", "greedy task success")]

# the demo's recipe (train.py's demo), and a smaller one for CI
SIZES = {
    "demo": dict(model=None, sft_rows=None, train_rows=None, eval_rows=None, eval_generate=100, sft_epochs=2, batch_size=32,
                 lr=1e-3, log_every=5),
    "quick": dict(model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16),
                  sft_rows=256, train_rows=64, eval_rows=32, eval_generate=4, sft_epochs=1, batch_size=16, lr=3e-3, log_every=1),
}


def parse_args(argv=None):
    p = ArgumentParser(prog="compare.py", description="Train every MPPO variant and baseline with several seeds; tabulate and plot.",
                       epilog="Any other flag is passed to train.py for every run (see python train.py --help).")
    a = p.add_argument
    a("--methods", nargs="+", default=METHODS, choices=METHODS, help="methods to train (default: all, in the paper's order)")
    a("--seeds", nargs="+", type=int, default=None, help="training seeds of every method: data order and Pair-Single's draws (default: 0 1 2 3 4; 0 with --quick)")
    a("--quick", action="store_true", help="CI size: a smaller model, a few steps, one seed, every method")
    a("--out", default=None, help="output folder (default: out/compare, or out/compare-quick with --quick)")
    a("--report", default=None, help="folder for results.md, runs.csv, curves.csv, p_curves.png (default: --out)")
    a("--launcher", default=None, help="run each job as `LAUNCHER train.py ...` (e.g. 'torchrun --nproc_per_node 8'); default: in this process")
    a("--jobs", type=int, default=None, help="CPU only: run this many jobs at once, as `python train.py` subprocesses sharing the cores "
                                              "(default: 2 for the demo on a machine with 2 or more cores, else 1)")
    a("--method_flags", action="append", default=[], metavar="METHOD=FLAGS", help="extra train.py flags for one method, e.g. 'dpo=--lr 5e-7'")
    args, rest = p.parse_known_args(argv)
    rest = [r for r in rest if r != "--"]  # an optional separator before the train.py flags
    for flag in ("--loss", "--seed", "--out"):
        if any(r == flag or r.startswith(flag + "=") for r in rest):
            p.error(f"{flag} is set by compare.py for each run; use --methods / --seeds / --out")
    args.extra = {}
    for spec in args.method_flags:
        method, _, flags = spec.partition("=")
        if method not in METHODS or not flags:
            p.error(f"--method_flags {spec!r}: expected METHOD=FLAGS with METHOD one of {', '.join(METHODS)}")
        args.extra.setdefault(method, []).extend(shlex.split(flags))
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2, 3, 4])
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
    Returns the train.py flags every preference run shares."""
    s = SIZES[size]
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    files = {name: head(os.path.join(DEMO, name), os.path.join(data, name), n)
             for name, n in (("sft.jsonl", s["sft_rows"]), ("train.jsonl", s["train_rows"]), ("eval.jsonl", s["eval_rows"]))}
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
        train.train(train.parse_args(["--model", init, "--data", files["sft.jsonl"], "--loss", "sft", "--out", os.path.join(out, "sft"),
                                      "--epochs", str(s["sft_epochs"]), "--batch_size", "32", "--micro_batch_size", "32", "--lr", "3e-3",
                                      "--warmup_ratio", "0.05", "--log_every", "50", *lengths]))
    return ["--model", sft, "--data", files["train.jsonl"], "--eval_data", files["eval.jsonl"], "--eval_generate", str(s["eval_generate"]),
            "--epochs", "1", "--batch_size", str(s["batch_size"]), "--micro_batch_size", "32", "--lr", str(s["lr"]),
            "--warmup_ratio", "0.1", "--log_every", str(s["log_every"]), *lengths]


# -----------------------------------------------------------------------------
# runs and their results


def read_metrics(run):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finished(run):
    return os.path.isfile(os.path.join(run, "final", "config.json")) and any(r["split"] == "eval" for r in read_metrics(run))


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
def evaluate_start(flags):
    """The SFT row: the starting model on the held-out groups, as train.py's final evaluation does it."""
    args = train.parse_args(flags + ["--loss", "pair_mnm"])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = ChatTokenizer.from_pretrained(args.model, template=args.template, date_string=args.date_string)
    groups, _ = read_groups(args.eval_data, format=args.data_format)
    groups, _ = tokenize_groups(groups, tok, args.max_length, args.max_prompt_length, include_header=args.score_header)
    model = Llama.from_pretrained(args.model, device=device)
    m = evaluate(model, groups, train.make_loss(args, None), args, tok.pad_id, Replicated(device, dtype))
    if args.eval_generate:
        m["gen_success"] = generation_success(model, tok, groups, args.eval_generate)
    return m


def mean_spread(values):
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, std


def table(results, start, seeds):
    """Markdown in the layout of the paper's Table 2, with the paper's numbers beside ours."""
    cols = [c for c in COLUMNS if c[0] in start or any(c[0] in r for rs in results.values() for r in rs)]
    lines = ["| method | " + " | ".join(name for _, name in cols) + " | paper: MT-Bench | paper: Arena-Hard |",
             "|---" * (len(cols) + 3) + "|"]
    cell = lambda vs: "-" if not vs else (f"{vs[0]:.3f}" if len(vs) == 1 else "{:.3f} ± {:.3f}".format(*mean_spread(vs)))
    lines.append(f"| SFT (start) | " + " | ".join(cell([start[k]] if k in start else []) for k, _ in cols) + " | %.2f | %.1f |" % PAPER["sft"])
    for method, runs in results.items():
        name = f"**{NAMES[method]}**" if method == "pair_mnm" else NAMES[method]
        lines.append(f"| {name} | " + " | ".join(cell([r[k] for r in runs if k in r]) for k, _ in cols) + " | %.2f | %.1f |" % PAPER[method])
    return "\n".join(lines) + f"\n\nmean ± sample standard deviation over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); the SFT row has no seed.\n"


def write_curves(path, curves):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "step", "p_chosen", "p_rejected", "loss"])
        for (method, seed), rows in curves.items():
            for r in rows:
                w.writerow([method, seed, r["step"], f"{r.get('p_chosen', float('nan')):.6g}", f"{r.get('p_rejected', float('nan')):.6g}", f"{r['loss']:.6g}"])


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
            ax.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step], color=color, alpha=0.2, linewidth=0)
        ax.set_title(NAMES[method], fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(methods):]:
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
    mode = "pass-through" if any(r == "--model" or r.startswith("--model=") for r in rest) else "quick" if args.quick else "demo"
    if args.jobs is None:
        args.jobs = 2 if mode == "demo" and (os.cpu_count() or 1) >= 2 else 1
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    # Torch processes that each use every core slow each other down far more than the 2x that
    # sharing costs (their OpenMP threads spin waiting for each other), so with parallel jobs this
    # process's own work (SFT, the starting model's evaluation) gets one share of the cores too,
    # and the --quick size, a model too small to gain from threads, runs on one core.
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
    flags = rest if mode == "pass-through" else demo_setup(args.out, mode) + rest

    print("== the starting model on the held-out groups", flush=True)
    start = evaluate_start(flags)
    jobs = [(m, s, os.path.join(args.out, "runs", m, f"seed-{s}")) for m in args.methods for s in args.seeds]
    todo = [(m, s, run) for m, s, run in jobs if not finished(run)]
    for _, _, run in todo:
        shutil.rmtree(run, ignore_errors=True)  # a partial run: start it over (metrics.jsonl appends)
    job_argv = lambda m, s, run: flags + args.extra.get(m, []) + ["--loss", m, "--seed", str(s), "--out", run]
    if args.jobs > 1:  # subprocesses, each with its share of the cores

        def one(job):
            m, s, run = job
            t = time.time()
            run_train(job_argv(m, s, run), args.launcher or sys.executable, log=run + ".log", threads=threads)
            print(f"== {NAMES[m]}, seed {s}: {time.time() - t:.0f} s", flush=True)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, todo))
    else:
        for m, s, run in todo:
            print(f"== {NAMES[m]}, seed {s}", flush=True)
            run_train(job_argv(m, s, run), args.launcher)
    results, curves = {m: [] for m in args.methods}, {}
    for method, seed, run in jobs:
        records = read_metrics(run)
        results[method].append([r for r in records if r["split"] == "eval"][-1])
        curves[(method, seed)] = [r for r in records if r["split"] == "train"]

    with open(os.path.join(args.report, "runs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        keys = ["top1_acc", "pair_acc", "gen_success", "p_chosen", "p_rejected", "loss"]
        w.writerow(["method", "seed", *keys])
        w.writerow(["sft", "", *[start.get(k, "") for k in keys]])
        for method, runs in results.items():
            for seed, r in zip(args.seeds, runs):
                w.writerow([method, seed, *[r.get(k, "") for k in keys]])
    write_curves(os.path.join(args.report, "curves.csv"), curves)
    plotted = plot_curves(os.path.join(args.report, "p_curves.png"), curves, args.methods)
    minutes = (time.time() - t0) / 60
    command = "python compare.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    report = [f"# MPPO and baselines, {mode} size\n", table(results, start, args.seeds),
              f"`{command}`: {minutes:.1f} min on {os.cpu_count()} CPU core(s), {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}{', CUDA' if torch.cuda.is_available() else ''}; {len(todo)} of {len(jobs)} runs trained "
              f"by this command (the others were read back from {args.out}).\n",
              "train.py flags of every run: `" + " ".join(shlex.quote(f) for f in flags) + "`"
              + "".join(f"; {m} also `{' '.join(map(shlex.quote, x))}`" for m, x in args.extra.items()) + ".\n",
              "p_curves.png: chosen and rejected p over training steps (mean over seeds, range shaded); raw numbers in curves.csv.\n"
              if plotted else "No plot: matplotlib is not installed (pip install -r requirements-plot.txt); the curves are in curves.csv.\n"]
    with open(os.path.join(args.report, "results.md"), "w") as f:
        f.write("\n".join(report))
    print("\n" + "\n".join(report))
    return results


if __name__ == "__main__":
    main()
