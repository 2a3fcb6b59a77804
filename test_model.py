"""
Tests for model.py: parity with transformers' LlamaForCausalLM on tiny random checkpoints that
transformers itself writes and on the Hub's config.json files, packed shared-prompt attention, KV-cache
generation, gradient checkpointing and save/load round trips. The folder format's own checks (refused
configs, broken checkpoints, atomic writes) are in test_hf_format.py.

Run: python -m pytest -q test_model.py
"""

import json
import math
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from generate import generate, sample_token
from conftest import EXTRA_FILES, LLAMA3, make_checkpoint
from model import Llama, LlamaConfig

transformers.logging.set_verbosity_error()


def random_ids(B, T, seed=0):
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


PARITY_CASES = {
    "gqa-llama3-tied-sharded-newkeys": dict(shard=True),
    "gqa-llama3-untied-single-oldkeys": dict(old_style=True, tie=False, rope={**LLAMA3, "rope_theta": 500000.0}),
    "mha-headdim8-default-untied-sharded-oldkeys": dict(
        shard=True, old_style=True, tie=False, nkv=4, head_dim=8, rope=dict(rope_type="default", rope_theta=10000.0)
    ),
    "gqa-default-tied-single-newkeys": dict(rope=dict(rope_type="default", rope_theta=10000.0)),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_parity_with_transformers(tmp_path, case):
    """Our logits and final hidden states vs transformers' LlamaForCausalLM on the checkpoint it wrote,
    float32, 100 positions (beyond original_max_position_embeddings=64 where llama3 scaling applies)."""
    hf = make_checkpoint(tmp_path, **PARITY_CASES[case])
    ours = Llama.from_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists() == PARITY_CASES[case].get("shard", False)
    ids = random_ids(2, 100)
    with torch.no_grad():
        ref = hf(ids)
        hidden = hf.model(ids).last_hidden_state
        logits = ours(ids)
    assert logits.shape == (2, 100, 128) and logits.dtype == torch.float32
    assert ref.logits.std() > 1  # logits are spread out, so the comparison is not vacuous
    assert (logits - ref.logits).abs().max() <= 1e-4
    assert (ours(ids, return_hidden=True) - hidden).abs().max() <= 1e-4


def test_tolerated_extra_tensors(tmp_path):
    """A tied checkpoint whose file also holds lm_head.weight and a stale rotary_emb.inv_freq (as older
    transformers saved) loads, keeps lm_head tied to embed_tokens, and matches transformers' logits."""
    hf = make_checkpoint(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = Llama.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = random_ids(1, 20)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "configs")
# config.json of each checkpoint family as the Hub ships it: the keys we must ignore, the parameter count
# the model card / Hub page gives for the full-size model, and the sizes that shrink it to a tiny one
# (the same query-heads-per-key/value-head ratio, and head_dim only where the original states it)
HUB = {
    "HuggingFaceTB--SmolLM2-135M-Instruct": (
        ("is_llama_config", "rope_interleaved", "transformers.js_config"),
        134_515_008,
        dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2),
    ),
    "meta-llama--Llama-3.1-8B-Instruct": (
        (),
        8_030_261_248,
        dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1),
    ),
    "meta-llama--Llama-3.2-1B-Instruct": (
        (),
        1_235_814_400,
        dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    ),
    "TinyLlama--TinyLlama-1.1B-Chat-v1.0": (
        (),
        1_100_048_384,
        dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=1),
    ),
    "princeton-nlp--Llama-3-Base-8B-SFT": (
        ("_name_or_path",),
        8_030_261_248,
        dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1),
    ),
}


