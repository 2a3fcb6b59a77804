"""
How groups become tensors, and how a model turns them into per-response log-probs.

A group is one prompt with K responses. MPPO needs, for every response, the mean
log-probability of its tokens given the prompt (the log of the paper's Eq. 4-5 reward).
Two layouts compute it:

padded_batch (the naive baseline): every response is its own row, prompt + response,
right-padded to the longest row. The prompt is computed K times and padding burns compute.

    row 0: [p p p a a a . .]
    row 1: [p p p b b b b b]
    row 2: [p p p c . . . .]

packed_batch (the default): each group is one sequence [prompt | r_1 | ... | r_K]; every
response attends to the prompt and causally to itself only, and its positions continue
from the end of the prompt, so each response sees exactly what it would see alone. Several
groups share a row, with no padding between them and no attention across them.

    row 0: [p p p a a a b b b b b c | q q r r s s]      q = prompt of the second group
    mask of the first group, x = may attend (query down, key across):
              p p p a a a b b b b b c
        p     x
        p     x x
        p     x x x
        a     x x x x
        a     x x x x x
        a     x x x x x x
        b     x x x       x
        ...                  (b sees the prompt and the b before it, never a)

The model computes that mask one of three ways (attn_impl, see choose_attention): 'sdpa' hands
it to scaled_dot_product_attention as a dense (T, T) bool mask, which works with any model but
computes all T^2 scores of a row, most of them hidden; 'segments' (SegmentAttention) makes one
SDPA call per prompt and per response, over only the keys it may see; 'flex' (FlexAttention)
runs flex_attention with a block mask (CUDA only: torch has no flex backward on CPU). The
last two are callables the model invokes in place of SDPA, so they need a model.py that accepts
one. 'auto' takes segments only where they skip enough work to pay for one call per segment
(long groups: yes; the demo's 60-token groups: no, where sdpa trains 1.7x faster); that
break-even is a CPU measurement (README). On CUDA 'auto' takes sdpa, the path every GPU stack
runs well (README, "Speed and memory", says how to time the three on a GPU).

response_logps never builds the (tokens, vocab) logits tensor, the largest memory cost of
preference training (Llama 3 has a 128,256-word vocabulary): it takes the final hidden
states, keeps only the positions that predict scored response tokens, and runs the
language-model head and the log-softmax over them a chunk at a time, recomputing each chunk
in backward (chunked_target_logprobs), so the loss needs memory for one chunk, not the batch.

score_groups is the one path from groups to log-probs that training, evaluation, DPO's reference
and eval.py share: micro-batches (data.micro_batches) -> make_batch -> the model's device ->
autocast -> response_logps, with the settings that travel together in a Scoring.

Depends on torch (and data.micro_batches). Groups are duck-typed: any object with .prompt_ids
(list[int]), .response_ids (list[list[int]]) and .scores (list[float]) works (data.TokenizedGroup does).
"""

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import micro_batches


class PackingError(ValueError):
    """A group that cannot be laid out (empty prompt or response, scores of the wrong length)."""


@dataclass
class Batch:
    input_ids: torch.Tensor  # (R, T) long, R rows of T tokens; padding holds pad_id
    position_ids: torch.Tensor  # (R, T) long, RoPE positions; a response continues from its prompt's end
    attn_mask: torch.Tensor | None  # (R, T, T) bool, True where query t may attend key s; None = plain causal
    doc_ids: torch.Tensor  # (R, T) long, which sequence a token belongs to (attention never crosses); -1 = padding
    seg_ids: torch.Tensor  # (R, T) long, 0 = prompt, k + 1 = response k, -1 = padding
    # one entry per scored token, i.e. per response token (N in total):
    pred_row: torch.Tensor  # (N,) long, the row ...
    pred_pos: torch.Tensor  # (N,) long, ... and position whose hidden state predicts the token
    target_ids: torch.Tensor  # (N,) long, the token itself
    response_index: torch.Tensor  # (N,) long, the response it belongs to, flat: b * K + k
    num_scored: torch.Tensor  # (B, K) long, scored tokens per response (0 in padding slots)
    scores: torch.Tensor  # (B, K) float32, 0 in padding slots
    mask: torch.Tensor  # (B, K) bool, False in the padding slots of groups with fewer than K responses
    num_tokens: int  # tokens the forward processes, padding included (R * T)
    num_logical_tokens: int  # prompt + response tokens counted once per response, as unshared and unpadded
    ref_logps: torch.Tensor | None = None  # (B, K) float32, the groups' ref_logps (DPO), 0 in padding slots; else None

    def to(self, device):
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return Batch(**moved)


