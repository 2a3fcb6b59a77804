"""
GPU checks: the model against transformers' LlamaForCausalLM on the same GPU (float32 and bf16),
and the packed layout with each attention path (sdpa, segments, flex), forward and backward,
against the one-response-at-a-time loop on the GPU, in float32, under bf16 autocast (as train.py
runs on a GPU) and in pure bf16 (as bench.py runs).

Every test is skipped without CUDA. MPPO_TEST_DEVICE names the device instead (e.g. cuda:1, or
cpu for a dry run of the same tests on CPU, flex excluded: torch has no CPU flex backward).

    python -m pytest -q test_cuda.py                       # on a GPU machine
    MPPO_TEST_DEVICE=cpu python -m pytest -q test_cuda.py  # dry run on CPU

bf16 tolerances are relative, and honest for bf16: each bf16 result is compared with the float32
result of the same weights, and its error must stay within twice the error of the bf16 reference
computed the plain way (transformers' model; the one-response loop), plus a small floor. Two bf16
computations that differ only in kernel and summation order land within that; a real mistake
(wrong mask, lost precision in a float32 step) lands far outside it.
"""

import copy
import os
import warnings
from types import SimpleNamespace

import pytest
import torch

from conftest import spread_weights
from model import Llama, LlamaConfig
from packing import packed_batch, response_logps

DEVICE = os.environ.get("MPPO_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
ON_CPU = DEVICE is not None and torch.device(DEVICE).type == "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="needs a CUDA GPU (MPPO_TEST_DEVICE=cpu runs these on CPU as a dry run)"
)
IMPLS = [
    "sdpa",
    "segments",
    pytest.param("flex", marks=pytest.mark.skipif(ON_CPU, reason="torch has no flex_attention backward on CPU")),
]

# Llama-3-like in miniature: GQA (4 query heads, 2 key/value heads), head_dim 128 as in Llama 3 (the
# size the fused GPU attention kernels are tuned for), llama3 RoPE scaling active beyond 64 positions
SHAPE = dict(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=128,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 matmuls in full float32 (no TF32), so float32 comparisons mean float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def rel_err(a, b):
    """||a - b|| / ||b||, over the whole tensor."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -----------------------------------------------------------------------------
# the model against transformers on the same device


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama 3 written by transformers' own save_pretrained; returns (path, HF model on CPU)."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(**SHAPE, rope_parameters=dict(ROPE))
    hf = spread_weights(transformers.LlamaForCausalLM(config).eval(), seed=0)
    path = tmp_path_factory.mktemp("cuda") / "llama"
    hf.save_pretrained(path)
    return path, hf


def test_parity_with_transformers_float32(checkpoint):
    """Our logits on the device against transformers' LlamaForCausalLM on the same device, both
    float32 from the checkpoint transformers wrote, 300 positions (llama3 scaling active beyond 64):
    within 1e-4, as on CPU (test_model.py)."""
    path, hf = checkpoint
    ours = Llama.from_pretrained(path, dtype=torch.float32, device=DEVICE)
    hf = copy.deepcopy(hf).to(DEVICE)  # a copy: Module.to() casts in place, and the fixture is shared
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 300), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        ref = hf(ids).logits
        logits = ours(ids)
    assert logits.device.type == torch.device(DEVICE).type and logits.dtype == torch.float32
    assert ref.std() > 1  # spread out, so the comparison is not vacuous
    assert max_err(logits, ref) <= 1e-4


def test_parity_with_transformers_bf16(checkpoint):
    """Our model loaded in bf16 against transformers' model cast to bf16, on the same device, both
    measured against transformers in float32: our bf16 logits are within twice transformers' own
    bf16 error (max and mean absolute) plus a floor of 1e-2 (max) / 1e-3 (mean), and really are bf16
    (they differ from float32)."""
    path, hf = checkpoint
    ours = Llama.from_pretrained(path, dtype=torch.bfloat16, device=DEVICE)
    hf = copy.deepcopy(hf).to(DEVICE)
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 300), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        ref = hf(ids).logits.float()  # float32
        hf_bf16 = hf.to(torch.bfloat16)(ids).logits
        logits = ours(ids)
    assert logits.dtype == hf_bf16.dtype == torch.bfloat16
    ours_max, hf_max = max_err(logits, ref), max_err(hf_bf16, ref)
    ours_mean = (logits.float() - ref).abs().mean().item()
    hf_mean = (hf_bf16.float() - ref).abs().mean().item()
    assert ours_max > 0 and hf_max > 0
    msg = (
        f"bf16 error against float32: ours max {ours_max:.3g} mean {ours_mean:.3g}; "
        f"transformers max {hf_max:.3g} mean {hf_mean:.3g}"
    )
    assert ours_max <= 2 * hf_max + 1e-2, msg
    assert ours_mean <= 2 * hf_mean + 1e-3, msg


# -----------------------------------------------------------------------------
# the packed layout with each attention path against one response at a time


def model_on_device(dtype=torch.float32, seed=0):
    config = LlamaConfig(
        **SHAPE, rope_theta=ROPE["rope_theta"], rope_scaling={k: v for k, v in ROPE.items() if k != "rope_theta"}
    )
    with torch.device("cpu"):
        model = spread_weights(Llama(config), seed)
    return model.to(device=DEVICE, dtype=dtype)


def random_groups(seed, num_groups=4):
    """Ragged groups long enough to span several of flex_attention's 128-token blocks: 2 to 5
    responses, prompts of 1 to 160 tokens, responses of 1 to 120."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        n = int(torch.randint(lo, hi + 1, (), generator=g))
        return torch.randint(0, SHAPE["vocab_size"], (n,), generator=g).tolist()

    groups = []
    for _ in range(num_groups):
        K = int(torch.randint(2, 6, (), generator=g))
        groups.append(
            SimpleNamespace(
                prompt_ids=ids(1, 160),
                response_ids=[ids(1, 120) for _ in range(K)],
                scores=torch.rand(K, generator=g).tolist(),
            )
        )
    return groups


def loop_logps(model, groups):
    """(B, K) mean token log-prob, each response alone through the model as one unpadded
    prompt + response sequence (plain causal attention), full logits, log-softmax in float32."""
    K = max(len(g.response_ids) for g in groups)
    rows = []
    for g in groups:
        P, row = len(g.prompt_ids), []
        for r in g.response_ids:
            ids = torch.tensor([g.prompt_ids + r], device=DEVICE)  # (1, P + L)
            logprobs = model(ids)[0].float().log_softmax(-1)  # (P + L, V)
            targets = torch.tensor(r, device=DEVICE)
            row.append(
                logprobs[P - 1 : P - 1 + len(r)].gather(1, targets[:, None]).mean()
            )  # token P + j from position P + j - 1
        rows.append(torch.stack(row + [torch.zeros((), device=DEVICE)] * (K - len(row))))
    return torch.stack(rows)


def value_and_grads(model, compute, weights):
    """(logps, {name: gradient of sum(weights * logps)}), gradients in float32."""
    model.zero_grad(set_to_none=True)
    logps = compute()
    (logps * weights).sum().backward()
    return logps.detach(), {name: p.grad.float().clone() for name, p in model.named_parameters()}


def packed(model, groups, attn_impl, max_row_tokens=None):
    batch = packed_batch(groups, max_row_tokens=max_row_tokens).to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention run eagerly off CUDA warns; nothing here runs it so
        return response_logps(model, batch, chunk_size=100, attn_impl=attn_impl)


@pytest.mark.parametrize("max_row_tokens", [None, 10**6], ids=["row-per-group", "one-row"])
@pytest.mark.parametrize("attn_impl", IMPLS)
def test_packed_float32_matches_loop(attn_impl, max_row_tokens):
    """float32: packed per-response log-probs and all parameter gradients (of a random weighting of
    the log-probs) against the one-response loop on the same device, with each group in its own
    row and with all groups in one row (flex's block mask then also separates documents):
    log-probs within 1e-4 absolute, gradients within 1e-4 relative (whole-tensor norm)."""
    model = model_on_device()
    groups = random_groups(seed=1)
    mask = packed_batch(groups).mask.to(DEVICE)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE) * mask
    ref, ref_grads = value_and_grads(model, lambda: loop_logps(model, groups), weights)
    logps, grads = value_and_grads(model, lambda: packed(model, groups, attn_impl, max_row_tokens), weights)
    assert logps.shape == ref.shape and (logps[~mask] == 0).all()
    assert max_err(logps, ref) <= 1e-4, max_err(logps, ref)
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= 1e-4, (name, rel_err(g, ref_grads[name]))


