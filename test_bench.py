"""
bench.py end to end in its tiny configuration, as a subprocess, the way a user runs it.

Checks only that it runs and prints the table it promises, with finite positive numbers;
timings are never asserted. Run: python -m pytest -q test_bench.py
"""

import math
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_bench_tiny_prints_the_table():
    """`python bench.py --tiny --device cpu` exits 0 and prints the Markdown table: the naive row,
    the default row and the ratio row, each with finite positive values in every column."""
    out = subprocess.run(
        [sys.executable, "bench.py", "--tiny", "--device", "cpu"],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout
    lines = [line for line in out.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["layout", "groups/s", "processed tok/s", "logical tok/s", "peak memory (GiB)", "MFU (measured matmul)"]
    rows = {c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:])}
    assert list(rows) == ["1. naive (padded, full logits)", "2. default (packed, chunked head)", "ratio 2 / 1"]
    for name, cells in rows.items():
        assert len(cells) == len(header) - 1, name
        for cell in cells:
            value = float(re.fullmatch(r"([0-9.eE+-]+)[x%]?", cell).group(1))
            assert math.isfinite(value) and value > 0, (name, cell)
