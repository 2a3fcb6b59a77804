"""
Decoding with the model's KV cache: `generate` continues one sequence; `generate_batch` decodes many
prompts of different lengths together (left padding, per-row positions and an attention mask), each row
stopping on its own; `sample_n` draws n answers to one prompt from one prefill.

Sampling follows Hugging Face's order: logits / temperature, then top-k, then top-p on what top-k kept.
"""

import torch


def filter_probs(logits, temperature, top_p, top_k):
    """softmax(logits / T) restricted to the top_k most likely tokens (0: all), then to the smallest set
    of the most likely ones holding top_p of what is left (the first one always survives), renormalised.
    logits (B, V); temperature, top_p, top_k (B,) tensors, temperature > 0. Returns probs (B, V) float32."""
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)  # (B, V)
    if bool((top_p >= 1).all() and (top_k <= 0).all()):
        return probs  # nothing to cut: skip the sort
    V = probs.shape[-1]
    k = min(int(top_k.max()), V) if bool((top_k > 0).all()) else V
    # every row cut to at most k tokens: only the k largest need sorting
    sorted_probs, order = probs.topk(k, dim=-1) if k < V else probs.sort(dim=-1, descending=True)  # (B, k)
    rank = torch.arange(k, device=probs.device)
    sorted_probs = sorted_probs.masked_fill((top_k[:, None] > 0) & (rank >= top_k[:, None]), 0)
    sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)  # top-p sees what top-k kept
    # keep the most likely tokens until their mass reaches top_p
    sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None], 0)
    sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample_tokens(logits, temperature, top_p, top_k, generators=None):
    """One token id per row of logits (B, V): argmax where temperature is 0, else a draw from filter_probs.
    temperature, top_p, top_k: (B,) tensors. generators: None (the global generator), one torch.Generator
    drawing for every row, or a list with one per row (a row's draws then depend on nothing else in the
    batch; greedy rows draw nothing). Returns (B,) long."""
    greedy = logits.argmax(-1)  # (B,)
    hot = temperature > 0
    if not bool(hot.any()):
        return greedy
    probs = filter_probs(logits, torch.where(hot, temperature, 1.0), top_p, top_k)  # (B, V)
    if isinstance(generators, (list, tuple)):
        drawn = greedy.clone()
        for i in hot.nonzero()[:, 0].tolist():
            drawn[i] = torch.multinomial(probs[i], 1, generator=generators[i])[0]
    else:
        drawn = torch.multinomial(probs, 1, generator=generators)[:, 0]  # (B,)
    return torch.where(hot, drawn, greedy)


def sample_token(logits, temperature=0.0, top_p=1.0, generator=None, top_k=0):
    """One token id from logits (V,): argmax when temperature is 0, else top-k / nucleus sampling."""
    settings = [torch.tensor([x], device=logits.device) for x in (float(temperature), float(top_p), int(top_k))]
    return int(sample_tokens(logits[None], *settings, generators=[generator])[0])


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=(), generator=None, top_k=0):
    """Continue one sequence (list of ids or a (T,) / (1, T) tensor) with a KV cache. Returns the new
    token ids only; the stop token, if one was produced, is the last of them. `generator` must live on
    the model's device. The plain reference for generate_batch."""
    device = model.model.embed_tokens.weight.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).view(1, -1)  # (1, T)
    cache = model.new_kv_cache(1, ids.shape[1] + max_new_tokens)
    stop_ids, new = set(stop_ids), []
    while len(new) < max_new_tokens:
        h = model(ids, kv_cache=cache, return_hidden=True)[0, -1]  # (H,): lm_head on the last position only
        new.append(sample_token(model.lm_head(h).float(), temperature, top_p, generator, top_k))
        if new[-1] in stop_ids:
            break
        ids = torch.tensor([[new[-1]]], device=device)  # (1, 1)
    return new