@pytest.mark.parametrize("mode", ["autocast", "bf16"])
@pytest.mark.parametrize("attn_impl", IMPLS)
def test_packed_bf16_matches_loop(attn_impl, mode):
    """bf16, as train.py runs on a GPU (float32 weights, bf16 autocast) and as bench.py does (weights
    in bf16): packed log-probs and gradients against the float32 loop on the same weights; their
    error is within twice that of the one-response loop run the same bf16 way, plus a floor (mean
    absolute error over the responses + 2e-3 nats; whole-tensor relative error + 1e-2 per gradient).
    The mean, not the max: the largest of ~15 bf16 errors varies 2x between equally valid
    summation orders (seen on CPU), the mean by ~1.25x; a response gone wrong moves both."""
    model = model_on_device(torch.bfloat16 if mode == "bf16" else torch.float32)
    exact = model_on_device()
    exact.load_state_dict(
        {k: v.float() for k, v in model.state_dict().items()}
    )  # the same (bf16-rounded) weights, float32
    groups = random_groups(seed=3)
    mask = packed_batch(groups).mask.to(DEVICE)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE) * mask
    ref, ref_grads = value_and_grads(exact, lambda: loop_logps(exact, groups), weights)

    def bf16(compute):
        if mode == "bf16":
            return compute()
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            return compute()

    loop, loop_grads = value_and_grads(model, lambda: bf16(lambda: loop_logps(model, groups)), weights)
    logps, grads = value_and_grads(model, lambda: bf16(lambda: packed(model, groups, attn_impl)), weights)
    mean_err = lambda x: (x - ref)[mask].abs().mean().item()  # noqa: E731 (over real responses)
    assert logps.dtype == torch.float32 and mean_err(loop) > 0  # really computed in bf16
    assert mean_err(logps) <= 2 * mean_err(loop) + 2e-3, (mean_err(logps), mean_err(loop))
    for name, g in grads.items():
        got, want = rel_err(g, ref_grads[name]), rel_err(loop_grads[name], ref_grads[name])
        assert got <= 2 * want + 1e-2, (name, got, want)
