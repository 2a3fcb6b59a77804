"""
Tests of packing.py: the padded and shared-prompt layouts and the chunked log-probs.

The reference for every log-prob is the plainest computation there is: each response run
alone through the model as one unpadded prompt + response sequence, full logits, log-softmax,
mean over the response's tokens, in a Python loop. Run: python -m pytest -q test_packing.py
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from model import Llama, LlamaConfig
from packing import (
    FlexAttention,
    PackingError,
    SegmentAttention,
    attention_mask,
    choose_attention,
    chunked_target_logprobs,
    packed_batch,
    padded_batch,
    response_logps,
)


def tiny_model(tie=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Llama(config).to(dtype)


def group(prompt, responses, scores=None, line=None):
    scores = scores if scores is not None else [float(i) for i in range(len(responses))]
    return SimpleNamespace(prompt_ids=prompt, response_ids=responses, scores=scores, line=line)


def random_groups(seed, num_groups=4, vocab=97):
    """Ragged groups: 2 to 5 responses, prompts of 1 to 12 tokens, responses of 1 to 15."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        n = int(torch.randint(lo, hi + 1, (), generator=g))
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    groups = []
    for _ in range(num_groups):
        K = int(torch.randint(2, 6, (), generator=g))
        groups.append(group(ids(1, 12), [ids(1, 15) for _ in range(K)], torch.rand(K, generator=g).tolist()))
    return groups


def reference_logps(model, groups):
    """(B, K) mean token log-prob, every response alone through the model: no padding, no mask, no packing."""
    K = max(len(g.response_ids) for g in groups)
    rows = []
    for g in groups:
        row = []
        for r in g.response_ids:
            ids = torch.tensor([g.prompt_ids + r])  # (1, P + L)
            logprobs = model(ids).float().log_softmax(-1)[0]  # (P + L, V)
            P = len(g.prompt_ids)
            # token P + j is predicted by position P + j - 1
            row.append(torch.stack([logprobs[P + j - 1, t] for j, t in enumerate(r)]).mean())
        row += [torch.zeros(())] * (K - len(row))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def grads_of(model, logps, weights):
    """Gradient of sum(weights * logps) for every parameter (tied weights counted once)."""
    model.zero_grad()
    (logps * weights).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [False, True])
def test_layouts_match_unshared_reference_values_and_grads(tie):
    """Packed (chunked head) and padded (full logits) per-response log-probs and parameter
    gradients equal the one-response-at-a-time loop, float32, <= 1e-5; packed with three row
    budgets: default (longest group), 1 (every group alone), 10**6 (all groups in one row), with
    SegmentAttention (the CPU default) and with SDPA under the dense mask."""
    model = tiny_model(tie=tie)
    groups = random_groups(seed=1, num_groups=5)
    ref = reference_logps(model, groups)
    mask = packed_batch(groups).mask
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)) * mask
    ref_grads = grads_of(model, reference_logps(model, groups), weights)

    candidates = {
        "padded/full": lambda: response_logps(model, padded_batch(groups, pad_id=5), full_logits=True),
        "padded/chunked": lambda: response_logps(model, padded_batch(groups), chunk_size=7),
        "packed/default": lambda: response_logps(model, packed_batch(groups), chunk_size=7),
        "packed/sdpa": lambda: response_logps(model, packed_batch(groups), chunk_size=7, attn_impl="sdpa"),
        "packed/segments": lambda: response_logps(model, packed_batch(groups), attn_impl="segments"),
        "packed/one-group-rows": lambda: response_logps(model, packed_batch(groups, max_row_tokens=1)),
        "packed/one-row": lambda: response_logps(model, packed_batch(groups, max_row_tokens=10**6), chunk_size=3),
        "packed/one-row/sdpa": lambda: response_logps(
            model, packed_batch(groups, max_row_tokens=10**6), attn_impl="sdpa"
        ),
        "packed/full": lambda: response_logps(model, packed_batch(groups), full_logits=True),
    }
    for name, compute in candidates.items():
        logps = compute()
        assert logps.dtype == torch.float32 and logps.shape == ref.shape, name
        torch.testing.assert_close(logps, ref, rtol=0, atol=1e-5, msg=lambda report, name=name: f"{name}: {report}")
        assert (logps[~mask] == 0).all(), name
        for pname, g in grads_of(model, compute(), weights).items():
            torch.testing.assert_close(
                g,
                ref_grads[pname],
                rtol=1e-4,
                atol=1e-6,
                msg=lambda report, name=name, pname=pname: f"{name}: {pname}: {report}",
            )