@pytest.mark.parametrize("name", HUB)
def test_hub_configs(tmp_path, capsys, name):
    """Each family's config.json exactly as the Hub ships it: the full-size model built from it (on the meta
    device) has the parameter count published for it. Shrunk (same keys, sizes of a few hundred K parameters)
    with random weights in model.safetensors, it reads here as transformers reads it (heads, head_dim, RoPE,
    token ids, tying) and gives transformers' logits (float32, <= 1e-4, 70 positions); from_pretrained names
    the ignored keys in one line."""
    ignored, n_params, sizes = HUB[name]
    with open(os.path.join(CONFIGS, name + ".json")) as f:
        raw = json.load(f)
    full = LlamaConfig.from_dict(raw)
    assert full.ignored_keys == ignored and full.torch_dtype == "bfloat16"
    with torch.device("meta"):
        assert sum(p.numel() for p in Llama(full).parameters()) == n_params
    tiny = {**raw, "vocab_size": 256, "intermediate_size": 96, "num_hidden_layers": 2, **sizes}
    assert tiny.keys() == raw.keys()
    (tmp_path / "config.json").write_text(json.dumps(tiny, indent=2))
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM(hf_config).float().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in hf.named_parameters():  # as in make_checkpoint: logits spread out
            p.copy_(
                1 + 0.2 * torch.randn(p.shape, generator=g)
                if "norm" in n
                else 2 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
            )
    state = {k: v for k, v in hf.state_dict().items() if not (hf_config.tie_word_embeddings and k == "lm_head.weight")}
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}  # stored as the Hub stores them
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    capsys.readouterr()
    ours = Llama.from_pretrained(tmp_path)
    printed = capsys.readouterr().out
    assert printed.count("ignoring") == bool(ignored) and all(k in printed for k in ignored)
    c = ours.config
    assert (c.num_key_value_heads, c.head_dim, c.tie_word_embeddings) == (
        hf_config.num_key_value_heads,
        hf_config.head_dim,
        hf_config.tie_word_embeddings,
    )
    assert (c.bos_token_id, c.eos_token_id, c.rope_theta) == (
        hf_config.bos_token_id,
        hf_config.eos_token_id,
        hf_config.rope_parameters["rope_theta"],
    )
    assert (c.rope_scaling or {}).get("factor") == hf_config.rope_parameters.get("factor")
    ids = random_ids(2, 70) * 2  # ids up to 254 of the 256
    with torch.no_grad():
        ref = hf(ids).logits
        assert ref.std() > 1
        assert (ours(ids) - ref).abs().max() <= 1e-4


def segment_mask_and_positions(segments):
    """Naive reference for a packed row: segments is a list of (kind, length, group) with kind 'prompt',
    'response' or 'pad'. A response attends to its group's prompt and causally to itself; positions
    continue from the end of the prompt. Padding attends only to itself."""
    T = sum(n for _, n, _ in segments)
    mask, pos, starts, t = torch.zeros(T, T, dtype=torch.bool), torch.zeros(T, dtype=torch.long), [], 0
    prompt = {}
    for kind, n, group in segments:
        for i in range(n):
            q = t + i
            if kind == "pad":
                mask[q, q] = True
                continue
            p0, plen = prompt.get(group, (t, 0)) if kind == "response" else (t, 0)
            for k in range(p0, p0 + plen):
                mask[q, k] = True
            for k in range(t, q + 1):
                mask[q, k] = True
            pos[q] = plen + i
        if kind == "prompt":
            prompt[group] = (t, n)
        starts.append(t)
        t += n
    return mask, pos, starts


