"""
Measure what loading a preference data set costs train.py and data.py (issue 23): wall time to the training
loop's first line, wall time in all, CPU seconds of every process of the command, and the peak RSS of the
largest one, for one process and for N gloo ranks under torchrun, with and without the tokenized-data cache.

    python scripts/make_ultrafeedback_like.py --out /tmp/uf64k --tokenizer DIR   # 64,000 groups, DIR/tokenizer.json
    python scripts/measure_loading.py --dir /tmp/uf64k                         # the table, in Markdown

Every command runs alone, one after another, with OMP_NUM_THREADS=1 and a fresh cache folder where the row says
"first launch"; train.py runs one step of 4 groups, one per micro-batch: a step of the same size on 50 groups as on
64,000, so the difference between two rows is the data's (give or take the lengths of the 4 groups drawn). "s to
the loop" is the time to the line that starts training, after the data and the model are loaded. Run it on a
machine with nothing else running: the wall times mean nothing otherwise (CPU seconds and RSS still do).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def measure(argv, env):
    """(seconds to the line 'training ... on N groups', seconds in all, CPU seconds, peak RSS in GB) of one command.
    wait4 gives the command's own resource use: the CPU time of it and every descendant it waited for (torchrun's
    ranks), and the largest RSS among them."""
    start, to_loop, lines = time.time(), None, []
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        lines.append(line)
        if to_loop is None and line.startswith("training "):
            to_loop = time.time() - start
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{''.join(lines[-20:])}")
    total = time.time() - start
    return to_loop, total, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20, lines  # ru_maxrss: KB on Linux


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="the folder make_ultrafeedback_like.py wrote (train.jsonl, model/)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="torchrun process counts to measure")
    p.add_argument("--small", type=int, default=50, help="groups of the floor run (the file's first lines)")
    args = p.parse_args()
    model, data = os.path.join(args.dir, "model"), os.path.join(args.dir, "train.jsonl")
    small = os.path.join(args.dir, f"first{args.small}.jsonl")
    with open(data) as f, open(small, "w") as out:
        for _ in range(args.small):
            out.write(f.readline())
    with open(data) as f:
        n_groups = sum(1 for line in f if line.strip())
    work = tempfile.mkdtemp(prefix="measure-loading-")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [0]

    def train(d, nproc=1, cache=None, note=""):
        runs[0] += 1
        out = os.path.join(work, f"out{runs[0]}")
        launcher = [sys.executable, "train.py"]
        if nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            launcher += ["train.py"]
        flags = ["--model", model, "--data", d, "--out", out, "--max_steps", "1", "--batch_size", "4"]
        flags += ["--micro_batch_size", "1"] + (["--cache_dir", cache] if cache else ["--no_cache"])
        row = measure(launcher + flags, env)
        shutil.rmtree(out, ignore_errors=True)
        return row

    cpu_of = {}

    def add(what, groups, row):
        to_loop, total, cpu, rss, _ = row
        cpu_of[what, groups] = cpu
        loop = "-" if to_loop is None else f"{to_loop:.1f}"
        print(f"| {what} | {groups} | {loop} | {total:.1f} | {cpu:.1f} | {rss:.2f} |", flush=True)

    print("| command | groups | s to the loop | s in all | CPU s | peak RSS GB |\n|---|---|---|---|---|---|")
    cache = os.path.join(work, "cache")
    add(
        "`python data.py` (statistics, writes the cache)",
        n_groups,
        measure([sys.executable, "data.py", "--model", model, "--data", data, "--cache_dir", cache], env),
    )
    shutil.rmtree(cache)
    add("`train.py --no_cache` (the floor)", args.small, train(small))
    add("`train.py --no_cache`", n_groups, train(data))
    add("`train.py`, first launch (tokenizes, writes the cache)", n_groups, train(data, cache=cache))
    add("`train.py`, second launch into a new `--out` (from the cache)", n_groups, train(data, cache=cache))
    for n in args.ranks:
        add(f"`torchrun --nproc_per_node {n}` `--no_cache` (the floor)", args.small, train(small, n))
        add(f"`torchrun --nproc_per_node {n}` `--no_cache`", n_groups, train(data, n))
        fresh = os.path.join(work, f"cache{n}")
        add(f"`torchrun --nproc_per_node {n}`, first launch", n_groups, train(data, n, cache=fresh))
        add(f"`torchrun --nproc_per_node {n}`, second launch (from the cache)", n_groups, train(data, n, cache=fresh))
    shutil.rmtree(work, ignore_errors=True)

    def data_cpu(n):  # CPU seconds of reading and tokenizing with n processes: the run minus its floor
        what = "`train.py --no_cache`" if n == 1 else f"`torchrun --nproc_per_node {n}` `--no_cache`"
        return cpu_of[what, n_groups] - cpu_of[what + (" (the floor)"), args.small]

    for n in args.ranks:
        print(
            f"reading and tokenizing, {n} ranks: {data_cpu(n):.1f} CPU s summed over the ranks, "
            f"{data_cpu(n) / data_cpu(1):.2f} x one process's {data_cpu(1):.1f}"
        )


if __name__ == "__main__":
    main()