def test_packed_bf16_within_documented_tolerance():
    """bf16: packed (chunked) log-probs stay within 1e-2 nats (absolute, mean per-token log-prob)
    of the same bf16 model run one response at a time. The documented bf16 tolerance: the gap is
    rounding in matmuls of different shapes (the same order as bf16 against float32 itself), not
    the layout, which agrees to 1e-5 in float32 (above)."""
    model = tiny_model(dtype=torch.bfloat16)
    groups = random_groups(seed=3, num_groups=4)
    with torch.no_grad():
        ref = reference_logps(model, groups)
        logps = response_logps(model, packed_batch(groups), chunk_size=5)
        full = reference_logps(model.float(), groups)
    assert ref.dtype == logps.dtype == torch.float32
    torch.testing.assert_close(logps, ref, rtol=0, atol=1e-2)
    assert (logps - full).abs().max() > 0  # really ran in bf16


@pytest.mark.parametrize("attn_impl", ["sdpa", "segments"])
def test_groups_in_one_row_do_not_see_each_other(attn_impl):
    """Two groups packed into one row: changing every token of either group leaves the other's
    log-probs exactly as they were (and changes its own), and the mask has no cross-group entry."""
    model = tiny_model()
    a = group([3, 4, 5], [[6, 7], [8, 9, 10]])
    b = group([11, 12], [[13], [14, 15, 16], [17]])
    b2 = group([21, 22], [[23], [24, 25, 26], [27]])  # same lengths as b, other tokens
    a2 = group([31, 32, 33], [[36, 37], [38, 39, 40]])
    with torch.no_grad():
        ab = packed_batch([a, b], max_row_tokens=100)
        assert ab.input_ids.shape[0] == 1  # both groups share the row
        base = response_logps(model, ab, attn_impl=attn_impl)
        changed_b = response_logps(model, packed_batch([a, b2], max_row_tokens=100), attn_impl=attn_impl)
        changed_a = response_logps(model, packed_batch([a2, b], max_row_tokens=100), attn_impl=attn_impl)
    torch.testing.assert_close(changed_b[0], base[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(changed_a[1], base[1], rtol=0, atol=1e-6)
    present = ab.mask
    assert (changed_b[1] - base[1])[present[1]].abs().min() > 1e-3
    assert (changed_a[0] - base[0])[present[0]].abs().min() > 1e-3

    doc = ab.doc_ids[0]
    cross = doc[:, None] != doc[None, :]
    assert not ab.attn_mask[0][cross].any()


def test_packed_layout_by_hand():
    """Hand-written layout of prompt [1, 2] with responses [3, 4] and [5], then a second
    group [6] -> [7], in one row of budget 8 (7 tokens + 1 padding)."""
    batch = packed_batch([group([1, 2], [[3, 4], [5]], [0.5, 1.0]), group([6], [[7]], [2.0])], max_row_tokens=8)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7]]  # the first-fit row is exactly 7 long: no padding
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    # token 3 <- position 1 (last prompt token), 4 <- position 2, 5 <- position 1, 7 <- position 5
    assert batch.pred_pos.tolist() == [1, 2, 1, 5]
    assert batch.target_ids.tolist() == [3, 4, 5, 7]
    assert batch.response_index.tolist() == [0, 0, 1, 2]  # b * K + k with K = 2
    assert batch.num_scored.tolist() == [[2, 1], [1, 0]]
    assert batch.scores.tolist() == [[0.5, 1.0], [2.0, 0.0]]
    assert batch.mask.tolist() == [[True, True], [True, False]]
    assert batch.num_tokens == 7
    assert batch.num_logical_tokens == (2 + 2) + (2 + 1) + (1 + 1)
    x, _ = 1, 0
    expected = [
        [x, _, _, _, _, _, _],  # 1  prompt
        [x, x, _, _, _, _, _],  # 2  prompt
        [x, x, x, _, _, _, _],  # 3  response 0
        [x, x, x, x, _, _, _],  # 4  response 0
        [x, x, _, _, x, _, _],  # 5  response 1: the prompt and itself, not response 0
        [_, _, _, _, _, x, _],  # 6  second group's prompt
        [_, _, _, _, _, x, x],  # 7  second group's response
    ]
    assert batch.attn_mask[0].int().tolist() == expected