def test_packed_shared_prompt_matches_separate_runs(tmp_path):
    """Two rows, each [prompt | r1 | r2 | ...] (row 2 padded, and holding two groups), in one forward with a
    bool mask and continuing positions, vs running every prompt+response separately: the logits of each
    prompt and response token agree to 1e-5 in float32."""
    make_checkpoint(tmp_path)
    model = Llama.from_pretrained(tmp_path)
    rows = [
        [("prompt", 7, 0), ("response", 5, 0), ("response", 3, 0), ("response", 4, 0)],
        [("prompt", 4, 1), ("response", 6, 1), ("prompt", 3, 2), ("response", 2, 2), ("pad", 4, None)],
    ]
    ids = random_ids(2, 19, seed=1)
    masks, positions = [], []
    for segments in rows:
        mask, pos, _ = segment_mask_and_positions(segments)
        masks.append(mask)
        positions.append(pos)
    with torch.no_grad():
        packed = model(ids, position_ids=torch.stack(positions), attn_mask=torch.stack(masks))
    checked = 0
    for b, segments in enumerate(rows):
        _, _, starts = segment_mask_and_positions(segments)
        prompts = {}  # group -> (start, length) of its prompt in this row
        for (kind, n, group), s in zip(segments, starts):
            if kind == "prompt":
                prompts[group] = (s, n)
            elif kind == "response":
                p, P = prompts[group]
                alone = torch.cat([ids[b, p : p + P], ids[b, s : s + n]])[None]  # (1, P + n)
                with torch.no_grad():
                    ref = model(alone)[0]  # (P + n, V)
                assert (packed[b, p : p + P] - ref[:P]).abs().max() <= 1e-5
                assert (packed[b, s : s + n] - ref[P:]).abs().max() <= 1e-5
                checked += 1
    assert checked == 5


def test_callable_attention_replaces_sdpa(tmp_path):
    """attn_mask may be a callable attention(q, k, v): called once per layer with (B, n_head, T,
    head_dim) tensors (keys/values already repeated for GQA), and a callable that runs SDPA under the
    same bool mask gives the same logits and, with gradient checkpointing, the same gradients."""
    make_checkpoint(tmp_path)  # 4 query heads, 2 key/value heads, head_dim 16, 2 layers
    model = Llama.from_pretrained(tmp_path)
    ids = random_ids(2, 19, seed=4)
    mask, pos, _ = segment_mask_and_positions([("prompt", 7, 0), ("response", 5, 0), ("response", 7, 0)])
    mask, pos = mask.expand(2, -1, -1), pos.expand(2, -1)
    shapes = []

    def attention(q, k, v):
        shapes.append((q.shape, k.shape, v.shape))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])

    def loss_and_grads(attn_mask, checkpointing):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        logits = model(ids, position_ids=pos, attn_mask=attn_mask)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_logits, ref_grads = loss_and_grads(mask, False)
    for checkpointing in (False, True):
        shapes.clear()
        logits, grads = loss_and_grads(attention, checkpointing)
        assert shapes[:2] == [(torch.Size([2, 4, 19, 16]),) * 3] * 2  # (checkpointing calls it again in backward)
        assert len(shapes) == (4 if checkpointing else 2)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="callable attn_mask cannot be combined with a kv_cache"):
        model(ids, attn_mask=attention, kv_cache=model.new_kv_cache(2, 32))


def naive_greedy(model, ids, n):
    """Argmax decoding with a full forward over the whole sequence at every step (no cache)."""
    ids, new = list(ids), []
    for _ in range(n):
        with torch.no_grad():
            new.append(int(model(torch.tensor([ids + new]))[0, -1].argmax()))
    return new


def test_generate_matches_full_forward_argmax(tmp_path):
    """KV-cache greedy generation vs argmax decoding with full forwards; stop_ids cut the output after the
    first stop token; nucleus sampling with a vanishing top_p can only pick the argmax."""
    make_checkpoint(tmp_path)
    model = Llama.from_pretrained(tmp_path)
    prompt = random_ids(1, 9, seed=2)[0].tolist()
    ref = naive_greedy(model, prompt, 16)
    assert len(set(ref)) > 3  # not a degenerate repeat-one-token sequence
    assert generate(model, prompt, 16) == ref
    assert generate(model, torch.tensor([prompt]), 16) == ref
    stop = ref[5]
    assert generate(model, prompt, 16, stop_ids=[stop]) == ref[: ref.index(stop) + 1]
    g = torch.Generator().manual_seed(0)
    assert generate(model, prompt, 16, temperature=1.0, top_p=1e-6, generator=g) == ref