def _check(groups):
    """Raise PackingError naming the group (and its source line when known) for bad input."""
    if len(groups) == 0:
        raise PackingError("no groups to lay out")
    for b, g in enumerate(groups):
        where = f"group {b}" + (f" (line {g.line})" if getattr(g, "line", None) is not None else "")
        if len(g.prompt_ids) == 0:
            # the first response token needs a position to be predicted from (Llama prompts start with BOS)
            raise PackingError(f"{where}: empty prompt_ids")
        if len(g.response_ids) == 0:
            raise PackingError(f"{where}: no responses")
        if len(g.scores) != len(g.response_ids):
            raise PackingError(f"{where}: {len(g.scores)} scores for {len(g.response_ids)} responses")
        for k, r in enumerate(g.response_ids):
            if len(r) == 0:
                raise PackingError(f"{where}: response {k} is empty (its mean log-prob is undefined)")


def _scores_and_mask(groups):
    B, K = len(groups), max(len(g.response_ids) for g in groups)
    scores = torch.zeros(B, K, dtype=torch.float32)
    mask = torch.zeros(B, K, dtype=torch.bool)
    num_scored = torch.zeros(B, K, dtype=torch.long)
    for b, g in enumerate(groups):
        n = len(g.response_ids)
        scores[b, :n] = torch.tensor([float(s) for s in g.scores])
        mask[b, :n] = True
        num_scored[b, :n] = torch.tensor([len(r) for r in g.response_ids])
    ref_logps = None
    if all(getattr(g, "ref_logps", None) is not None for g in groups):
        ref_logps = torch.zeros(B, K, dtype=torch.float32)
        for b, g in enumerate(groups):
            ref_logps[b, : len(g.ref_logps)] = torch.tensor(g.ref_logps, dtype=torch.float32)
    return K, scores, mask, num_scored, ref_logps


def attention_mask(doc_ids, seg_ids):
    """(R, T, T) bool from per-token ids: same sequence, causal, and a response sees only the prompt and itself.

    Padding (doc -1, seg -1) attends to the padding before it and to itself, so no query row is
    fully masked (SDPA returns NaN for a row with nothing to attend to); real tokens never see it.
    """
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (R, T, T)
    key_seg, query_seg = seg_ids[:, None, :], seg_ids[:, :, None]
    visible = (key_seg == 0) | (key_seg == query_seg)  # prompt, or the query's own segment
    return same_doc & visible & causal


