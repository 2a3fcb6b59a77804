"""
The demo's table over several seeds: `python train.py` prints one run (seed 0); this runs the same
demo with seeds 0, 1, 2 (initial weights and both stages' --seed) and prints each run and the mean
and standard deviation over them, so a reader can see how far one run's digits may move and compare
their own machine's (float32 sums in another order, another CPU's kernels, change the digits of
one run: the spread over seeds says by how much that matters).

    python scripts/demo_seeds.py                 # seeds 0 1 2, into out/demo-seeds/seed-N
    python scripts/demo_seeds.py --seeds 0 1 2 3 4
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402  (the repository root, added above)

COLUMNS = ("top1_acc", "pair_acc", "p_chosen", "p_rejected", "gen_success")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="out/demo-seeds")
    args = p.parse_args(argv)
    runs = {seed: dict(train.demo(os.path.join(args.out, f"seed-{seed}"), seed=seed)) for seed in args.seeds}
    print("| model | seed | top-1 acc of p | pairwise acc | p chosen | p rejected | greedy answers sorted |")
    print("|---|---|---|---|---|---|---|")
    for name in next(iter(runs.values())):
        for seed, rows in runs.items():
            print(f"| {name} | {seed} | " + " | ".join(f"{rows[name][c]:.3f}" for c in COLUMNS) + " |")
        cells = []
        for c in COLUMNS:
            values = [rows[name][c] for rows in runs.values()]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {std:.3f}")
        print(f"| {name} | mean ± std | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
