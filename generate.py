"""
Decoding with the model's KV cache: `sample_token` (greedy or nucleus sampling) and `generate`.
"""

import torch


def sample_token(logits, temperature=0.0, top_p=1.0, generator=None):
    """One token id from logits (V,): argmax when temperature is 0, else nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the most likely tokens until their mass reaches top_p (the first one always survives)
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs >= top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))  # multinomial renormalises


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=(), generator=None):
    """Continue one sequence (list of ids or a (T,) / (1, T) tensor) with a KV cache. Returns the new
    token ids only; the stop token, if one was produced, is the last of them. `generator` must live on
    the model's device."""
    device = model.model.embed_tokens.weight.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).view(1, -1)  # (1, T)
    cache = model.new_kv_cache(1, ids.shape[1] + max_new_tokens)
    stop_ids, new = set(stop_ids), []
    while len(new) < max_new_tokens:
        h = model(ids, kv_cache=cache, return_hidden=True)[0, -1]  # (H,): lm_head on the last position only
        new.append(sample_token(model.lm_head(h).float(), temperature, top_p, generator))
        if new[-1] in stop_ids:
            break
        ids = torch.tensor([[new[-1]]], device=device)  # (1, 1)
    return new