def test_generate_bfloat16(tmp_path):
    """A bfloat16 model generates (cache and sampling stay dtype-consistent); its first greedy token equals
    the argmax of a full bfloat16 forward."""
    make_checkpoint(tmp_path)
    model = Llama.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    prompt = random_ids(1, 9, seed=2)[0].tolist()
    out = generate(model, prompt, 8, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert len(out) == 8 and all(0 <= t < 128 for t in out)
    assert generate(model, prompt, 1) == naive_greedy(model, prompt, 1)


def test_top_p_support():
    """Probabilities (0.5, 0.3, 0.15, 0.05) with top_p=0.7: the mass before token 1 is 0.5 < 0.7, before
    token 2 it is 0.8 >= 0.7, so only tokens {0, 1} can be drawn; top_p=1 can draw all four."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, 1.0, 0.7, g) for _ in range(300)} == {0, 1}
    assert {sample_token(logits, 1.0, 1.0, g) for _ in range(300)} == {0, 1, 2, 3}


def test_gradient_checkpointing_same_gradients(tmp_path):
    """Gradients of a packed-mask cross-entropy with gradient checkpointing on vs off are identical, and
    checkpointing really recomputes (each block's forward runs twice)."""
    make_checkpoint(tmp_path)
    model = Llama.from_pretrained(tmp_path).train()
    ids = random_ids(2, 19, seed=3)
    mask, pos, _ = segment_mask_and_positions([("prompt", 7, 0), ("response", 5, 0), ("response", 7, 0)])
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(checkpointing):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        calls.clear()
        logits = model(ids, position_ids=pos.expand(2, -1), attn_mask=mask.expand(2, -1, -1))
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-7)


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie):
    """save_pretrained -> from_pretrained is bit-exact; the folder has the HF sharded layout, no lm_head when
    tied, the source's tokenizer/generation files; transformers loads it and gives the same logits."""
    make_checkpoint(tmp_path / "src", shard=True, tie=tie)
    model = Llama.from_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    assert ("lm_head.weight" in index["weight_map"]) != tie
    shards = {f: load_file(out / f) for f in files}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for s in shards.values() for t in s.values())
    for f in files:
        with open(out / f, "rb") as fh:  # safetensors header: 8-byte length, then JSON holding __metadata__
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        assert header["__metadata__"] == {"format": "pt"}
    for name in [*EXTRA_FILES, "generation_config.json"]:
        assert (out / name).read_bytes() == (tmp_path / "src" / name).read_bytes()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folders left behind

    loaded = Llama.from_pretrained(out)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids(2, 90)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-4


def test_bfloat16_round_trip(tmp_path):
    """A model loaded in bfloat16 saves bfloat16 tensors and torch_dtype, and reloads bit-exactly."""
    make_checkpoint(tmp_path / "src")
    model = Llama.from_pretrained(tmp_path / "src", dtype="bfloat16")
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = Llama.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_save_in_given_dtype(tmp_path):
    """A float32 model saved with dtype="bfloat16": the files hold BF16 tensors equal to torch's own rounding
    of the float32 weights, config.json says torch_dtype "bfloat16", our loader reads those values back
    bit-exactly, and transformers loading the folder gives our logits from it (float32 compute, <= 1e-4)."""
    make_checkpoint(tmp_path / "src", tie=False)
    model = Llama.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "out", dtype="bfloat16")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    files = [f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]
    on_disk = {k: v for f in files for k, v in load_file(tmp_path / "out" / f).items()}
    assert on_disk.keys() == model.state_dict().keys()
    assert all(torch.equal(on_disk[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())
    loaded = Llama.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert all(torch.equal(on_disk[k], v) for k, v in loaded.state_dict().items())
    ours = Llama.from_pretrained(tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = random_ids(2, 40)
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() <= 1e-4