class _Layout:
    """Accumulates rows token by token-span; turns into a Batch at the end."""

    def __init__(self, num_rows, T, pad_id):
        self.input_ids = torch.full((num_rows, T), pad_id, dtype=torch.long)
        self.position_ids = torch.zeros(num_rows, T, dtype=torch.long)
        self.doc_ids = torch.full((num_rows, T), -1, dtype=torch.long)
        self.seg_ids = torch.full((num_rows, T), -1, dtype=torch.long)
        self.pred_row, self.pred_pos, self.target_ids, self.response_index = [], [], [], []

    def put(self, row, start, ids, first_position, doc, seg):
        n = len(ids)
        self.input_ids[row, start : start + n] = torch.tensor(ids, dtype=torch.long)
        self.position_ids[row, start : start + n] = torch.arange(first_position, first_position + n)
        self.doc_ids[row, start : start + n] = doc
        self.seg_ids[row, start : start + n] = seg

    def score(self, row, prompt_last, start, ids, response):
        """Response tokens ids sit at [start, start + len); the first is predicted from the prompt's last position."""
        n = len(ids)
        self.pred_row.append(torch.full((n,), row, dtype=torch.long))
        self.pred_pos.append(torch.cat([torch.tensor([prompt_last]), torch.arange(start, start + n - 1)]))
        self.target_ids.append(torch.tensor(ids, dtype=torch.long))
        self.response_index.append(torch.full((n,), response, dtype=torch.long))

    def batch(self, groups, need_mask, num_logical_tokens):
        K, scores, mask, num_scored, ref_logps = _scores_and_mask(groups)
        return Batch(
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            attn_mask=attention_mask(self.doc_ids, self.seg_ids) if need_mask else None,
            doc_ids=self.doc_ids,
            seg_ids=self.seg_ids,
            pred_row=torch.cat(self.pred_row),
            pred_pos=torch.cat(self.pred_pos),
            target_ids=torch.cat(self.target_ids),
            response_index=torch.cat(self.response_index),
            num_scored=num_scored,
            scores=scores,
            mask=mask,
            num_tokens=self.input_ids.numel(),
            num_logical_tokens=num_logical_tokens,
            ref_logps=ref_logps,
        )


def _logical_tokens(groups):
    return sum(len(g.prompt_ids) * len(g.response_ids) + sum(map(len, g.response_ids)) for g in groups)


def padded_batch(groups, pad_id=0):
    """The naive layout: one right-padded row [prompt | response_k | pad ...] per present response.

    Rows are plain causal (attn_mask None): real tokens never look right, at the padding.
    """
    _check(groups)
    K = max(len(g.response_ids) for g in groups)
    T = max(len(g.prompt_ids) + len(r) for g in groups for r in g.response_ids)
    num_rows = sum(len(g.response_ids) for g in groups)
    layout = _Layout(num_rows, T, pad_id)
    row = 0
    for b, g in enumerate(groups):
        P = len(g.prompt_ids)
        for k, r in enumerate(g.response_ids):
            layout.put(row, 0, g.prompt_ids, 0, doc=row, seg=0)
            layout.put(row, P, r, P, doc=row, seg=k + 1)
            layout.score(row, P - 1, P, r, b * K + k)
            row += 1
    return layout.batch(groups, need_mask=False, num_logical_tokens=_logical_tokens(groups))


def packed_batch(groups, max_row_tokens=None, pad_id=0):
    """The shared-prompt layout: [prompt | r_1 | ... | r_K] per group, groups packed into rows.

    Rows hold at most max_row_tokens tokens (default: the longest group of this batch), filled
    first-fit in order of decreasing group length; a group longer than the budget gets a row of
    its own; shorter rows are right-padded. Why the default: SDPA with a dense mask costs T^2
    per row whatever the mask hides, so rows longer than the longest group buy no less padding
    than they cost in attention. Group b keeps index b in scores/mask whatever row it lands in.
    """
    _check(groups)
    K = max(len(g.response_ids) for g in groups)
    lengths = [len(g.prompt_ids) + sum(map(len, g.response_ids)) for g in groups]
    budget = max(lengths) if max_row_tokens is None else max_row_tokens
    if budget <= 0:
        raise PackingError(f"max_row_tokens must be positive, got {max_row_tokens}")

    # first-fit decreasing: place each group (longest first) in the first row with room
    row_of, row_used = [0] * len(groups), []
    for b in sorted(range(len(groups)), key=lambda b: -lengths[b]):
        for r, used in enumerate(row_used):
            if used + lengths[b] <= budget:
                row_of[b], row_used[r] = r, used + lengths[b]
                break
        else:
            row_of[b] = len(row_used)
            row_used.append(lengths[b])

    layout = _Layout(len(row_used), max(row_used), pad_id)
    fill = [0] * len(row_used)
    for b, g in enumerate(groups):
        row, start, P = row_of[b], fill[row_of[b]], len(g.prompt_ids)
        layout.put(row, start, g.prompt_ids, 0, doc=b, seg=0)
        at = start + P
        for k, r in enumerate(g.response_ids):
            layout.put(row, at, r, P, doc=b, seg=k + 1)  # positions restart at P for every response
            layout.score(row, start + P - 1, at, r, b * K + k)
            at += len(r)
        fill[row] = at
    # a row holding one single-response group is plain causal; anything else needs the mask
    need_mask = K > 1 or len(row_used) < len(groups)
    return layout.batch(groups, need_mask=need_mask, num_logical_tokens=_logical_tokens(groups))


