"""
bench.py end to end in its tiny configuration, as a subprocess, the way a user runs it, and its
flags (shapes, --attn_impl rows, --compile, the datasheet peaks).

Checks that it runs and prints the table it promises, with finite positive numbers, and that a
failing layout fails its row; timings are never asserted. Run: python -m pytest -q test_bench.py
"""

import math
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def table_rows(stdout):
    """{first cell: other cells} of the Markdown table's body rows in bench.py's output."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    return {c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:])}


def test_bench_tiny_prints_the_table():
    """`python bench.py --tiny --device cpu --attn_impl auto segments` exits 0 and prints the Markdown
    table: the naive row, one default row per attention (auto, the default, keeps its plain name),
    a ratio row to row 1 for each, with finite positive values in every column; and an 'attention of'
    line saying what each row ran (asked of packing.choose_attention in the child, not echoed from
    the flag: auto takes dense-mask SDPA for these short groups)."""
    out = subprocess.run(
        [sys.executable, "bench.py", "--tiny", "--device", "cpu", "--attn_impl", "auto", "segments"],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout
    lines = [line for line in out.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "layout",
        "groups/s",
        "processed tok/s",
        "logical tok/s",
        "peak memory (GiB)",
        "MFU (measured matmul)",
    ]
    rows = table_rows(out.stdout)
    assert list(rows) == [
        "1. naive (padded, full logits)",
        "2. default (packed, chunked head)",
        "3. default (packed, chunked head), attention segments",
        "ratio 2 / 1",
        "ratio 3 / 1",
    ]
    for name, cells in rows.items():
        assert len(cells) == len(header) - 1, name
        for cell in cells:
            value = float(re.fullmatch(r"([0-9.eE+-]+)[x%]?", cell).group(1))
            assert math.isfinite(value) and value > 0, (name, cell)
    assert "attention of 1. naive: SDPA, causal" in out.stdout
    assert "attention of 2. default: SDPA with a dense mask" in out.stdout
    assert "attention of 3. default: SDPA per segment (packing.SegmentAttention)" in out.stdout


def test_bench_failed_layout_fails_its_row_and_the_exit_code():
    """A layout whose child process fails or hangs (here every layout: --timeout 0.1 s ends each
    child before it has imported torch) shows 'failed' in each cell of its row, says why on its
    'attention of' line, and bench.py exits non-zero naming the layouts."""
    out = subprocess.run(
        [sys.executable, "bench.py", "--tiny", "--device", "cpu", "--timeout", "0.1"],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    rows = table_rows(out.stdout)
    assert rows == {
        "1. naive (padded, full logits)": ["failed"] * 5,
        "2. default (packed, chunked head)": ["failed"] * 5,
    }
    assert "attention of 1. naive: failed: timed out after 0.1 s" in out.stdout
    assert "error: naive, default:auto failed" in out.stderr


def test_shapes_flags_and_datasheet():
    """`--shape llama3-8b --layers 2` is Llama-3-8B's width with 2 blocks (the llama3-8b-width preset);
    flex is refused off CUDA in one line; --compile warms up 2 steps; the datasheet peak is matched
    to torch.cuda.get_device_name() strings, the PCIe/NVL parts before the SXM name they contain."""
    import pytest

    import bench

    a = bench.parse_args(["--device", "cpu", "--shape", "llama3-8b", "--layers", "2"])
    b = bench.parse_args(["--device", "cpu", "--shape", "llama3-8b-width"])
    keys = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "tie")
    assert [getattr(a, k) for k in keys] == [getattr(b, k) for k in keys] == [4096, 2, 32, 8, 14336, 128256, False]
    assert bench.parse_args(["--device", "cpu", "--shape", "llama3-8b"]).layers == 32
    assert bench.parse_args(["--tiny", "--device", "cpu", "--compile"]).warmup == 2
    assert bench.parse_args(["--tiny", "--device", "cpu"]).warmup == 1
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--device", "cpu", "--attn_impl", "sdpa", "flex"])
    assert bench.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.datasheet_peak("NVIDIA H200") == 989e12
    assert bench.datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert bench.datasheet_peak("NVIDIA H100 NVL") == 835e12
    assert bench.datasheet_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench.datasheet_peak("NVIDIA GeForce RTX 4090") is None


def test_compiled_blocks_compute_what_eager_blocks_do():
    """--compile: every block of bench's model is compiled (here with the aot_eager backend, which
    traces as inductor does but generates no code, so the test stays fast), and one packed training
    step's log-probs and gradients equal the same model run eagerly (float32, <= 1e-5)."""
    import torch

    import bench
    from packing import packed_batch, response_logps

    args = bench.parse_args(["--tiny", "--device", "cpu", "--compile", "--compile_backend", "aot_eager"])
    compiled = bench.build_model(args)
    args.compile = False
    eager = bench.build_model(args)
    assert all(block._compiled_call_impl is not None for block in compiled.model.layers)
    assert all(block._compiled_call_impl is None for block in eager.model.layers)
    batch = packed_batch(bench.make_groups(args, 2, seed=0))
    results = []
    for model in (eager, compiled):
        logps = response_logps(model, batch, attn_impl="sdpa")
        logps.sum().backward()
        results.append((logps.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-5)
    for g1, g0 in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)


def test_bench_generate_tiny_prints_both_tables():
    """`python bench.py --generate --tiny --device cpu` exits 0 and prints the decoding table (one at a
    time, transformers' generate, batched, and the batched / transformers ratio) and the MT-Bench-like
    table (one at a time, batched, ratio), every rate finite and positive; timings are not asserted."""
    out = subprocess.run(
        [sys.executable, "bench.py", "--generate", "--tiny", "--device", "cpu"],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout
    rows = table_rows(out.stdout)
    names = [n for n in rows if not n.startswith("---")]
    assert names == [
        "1. one at a time (generate.generate), 2 sequence(s)",
        "2. transformers generate, batch 4",
        "3. batched (generate.generate_batch), batch 4",
        "ratio 3 / 2 (batched / transformers)",
        "answering",
        "one at a time",
        "batched, 4 questions per batch",
        "ratio",
    ]
    for name in names[:3] + names[5:7]:
        value = float(rows[name][1 if name in names[5:7] else 0])
        assert math.isfinite(value) and value > 0, name
