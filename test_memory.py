"""
memory.py's simulated per-rank memory against the same training step on real tensors, and the loss
head's backward (packing._ChunkedTargetLogprobs) against a naive full-logits reference.

The real run: 2 gloo processes on CPU (torchrun; this file is their worker), each running
memory.simulate(real=True), i.e. the same step with PyTorch's FSDP memory tracker counting real
tensors. The simulation: one process, fake tensors, a fake process group of 2. A small Llama with
untied embeddings (so the embedding and lm_head are FSDP units of their own) and every dim-0 size
even, so that each rank's shard of weights, gradients and the two AdamW moments is exactly
16 bytes x parameters / 2.

    python -m pytest test_memory.py -q
"""

import json
import os
import sys

import pytest
import torch

import memory
from conftest import run_cli
from packing import chunked_target_logprobs

SMALL = dict(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    torch_dtype="float32",
)
FLAGS = ["--nproc", "2", "--dtype", "float32", "--micro_batch_size", "2", "--max_tokens", "300", "--chunk_size", "64"]


def plan_flags(model_dir, *extra):
    return ["--model", str(model_dir), *FLAGS, *extra]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    with open(folder / "config.json", "w") as f:
        json.dump(SMALL, f)
    return folder


CASES = {"every, checkpointing": ["--fsdp", "--gradient_checkpointing"], "last": ["--fsdp", "--fsdp_grad_sync", "last"]}


@pytest.fixture(scope="module")
def real(small, tmp_path_factory):
    """{case: [rank 0's, rank 1's] peak and state}, from one torchrun of 2 gloo processes running every case."""
    out = tmp_path_factory.mktemp("real")
    flags = {case: plan_flags(small, *extra) for case, extra in CASES.items()}
    (out / "flags.json").write_text(json.dumps(flags))  # not on the command line: torchrun would take --nproc
    r = run_cli(out, nproc=2, script="test_memory.py")
    assert r.returncode == 0, r.stderr[-3000:]
    return {case: [json.loads((out / f"rank{rank}.json").read_text())[case] for rank in range(2)] for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_simulated_peak_matches_real_tensors(small, real, case):
    """Per-rank peak of one step (2 micro-steps) and the sharded state: the simulation (fake tensors, fake process
    group) against 2 real gloo ranks measured by the same tracker. The peak agrees within 10% on each rank; the
    float32 weights + gradients + AdamW moments a rank holds after the step are exactly 16 B x parameters / 2."""
    args = memory.parse_args(plan_flags(small, *CASES[case]))
    sim = memory.simulate(args, memory.read_shape(args.model), args.max_tokens)
    n = sim["n_params"]  # embedding + 2 x (q, k, v, o, MLP, 2 norms) + final norm + lm_head
    assert n == 1024 * 128 + 2 * (128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 256 + 2 * 128) + 128 + 1024 * 128
    assert sim["state"] == 16 * n // 2
    for rank in real[case]:
        assert rank["state"] == 16 * n // 2
        assert rank["total"] == pytest.approx(sim["total"], rel=0.10), (rank["rows"], sim["rows"])


def test_plan_prints_the_table(small, capsys):
    """The printed plan: the peak's total, where it happens, and the largest --max_tokens for the GPU size."""
    memory.main(plan_flags(small, "--fsdp", "--gpu_memory", "1"))
    out = capsys.readouterr().out
    assert "| **total** |" in out and "per GPU at the peak (" in out and "micro-step 2" in out
    assert "largest --max_tokens for 1 GB" in out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_gradients_equal_full_logits(dtype):
    """chunked_target_logprobs' log-probs and both gradients (hidden and weight) against the naive computation: full
    logits in float64, log_softmax, autograd. Chunks of 8 rows over 37 rows and, in backward, vocabulary slices
    (8 x 101 / 37 = 21 rows of W, the last one short) that cut through the targets. float32: float32 rounding over
    sums of ~100 terms; bfloat16: the logits and the gradients are rounded to bf16 (2^-8 relative) once."""
    torch.manual_seed(0)
    N, H, V = 37, 16, 101
    hidden = torch.randn(N, H).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(V, H)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,))
    grad_out = torch.randn(N)
    out = chunked_target_logprobs(hidden, weight, targets, chunk_size=8)
    out.backward(grad_out)
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = (h @ w.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    ref.backward(grad_out.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=4e-2)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    torch.testing.assert_close(hidden.grad.double(), h.grad, **tol)
    torch.testing.assert_close(weight.grad.double(), w.grad, **tol)


if __name__ == "__main__":  # torchrun --nproc_per_node 2 test_memory.py DIR: the real runs, flags in DIR/flags.json
    from parallel import setup_distributed

    rank = setup_distributed("cpu")[0]
    with open(os.path.join(sys.argv[1], "flags.json")) as f:
        cases = json.load(f)
    results = {}
    for case, flags in cases.items():
        args = memory.parse_args(flags)
        result = memory.simulate(args, memory.read_shape(args.model), args.max_tokens, real=True)
        results[case] = {"total": result["total"], "state": result["state"], "rows": result["rows"]}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()