def _per_row(value, n, name, dtype, device):
    """A setting given once or once per prompt, as an (n,) tensor."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} prompts")
    return torch.tensor(values, dtype=dtype, device=device)


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, stop_ids=(),
                   generators=None, num_samples=1):
    """Continue many prompts (lists of token ids, any lengths) together with one KV cache.

    The prompts are left-padded to the longest; each row's positions start at 0 on its first real token
    and an attention mask hides the padding, so a row computes what generate() computes for it alone
    (up to float rounding). Each prompt is prefilled once and its cache repeated num_samples times.
    temperature / top_p / top_k: one value, or a list with one per prompt. generators: None, one
    torch.Generator for all rows, or a list with one per output row (len(prompts) * num_samples, on the
    model's device) so that a row's draws do not depend on the rest of the batch. A row stops after one
    of stop_ids (kept as its last id) or max_new_tokens; finished rows leave the batch.
    Returns the new ids of each output row: prompt i's samples are rows i * num_samples ... + num_samples - 1."""
    device = model.model.embed_tokens.weight.device
    B, n = len(prompts), num_samples
    if B == 0 or max_new_tokens < 1:
        return [[] for _ in range(B * n)]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_batch: every prompt needs at least one token")
    if isinstance(generators, (list, tuple)) and len(generators) != B * n:
        raise ValueError(f"generators: {len(generators)} for {B * n} output rows")
    settings = [_per_row(v, B, name, dtype, device).repeat_interleave(n)
                for v, name, dtype in ((temperature, "temperature", torch.float32), (top_p, "top_p", torch.float32),
                                       (top_k, "top_k", torch.long))]
    L = max(len(p) for p in prompts)
    ids = torch.zeros(B, L, dtype=torch.long, device=device)
    valid = torch.zeros(B, L + max_new_tokens, dtype=torch.bool, device=device)  # which cache slots hold a token
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.as_tensor(p, dtype=torch.long)
        valid[i, L - len(p):] = True  # the slots of generated tokens count as valid from the start
    positions = (valid[:, :L].cumsum(-1) - 1).clamp(min=0)  # (B, L): 0 on each row's first real token
    mask = None  # causal: no padding anywhere
    if not bool(valid[:, :L].all()):
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        # a padding query sees itself, so that no softmax row is empty (SDPA would return NaN)
        mask = (valid[:, None, :L] & causal) | torch.eye(L, dtype=torch.bool, device=device)  # (B, L, L)
    cache = model.new_kv_cache(B, L + max_new_tokens)
    h = model(ids, position_ids=positions, attn_mask=mask, kv_cache=cache, return_hidden=True)[:, -1]  # (B, H)
    if n > 1:  # every sample of a prompt continues from the same prefill
        for c in cache:
            c.k, c.v = c.k.repeat_interleave(n, dim=0), c.v.repeat_interleave(n, dim=0)
        h, valid = h.repeat_interleave(n, dim=0), valid.repeat_interleave(n, dim=0)
    next_pos = valid[:, :L].sum(-1)  # (B * n,) position of each row's next token = its prompt length
    return _decode(model, cache, h, valid, next_pos, max_new_tokens, settings, set(stop_ids), generators)


def _decode(model, cache, h, valid, next_pos, max_new_tokens, settings, stop_ids, generators):
    """The decoding loop of generate_batch, from the last prefill hidden states h (R, H)."""
    R = h.shape[0]
    rows = torch.arange(R, device=h.device)  # output row of each live row
    out = [[] for _ in range(R)]
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=h.device)
    padded = not bool(valid.all())
    for step in range(max_new_tokens):
        gens = [generators[i] for i in rows.tolist()] if isinstance(generators, (list, tuple)) else generators
        tokens = sample_tokens(model.lm_head(h).float(), *settings, generators=gens)  # (r,)
        for row, t in zip(rows.tolist(), tokens.tolist()):
            out[row].append(t)
        live = ~torch.isin(tokens, stop)  # (r,)
        if step == max_new_tokens - 1 or not bool(live.any()):
            break
        if not bool(live.all()):  # finished rows leave the batch and its cache
            rows, tokens, next_pos, valid = rows[live], tokens[live], next_pos[live], valid[live]
            settings = [s[live] for s in settings]
            for c in cache:
                c.k, c.v = c.k[live], c.v[live]
        S = cache[0].length + 1  # cache slots in use once this token is in
        mask = valid[:, None, :S] if padded else None  # (r, 1, S)
        h = model(tokens[:, None], position_ids=next_pos[:, None], attn_mask=mask, kv_cache=cache,
                  return_hidden=True)[:, -1]  # (r, H)
        next_pos = next_pos + 1
    return out


def sample_n(model, prompt, n, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_ids=(), generator=None):
    """n answers to one prompt (a list of token ids): the prompt's prefill is computed once and its cache
    repeated n times. generator: None, one torch.Generator for all n rows, or a list of n."""
    return generate_batch(model, [prompt], max_new_tokens, temperature, top_p, top_k, stop_ids, generator,
                          num_samples=n)