@pytest.mark.parametrize("make", [packed_batch, padded_batch])
def test_reference_logps_ride_along(make):
    """Groups carrying ref_logps (DPO) give batch.ref_logps (B, K) in group order, 0 in padding
    slots, kept by Batch.to(); groups without them give None."""
    a, b = group([1, 2], [[3, 4], [5]]), group([6], [[7], [8, 9], [10]])
    assert make([a, b]).ref_logps is None
    a.ref_logps, b.ref_logps = [-0.5, -1.5], [-2.0, -3.0, -4.0]
    batch = make([a, b]).to("cpu")
    assert batch.ref_logps.dtype == torch.float32
    assert batch.ref_logps.tolist() == [[-0.5, -1.5, 0.0], [-2.0, -3.0, -4.0]]


def test_padding_in_packed_rows_attends_only_to_padding():
    """Rows of different lengths: the padding at the end of the short row attends to padding
    only (so no query row is empty, which would give NaN in SDPA), and real tokens never see it."""
    batch = packed_batch([group([1, 2, 3], [[4, 5], [6]]), group([7], [[8], [9]])], max_row_tokens=6)
    assert batch.input_ids.shape == (2, 6)
    assert batch.input_ids[1].tolist() == [7, 8, 9, 0, 0, 0]
    m = batch.attn_mask[1]
    assert m[3:].int().tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert not m[:3, 3:].any()


def test_padded_layout_by_hand():
    """The naive layout: one causal row per present response, right-padded with pad_id."""
    batch = padded_batch([group([1, 2], [[3, 4], [5]]), group([6], [[7, 8, 9]])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4], [1, 2, 5, 0], [6, 7, 8, 9]]
    assert batch.attn_mask is None
    assert batch.pred_row.tolist() == [0, 0, 1, 2, 2, 2]
    assert batch.pred_pos.tolist() == [1, 2, 1, 0, 1, 2]
    assert batch.response_index.tolist() == [0, 0, 1, 2, 2, 2]
    assert batch.num_tokens == 12 and batch.num_logical_tokens == 4 + 3 + 4


def test_chunked_logprobs_match_full_in_value_and_gradient():
    """chunked_target_logprobs against log_softmax(h @ W^T).gather(targets) in float64: values
    and gradients for h and W, with a chunk size (8) that does not divide N (37)."""
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    g = torch.randn(37, dtype=torch.float64)
    ref = F.log_softmax(h @ w.T, dim=-1).gather(1, y[:, None]).squeeze(1)
    ref_gh, ref_gw = torch.autograd.grad((ref * g).sum(), (h, w))

    # float32 out (the log-softmax runs in float32 whatever the input dtype), so compare at float32 precision
    out = chunked_target_logprobs(h, w, y, chunk_size=8)
    gh, gw = torch.autograd.grad((out * g).sum(), (h, w))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-5)