def make_batch(groups, layout="packed", pad_id=0, max_tokens=None):
    """The Batch of a micro-batch of groups in either layout (max_tokens: row budget of 'packed')."""
    return packed_batch(groups, max_row_tokens=max_tokens) if layout == "packed" else padded_batch(groups, pad_id)


class _ChunkedTargetLogprobs(torch.autograd.Function):
    """log_softmax(h @ W^T)[target] per row, never holding the (N, V) logits; backward recomputes them.

    With z = h W^T, log p_y = z_y - logsumexp(z), so d log p_y / dz = onehot(y) - exp(z - logsumexp(z)):
    the backward needs only h, W, y and the N log-sum-exps. The forward takes chunk_size rows at a
    time, (C, V). The backward takes the vocabulary a slice at a time instead, (N, V_s) with about
    as many logits as a forward chunk: then each slice of W's gradient is one matmul over all N rows,
    written once in W's dtype (as nn.Linear's backward writes it), and nothing the size of W is kept
    besides that gradient; h's gradient, (N, H), is summed over the slices in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        N = hidden.shape[0]
        out = torch.empty(N, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        for i in range(0, N, chunk_size):
            # logits in the model's dtype, log-softmax in float32: what model(...).float().log_softmax() does
            z = (hidden[i : i + chunk_size] @ weight.T).float()  # (C, V)
            target_logit = z.gather(1, targets[i : i + chunk_size, None]).squeeze(1)  # (C,)
            m = z.amax(dim=1)  # (C,), subtracted so exp cannot overflow
            lse[i : i + chunk_size] = z.sub_(m[:, None]).exp_().sum(dim=1).log_().add_(m)
            out[i : i + chunk_size] = target_logit - lse[i : i + chunk_size]
            del z  # the float32 chunk goes before the next one is made
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        (N, H), V = hidden.shape, weight.shape[0]
        S = max(1, ctx.chunk_size * V // max(N, 1))  # vocabulary rows per slice: (N, S) logits, as many as a chunk
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros(N, H, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        g = grad_out[:, None]  # (N, 1)
        for v in range(0, V, S):
            w = weight[v : v + S]  # (S', H)
            dz = (hidden @ w.T).float()  # (N, S'), recomputed
            dz.sub_(lse[:, None]).exp_().mul_(-g)  # -g * softmax(z) ...
            in_slice = (targets >= v) & (targets < v + w.shape[0])
            column = (targets - v).clamp(0, w.shape[0] - 1)[:, None]  # the target's column, where it is in this slice
            dz.scatter_add_(1, column, g * in_slice[:, None])  # ... + g * onehot(y)
            dz = dz.to(weight.dtype)  # the float32 slice is freed here (a no-op in float32)
            if grad_weight is not None:
                torch.mm(dz.T, hidden, out=grad_weight[v : v + S])  # (S', H), all N rows in one matmul
            if grad_hidden is not None:
                grad_hidden += dz @ w  # (N, H), summed over slices in float32
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None


def chunked_target_logprobs(hidden, weight, targets, chunk_size=1024):
    """(N,) float32 log-prob of targets (N,) under logits hidden (N, H) @ weight (V, H)^T, never holding (N, V)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _ChunkedTargetLogprobs.apply(hidden, weight, targets, chunk_size)


