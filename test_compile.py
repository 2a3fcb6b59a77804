"""
train.py --compile (torch.compile of each transformer block) against the same run in eager mode:
2 optimizer steps on the smallest Llama (conftest.TINY, one block), one process, with and without
--fsdp (a group of one: the blocks compiled under FSDP2's hooks). Both steps train on the same 4
groups, so every forward has the same shapes and each block compiles once (a new shape costs a
recompile, tens of seconds on 2 CPU cores); dense-mask SDPA attention, whose mask is a tensor input
(SegmentAttention's spans are Python values that a compiled block specialises on).
Skipped, with the reason, where torch.compile cannot run (no C++ compiler for inductor's CPU
kernels, a Python that dynamo does not support).

    python -m pytest test_compile.py -q
"""

import pytest
import torch
import torch.distributed as dist

from conftest import assert_same_training, copy_demo_rows, records, run, save_demo_llama, weights

LR = 1e-4  # one AdamW step moves a weight by about LR, whatever its gradient's size


def compile_error():
    """None if torch.compile's default backend (inductor) compiles and runs a small function here,
    else the first line of what it raised."""
    try:
        x = torch.arange(6.0)
        torch.testing.assert_close(torch.compile(lambda t: t.sin() * t)(x), x.sin() * x)
    except Exception as e:  # a missing compiler surfaces as any of several error types
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    error = compile_error()
    if error:
        pytest.skip(f"torch.compile does not work on this machine: {error}")
    root = tmp_path_factory.mktemp("compile")
    args = [
        "--model",
        save_demo_llama(root / "init"),
        "--data",
        copy_demo_rows("train.jsonl", 4, root / "train.jsonl"),
        "--loss",
        "pair_mnm",
        "--batch_size",
        4,
        "--micro_batch_size",
        4,
        "--max_steps",
        2,
        "--lr",
        LR,
        "--attn_impl",
        "sdpa",
        "--warmup_ratio",
        0,
        "--max_length",
        64,
        "--max_prompt_length",
        32,
        "--log_every",
        1,
        "--seed",
        0,
    ]
    return root, args


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_compiled_blocks_train_like_eager(tiny, fsdp):
    """Weights after 2 steps, and each step's loss and gradient norm: --compile against eager.
    Inductor fuses and reorders float32 sums (RMSNorm, SwiGLU, attention), so values agree to
    rounding, not bit for bit: losses and gradient norms to 1e-5 relative. A weight moves by
    about LR per AdamW step whatever its gradient, so the weights are compared to a small fraction
    of the 2 * LR that training moved them."""
    root, args = tiny
    extra = ["--fsdp"] if fsdp else []
    try:
        for name in ("eager", "compiled"):
            run(
                *args, "--out", root / f"{name}{'_fsdp' * fsdp}", *extra, *(["--compile"] if name == "compiled" else [])
            )
    finally:
        if dist.is_initialized():  # --fsdp in one process made a group of one; later tests expect none
            dist.destroy_process_group()
    eager, compiled = (root / f"{name}{'_fsdp' * fsdp}" for name in ("eager", "compiled"))
    a, b, start = weights(eager / "final"), weights(compiled / "final"), weights(args[1])
    assert all((a[k] - start[k]).abs().max() > LR / 2 for k in a)  # each tensor was trained
    assert_same_training(b, a, LR, steps=2)  # compiled kernels sum in another order
    x, y = records(eager, "train"), records(compiled, "train")
    assert [r["step"] for r in x] == [r["step"] for r in y] == [1, 2]
    for p, q in zip(x, y):
        for key in ("loss", "grad_norm"):
            assert q[key] == pytest.approx(p[key], rel=1e-5), (p["step"], key)