def packed_qkv(seed=4):
    """A packed batch with padding, K from 2 to 5 and two groups sharing a row, and random q, k, v."""
    batch = packed_batch(random_groups(seed=seed, num_groups=5), max_row_tokens=40)
    assert (batch.doc_ids.max(dim=1).values != batch.doc_ids.min(dim=1).values).any()  # some row holds two groups
    assert (batch.doc_ids == -1).any()  # and some row ends in padding
    R, T = batch.input_ids.shape
    torch.manual_seed(seed)
    q, k, v = (torch.randn(R, 4, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    return batch, q, k, v


def test_segment_attention_matches_dense_mask_sdpa():
    """SegmentAttention (one SDPA call per prompt, response and padding run) against SDPA with the
    dense attention_mask() on the same packed batch: outputs and q/k/v gradients, float64."""
    batch, q, k, v = packed_qkv()
    g = torch.randn(q.shape, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.attn_mask[:, None])
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    out = SegmentAttention(batch)(q, k, v)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_flex_attention_matches_dense_mask_sdpa():
    """FlexAttention's BlockMask (flex_attention run eagerly on CPU, forward only: torch has no CPU
    flex backward) against SDPA with the dense attention_mask(), float32."""
    import warnings

    batch, q, k, v = packed_qkv()
    q, k, v = (t.detach().float() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.attn_mask[:, None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": eager is fine for a check
        out = FlexAttention(batch)(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_auto_attention_choice(monkeypatch):
    """'auto' on CPU: causal where no mask is needed; segments exactly when the masked-out (query,
    key) pairs x (heads x head_dim) reach SEGMENT_BREAK_EVEN per segment, counted by hand for one
    group [prompt P | K responses of L] in one row; sdpa for a model that takes no callable."""
    import packing

    model = tiny_model()  # 4 heads x head_dim 8
    width = 4 * 8
    assert choose_attention(model, packed_batch([group([1, 2], [[3, 4]])])) == "causal"
    P, K, L = 6, 3, 5
    batch = packed_batch([group(list(range(1, P + 1)), [[7] * L] * K)])
    T = P + K * L
    allowed = P * (P + 1) // 2 + K * (L * P + L * (L + 1) // 2)  # prompt causal; each response: prompt + itself causal
    per_segment = (T * T - allowed) * width / (1 + K)
    assert sum(map(len, SegmentAttention(batch).runs)) == 1 + K
    monkeypatch.setattr(packing, "SEGMENT_BREAK_EVEN", per_segment)
    assert choose_attention(model, batch) == "segments"
    monkeypatch.setattr(packing, "SEGMENT_BREAK_EVEN", per_segment * 1.001)
    assert choose_attention(model, batch) == "sdpa"
    assert choose_attention(model, batch, "segments") == "segments"  # an explicit choice stands

    monkeypatch.undo()
    short = packed_batch(random_groups(seed=4, num_groups=6))  # tokens in the tens: not worth a call per segment
    long = packed_batch([group(list(range(1, 101)), [[7] * 1000] * 4)])
    assert (choose_attention(model, short), choose_attention(model, long)) == ("sdpa", "segments")
    monkeypatch.setattr(Llama, "accepts_attention_fn", False)
    assert choose_attention(model, long) == "sdpa"
    with pytest.raises(ValueError, match="accepts_attention_fn"):
        choose_attention(model, long, "flex")


def test_attention_mask_rule_against_loop():
    """attention_mask() against the rule written as a double loop over random doc/seg ids."""
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(-1, 2, (2, 9), generator=g)
    seg = torch.randint(-1, 3, (2, 9), generator=g)
    m = attention_mask(doc, seg)
    for r in range(2):
        for q in range(9):
            for s in range(9):
                want = s <= q and doc[r, q] == doc[r, s] and (seg[r, s] == 0 or seg[r, s] == seg[r, q])
                assert bool(m[r, q, s]) == bool(want), (r, q, s)


@pytest.mark.parametrize(
    "bad, message",
    [
        (group([], [[1]]), "group 1 (line 7): empty prompt_ids"),
        (group([1], []), "group 1 (line 7): no responses"),
        (group([1], [[2], []]), "group 1 (line 7): response 1 is empty"),
        (group([1], [[2], [3]], [1.0]), "group 1 (line 7): 1 scores for 2 responses"),
    ],
)
def test_bad_groups_raise_one_clear_line(bad, message):
    """Bad input raises PackingError (a ValueError) naming the group and its source line."""
    bad.line = 7
    for layout in (packed_batch, padded_batch):
        with pytest.raises(PackingError, match=message.replace("(", r"\(").replace(")", r"\)")):
            layout([group([1], [[2]]), bad])


def _ddp_worker(rank, world_size, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    grads = {}
    for tie in (False, True):
        model = tiny_model(tie=tie)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        groups = random_groups(seed=6, num_groups=4)[rank::world_size]
        logps = response_logps(ddp, packed_batch(groups), chunk_size=4)
        logps.sum().backward()  # DDP averages gradients over ranks
        grads[tie] = {n: p.grad for n, p in model.named_parameters()}
        # free DDP's reducer while the process group lives: freed after destroy_process_group, the
        # group's destructor can wait on a gloo thread that waits for the GIL (a deadlock)
        del ddp, logps
    if rank == 0:
        torch.save(grads, out_file)
    dist.destroy_process_group()


def test_ddp_all_reduces_the_head_used_outside_forward(tmp_path):
    """Two gloo processes, the model in DistributedDataParallel, each rank half the groups: every
    gradient, lm_head's included (applied outside DDP's forward), equals the single-process
    gradient of the mean of the two ranks' losses; with untied and tied embeddings."""
    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    got = torch.load(out)
    for tie in (False, True):
        model = tiny_model(tie=tie)
        groups = random_groups(seed=6, num_groups=4)
        loss = sum(response_logps(model, packed_batch(groups[r::2]), full_logits=True).sum() for r in range(2)) / 2
        loss.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                got[tie][name],
                p.grad,
                rtol=1e-4,
                atol=1e-6,
                msg=lambda report, tie=tie, name=name: f"tie={tie}: {name}: {report}",
            )