def unwrap(model):
    """The Llama inside DistributedDataParallel (.module) and/or torch.compile (._orig_mod)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


class SegmentAttention:
    """Attention of a packed batch computed segment by segment: what the mask allows, and no more.

    SDPA with a dense (T, T) mask computes all T^2 scores of a row whatever the mask hides, and in
    a group [prompt | r_1 | ... | r_K] it hides most of them: of a 120-token prompt with four
    300-token responses, only a fifth of the row's T^2 pairs are allowed. Here each prompt (and
    each run of padding) is a causal SDPA call over its own span, and each response one SDPA call
    whose keys are its prompt followed by itself, under the (L, P + L) mask [all ones | causal].
    Same rule as attention_mask(), same result up to float rounding, several times fewer FLOPs.

    Called by the model in place of SDPA: y = attention(q, k, v), with q, k, v (R, nh, T, hs)
    (keys and values already repeated for grouped-query attention), returning (R, nh, T, hs).
    """

    def __init__(self, batch):
        # each row as runs of equal (doc, seg): (length, index of its prompt's run); a prompt or a
        # run of padding has no prompt of its own (None) and is plain causal
        self.runs = []
        for doc, seg in zip(batch.doc_ids.tolist(), batch.seg_ids.tolist()):
            runs, prompt_of, start = [], {}, 0
            for t in range(1, len(doc) + 1):
                if t == len(doc) or (doc[t], seg[t]) != (doc[start], seg[start]):
                    if seg[start] == 0:
                        prompt_of[doc[start]] = len(runs)
                    runs.append((t - start, prompt_of[doc[start]] if seg[start] > 0 else None))
                    start = t
            self.runs.append(runs)
        self.device = batch.input_ids.device
        self.masks = {}

    def response_mask(self, P, L):
        """(L, P + L) bool: every prompt key, then causal over the response's own keys."""
        if (P, L) not in self.masks:
            causal = torch.ones(L, L, dtype=torch.bool, device=self.device).tril()
            self.masks[P, L] = torch.cat([torch.ones(L, P, dtype=torch.bool, device=self.device), causal], dim=1)
        return self.masks[P, L]

    @torch.compiler.disable  # the span lengths are Python ints: compiled, every new batch layout would recompile
    def __call__(self, q, k, v):
        # split rather than index: the backward of one indexing op writes a gradient the size of
        # the whole input, so indexing run by run would cost (runs x batch) in backward. Pieces
        # stay 4-D (1, nh, n, hs): SDPA's fused CPU kernel takes only 4-D inputs (3-D ones fall
        # back to the math path, which keeps every score matrix for backward)
        rows = []
        for runs, qr, kr, vr in zip(self.runs, q.split(1), k.split(1), v.split(1)):  # (1, nh, T, hs) each
            sizes = [n for n, _ in runs]
            qs, ks, vs = qr.split(sizes, dim=2), kr.split(sizes, dim=2), vr.split(sizes, dim=2)  # (1, nh, n, hs) each
            parts = []
            for i, (n, p) in enumerate(runs):
                if p is None:
                    parts.append(F.scaled_dot_product_attention(qs[i], ks[i], vs[i], is_causal=True))
                else:  # keys and values: the prompt's, then the response's own
                    kk, vv = torch.cat([ks[p], ks[i]], dim=2), torch.cat([vs[p], vs[i]], dim=2)  # (1, nh, P + n, hs)
                    parts.append(
                        F.scaled_dot_product_attention(qs[i], kk, vv, attn_mask=self.response_mask(sizes[p], n))
                    )
            rows.append(torch.cat(parts, dim=2))  # (1, nh, T, hs)
        return torch.cat(rows)  # (R, nh, T, hs)


class FlexAttention:
    """Attention of a packed batch with flex_attention and a BlockMask (same rule as attention_mask()).

    flex_attention skips the blocks the mask hides entirely (other groups, other responses) in one
    fused kernel; fast only compiled, on CUDA (eager it materialises the scores; on CPU torch 2.13
    has no flex backward). Same calling convention as SegmentAttention. Untested on GPU here.
    """

    compiled = None  # torch.compile(flex_attention), built on first use

    def __init__(self, batch):
        from torch.nn.attention.flex_attention import create_block_mask

        doc, seg = batch.doc_ids, batch.seg_ids

        def mask_mod(b, h, q, kv):
            visible = (seg[b, kv] == 0) | (seg[b, kv] == seg[b, q])
            return (doc[b, q] == doc[b, kv]) & visible & (kv <= q)

        R, T = doc.shape
        self.block_mask = create_block_mask(mask_mod, R, None, T, T, device=doc.device)

    def __call__(self, q, k, v):
        from torch.nn.attention.flex_attention import flex_attention

        if q.is_cuda and FlexAttention.compiled is None:
            FlexAttention.compiled = torch.compile(flex_attention, dynamic=True)
        return (FlexAttention.compiled if q.is_cuda else flex_attention)(q, k, v, block_mask=self.block_mask)


# On CPU, SegmentAttention's Python loop costs about 0.2 ms per segment and layer (forward and
# backward, measured on the project's 2-core machine), whatever the segment's size; it pays off
# only when the segments skip enough masked work. Measured break-even: between 2e6 and 8e6
# skipped (query, key) pairs x (heads x head_dim) per segment; 'auto' asks for 5e6.
SEGMENT_BREAK_EVEN = 5e6


def choose_attention(model, batch, attn_impl="auto"):
    """'causal', 'sdpa' (dense mask), 'segments' or 'flex' for this batch. 'auto': plain causal when
    the batch needs no mask; else, when the model accepts a callable in place of the mask (its class
    says `accepts_attention_fn = True`), on CPU segments where they skip enough masked work to pay
    for their per-segment calls (SEGMENT_BREAK_EVEN), else sdpa; sdpa on CUDA."""
    if attn_impl not in ("auto", "sdpa", "segments", "flex"):
        raise ValueError(f"attn_impl must be 'auto', 'sdpa', 'segments' or 'flex', got {attn_impl!r}")
    inner = unwrap(model)
    accepts = getattr(inner, "accepts_attention_fn", False)
    if attn_impl in ("segments", "flex") and not accepts:
        raise ValueError(
            f"attn_impl={attn_impl!r} needs a model that accepts a callable attn_mask "
            f"(accepts_attention_fn = True); {type(inner).__name__} does not: use 'sdpa'"
        )
    if batch.attn_mask is None:
        return "causal"
    if attn_impl != "auto":
        return attn_impl
    if not accepts:
        return "sdpa"
    if batch.input_ids.device.type != "cpu":  # SEGMENT_BREAK_EVEN is a CPU measurement
        return "sdpa"
    width = inner.config.num_attention_heads * inner.config.head_dim
    skipped = batch.attn_mask.numel() - int(batch.attn_mask.sum())  # (query, key) pairs the mask hides
    doc, seg = batch.doc_ids, batch.seg_ids
    boundaries = (doc[:, 1:] != doc[:, :-1]) | (seg[:, 1:] != seg[:, :-1])
    segments = int(boundaries.sum()) + doc.shape[0]  # SDPA calls SegmentAttention would make
    return "segments" if skipped * width >= SEGMENT_BREAK_EVEN * segments else "sdpa"


def attention_for(model, batch, attn_impl="auto"):
    """What to pass as the model's attn_mask: None (plain causal), the dense bool mask, or a
    callable attention (SegmentAttention, FlexAttention) that the model calls in place of SDPA."""
    impl = choose_attention(model, batch, attn_impl)
    if impl == "causal":
        return None
    if impl == "sdpa":
        return batch.attn_mask
    return SegmentAttention(batch) if impl == "segments" else FlexAttention(batch)


def response_logps(model, batch, chunk_size=1024, full_logits=False, attn_impl="auto"):
    """(B, K) float32: mean log-prob of each response's tokens given its prompt; 0 in padding slots.

    The model is called through its own forward (so a DDP wrapper sees it) for the final hidden
    states; the head is applied here, with unwrap(model).lm_head.weight. Under DDP this is sound
    with the default find_unused_parameters=False: the head weight still gets its gradient in the
    same backward, which fires DDP's hook and all-reduces it like any other parameter (with
    find_unused_parameters=True DDP would mark it unused at forward time and then fail).

    attn_impl: see attention_for(). full_logits=True is the straightforward computation (model
    logits for every position, a full log-softmax), used by the naive baseline and as the
    reference in tests.
    """
    kwargs = dict(position_ids=batch.position_ids, attn_mask=attention_for(model, batch, attn_impl))
    if full_logits:
        logits = model(batch.input_ids, **kwargs)  # (R, T, V)
        logprobs = logits.float().log_softmax(dim=-1)  # (R, T, V)
        token_logps = logprobs[batch.pred_row, batch.pred_pos, batch.target_ids]  # (N,)
    else:
        hidden = model(batch.input_ids, return_hidden=True, **kwargs)  # (R, T, H)
        hidden = hidden[batch.pred_row, batch.pred_pos]  # (N, H), only positions predicting scored tokens
        head = unwrap(model).lm_head
        if getattr(head, "bias", None) is not None:
            raise ValueError("response_logps: lm_head with a bias is not supported (Llama has none)")
        if hasattr(head, "target_logprobs"):  # an FSDP unit of its own (parallel.Sharded), gathered around this call
            token_logps = head.target_logprobs(hidden, batch.target_ids, chunk_size)
        else:
            token_logps = chunked_target_logprobs(hidden, head.weight, batch.target_ids, chunk_size)
    B, K = batch.mask.shape
    sums = torch.zeros(B * K, dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, batch.response_index, token_logps)  # (B * K,)
    return sums.view(B, K) / batch.num_scored.clamp(min=1)


# -----------------------------------------------------------------------------
# scoring groups: micro-batches -> batch -> autocast -> log-probs, written once


@dataclass
class Scoring:
    """How groups become forwards: the settings that travel together from train.py's and eval.py's flags."""

    layout: str = "packed"  # "packed" (one sequence per group, shared prompt) or "padded" (the naive baseline)
    micro_batch_size: int = 4  # groups per forward
    max_tokens: int | None = None  # optional token budget of one forward (prompt + all responses)
    chunk_size: int = 1024  # positions per chunk of the language-model head
    attn_impl: str = "auto"  # attention of packed rows: see attention_for
    pad_id: int = 0  # token id written into padding (never scored)


def score_batch(model, batch, scoring, autocast=nullcontext()):
    """(B, K) float32: response_logps of one Batch already on the model's device, the forward under autocast
    (bf16 on GPU in train.py); with gradients when they are enabled."""
    with autocast:
        return response_logps(model, batch, chunk_size=scoring.chunk_size, attn_impl=scoring.attn_impl)


def score_groups(model, groups, scoring, autocast=nullcontext(), even=None):
    """Scores groups a micro-batch at a time, in order: yields (batch, logps) per micro-batch, batch its Batch
    on the model's device and logps its (B, K) float32 score_batch. even(micro_batches) -> [(micro_batch,
    real)] may add repeats (parallel.Sharded.even: under FSDP every rank must run as many forwards); they are
    run, not yielded. Training calls score_batch itself: its forward and backward share one gradient-sync
    context per micro-batch."""
    device = unwrap(model).lm_head.weight.device
    mbs = micro_batches(groups, scoring.micro_batch_size, scoring.max_tokens)
    for mb, real in even(mbs) if even else [(mb, True) for mb in mbs]:
        batch = make_batch(mb, scoring.layout, scoring.pad_id, scoring.max_tokens).to(device)
        logps = score_batch(model, batch, scoring, autocast)  # (B, K)
        if real:
            yield batch, logps
