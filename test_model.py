"""
Tests for model.py: parity with transformers' LlamaForCausalLM on tiny random checkpoints that
transformers itself writes, packed shared-prompt attention, KV-cache generation, gradient
checkpointing, save/load round trips and the errors for refused configs and broken checkpoints.

Run: python -m pytest -q test_model.py
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import model as model_module
from generate import generate, sample_token
from hf_format import atomic_dir, clean_stale
from model import CheckpointError, ConfigError, Llama, LlamaConfig, check_pretrained

transformers.logging.set_verbosity_error()

LLAMA3 = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)  # with head_dim 16 this puts frequencies in all three llama3 bands
EXTRA_FILES = {"tokenizer.json": '{"model": "dummy"}\n', "chat_template.jinja": "{{ messages }}\n"}


def make_checkpoint(path, seed=0, shard=False, old_style=False, rope=LLAMA3, tie=True, nkv=2, head_dim=None):
    """Write a tiny random Llama checkpoint with transformers' own save_pretrained; return the HF model.
    Weights are redrawn at unit-ish scale so logits spread out (HF's 0.02 init gives near-constant logits)."""
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=nkv, head_dim=head_dim, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters=dict(rope), tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(2 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    hf.save_pretrained(path, max_shard_size="20KB" if shard else "10MB")
    for name, text in EXTRA_FILES.items():
        (path / name).write_text(text)
    if old_style:  # rewrite config.json with the keys transformers < 5 wrote
        d = json.loads((path / "config.json").read_text())
        rope_parameters = d.pop("rope_parameters")
        d["rope_theta"] = rope_parameters.pop("rope_theta")
        rope_type = rope_parameters.pop("rope_type")
        d["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope_parameters}
        d["torch_dtype"] = d.pop("dtype")
        (path / "config.json").write_text(json.dumps(d))
    return hf


def random_ids(B, T, seed=0):
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


PARITY_CASES = {
    "gqa-llama3-tied-sharded-newkeys": dict(shard=True),
    "gqa-llama3-untied-single-oldkeys": dict(old_style=True, tie=False, rope={**LLAMA3, "rope_theta": 500000.0}),
    "mha-headdim8-default-untied-sharded-oldkeys": dict(shard=True, old_style=True, tie=False, nkv=4, head_dim=8,
                                                       rope=dict(rope_type="default", rope_theta=10000.0)),
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
    "HuggingFaceTB--SmolLM2-135M-Instruct": (("is_llama_config", "rope_interleaved", "transformers.js_config"), 134_515_008,
                                             dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)),
    "meta-llama--Llama-3.1-8B-Instruct": ((), 8_030_261_248,
                                          dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1)),
    "meta-llama--Llama-3.2-1B-Instruct": ((), 1_235_814_400, dict(hidden_size=64, num_attention_heads=4,
                                                                   num_key_value_heads=1, head_dim=16)),
    "TinyLlama--TinyLlama-1.1B-Chat-v1.0": ((), 1_100_048_384,
                                            dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=1)),
    "princeton-nlp--Llama-3-Base-8B-SFT": (("_name_or_path",), 8_030_261_248,
                                           dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1)),
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
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in n else
                    2 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
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
        hf_config.num_key_value_heads, hf_config.head_dim, hf_config.tie_word_embeddings)
    assert (c.bos_token_id, c.eos_token_id, c.rope_theta) == (
        hf_config.bos_token_id, hf_config.eos_token_id, hf_config.rope_parameters["rope_theta"])
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
    rows = [[("prompt", 7, 0), ("response", 5, 0), ("response", 3, 0), ("response", 4, 0)],
            [("prompt", 4, 1), ("response", 6, 1), ("prompt", 3, 2), ("response", 2, 2), ("pad", 4, None)]]
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
                alone = torch.cat([ids[b, p:p + P], ids[b, s:s + n]])[None]  # (1, P + n)
                with torch.no_grad():
                    ref = model(alone)[0]  # (P + n, V)
                assert (packed[b, p:p + P] - ref[:P]).abs().max() <= 1e-5
                assert (packed[b, s:s + n] - ref[P:]).abs().max() <= 1e-5
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
    assert generate(model, prompt, 16, stop_ids=[stop]) == ref[:ref.index(stop) + 1]
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


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A save that dies after writing one shard leaves the checkpoint previously saved at that name intact
    and no temporary folder; a later successful save replaces it completely."""
    make_checkpoint(tmp_path / "src")
    model = Llama.from_pretrained(tmp_path / "src")
    out = tmp_path / "ckpt"
    model.save_pretrained(out, max_shard_size=40_000)
    first = {f: (out / f).read_bytes() for f in os.listdir(out)}

    real_save_file, written = model_module.save_file, []

    def dying_save_file(tensors, filename, metadata=None):
        if written:
            raise KeyboardInterrupt("simulated crash")
        written.append(filename)
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(model_module, "save_file", dying_save_file)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(out, max_shard_size=40_000)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == first
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "src"]

    monkeypatch.setattr(model_module, "save_file", real_save_file)
    model.save_pretrained(out)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "src"]
    assert torch.equal(Llama.from_pretrained(out).model.norm.weight, model.model.norm.weight)
    assert not (out / "model-00002-of-00002.safetensors").exists()


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


def test_save_not_atomic_writes_in_place(tmp_path):
    """atomic=False writes the model into an existing folder, keeping what else it holds, and makes no
    temporary sibling (the caller's own atomic_dir is the unit of atomicity)."""
    make_checkpoint(tmp_path / "src")
    model = Llama.from_pretrained(tmp_path / "src")
    with atomic_dir(tmp_path / "ckpt") as folder:
        (folder / "trainer_state.pt").write_text("x")
        model.save_pretrained(folder, atomic=False)
        assert sorted(os.listdir(tmp_path)) == ["ckpt.tmp", "src"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "src"]
    assert (tmp_path / "ckpt" / "trainer_state.pt").read_text() == "x"
    assert torch.equal(Llama.from_pretrained(tmp_path / "ckpt").lm_head.weight, model.lm_head.weight)


CRASH_SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
CRASH_CONFIG = LlamaConfig(**CRASH_SIZES)
CRASH_SAVE = f"""
import sys, torch
from model import Llama, LlamaConfig
torch.manual_seed(1)
model = Llama(LlamaConfig(**{CRASH_SIZES!r}))
model.save_pretrained(sys.argv[1], source_dir=sys.argv[2], max_shard_size=60_000)
"""


def test_killed_save_never_leaves_half_a_checkpoint(tmp_path):
    """Saves over an existing checkpoint, each killed (SIGKILL, MPPO_CRASH_AFTER=k) at its k-th crash point,
    k = 1..9 (beyond the last point the save completes): after every kill the final name holds either the
    old checkpoint or the new one, complete (it loads, and every tensor equals one of the two models, built
    here with the same seeds), or is absent between the two renames; clean_stale then leaves exactly one
    complete checkpoint there (the old one until the new one was renamed into place), no *.tmp / *.old."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    models = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        models[seed] = Llama(CRASH_CONFIG)
    models[0].save_pretrained(tmp_path / "old", source_dir=src)
    repo = os.path.dirname(os.path.abspath(__file__))
    runs = {}
    for k in range(1, 10):  # independent runs, a few at a time (each is mostly torch's import)
        shutil.copytree(tmp_path / "old", tmp_path / f"run{k}" / "ckpt")
        runs[k] = subprocess.Popen([sys.executable, "-c", CRASH_SAVE, str(tmp_path / f"run{k}" / "ckpt"), str(src)],
                                   cwd=repo, env={**os.environ, "MPPO_CRASH_AFTER": str(k)})
        if k % 3 == 0:
            [run.wait() for run in runs.values()]
    seen = []
    for k, run in runs.items():
        out = tmp_path / f"run{k}" / "ckpt"
        assert run.wait() in (0, -signal.SIGKILL)
        states = []
        for repaired in (False, True):
            if repaired:
                clean_stale(out.parent)
                assert os.listdir(out.parent) == ["ckpt"]
            if out.exists():
                weights = Llama.from_pretrained(out).state_dict()
                which = [s for s, m in models.items()
                         if all(torch.equal(weights[n], w) for n, w in m.state_dict().items())]
                assert len(which) == 1 and (out / "tokenizer.json").exists()
                states.append(which[0])
            else:
                assert not repaired and run.returncode != 0
                states.append(None)
        seen.append((run.returncode == 0, *states))
    killed = [s for s in seen if not s[0]]
    assert seen == killed + [(True, 1, 1)] * (len(seen) - len(killed))  # every run past the last point completes
    assert killed[0] == (False, 0, 0) and (False, None, 0) in killed and killed[-1] == (False, 1, 1)
    assert len(killed) == 8  # after two shards, index, config, tokenizer file; before, between, after the renames


def test_clean_stale_repairs_leftovers(tmp_path):
    """clean_stale, on a folder left by crashes: NAME.tmp is removed; NAME.old is restored when NAME is gone
    and removed when NAME exists; hidden .NAME.tmp-PID / .NAME.old-PID folders (older saves) likewise;
    files and other folders are untouched. atomic_dir repairs its own name the same way before writing,
    and removes its temporary folder when the body raises."""
    for name in ("a.tmp", "b.old", "c", "c.old", ".d.tmp-12", ".e.old-34", ".f.old-56", "f", "g.old.keep"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "marker").write_text(name)
    (tmp_path / "h.tmp").write_text("a file")
    assert sorted(clean_stale(tmp_path)) == ["restored b from b.old", "restored e from .e.old-34"]
    assert sorted(os.listdir(tmp_path)) == ["b", "c", "e", "f", "g.old.keep", "h.tmp"]
    assert [(tmp_path / n / "marker").read_text() for n in ("b", "c", "e", "f")] == ["b.old", "c", ".e.old-34", "f"]
    (tmp_path / "b").rename(tmp_path / "x.old")
    (tmp_path / "x.tmp").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "x") as tmp:
            assert tmp == tmp_path / "x.tmp" and not os.listdir(tmp)
            raise RuntimeError
    assert not (tmp_path / "x.tmp").exists() and (tmp_path / "x" / "marker").read_text() == "b.old"


BASE_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=64,
                   intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   rope_parameters=dict(LLAMA3))
REFUSED = {  # case: (change to BASE_CONFIG, what the message must say: the key, and for most the value)
    "other-architecture": (dict(architectures=["MistralForCausalLM"]), "'architectures' is \\['MistralForCausalLM'\\]"),
    "model-type": (dict(model_type="mistral"), "'model_type' is 'mistral'"),
    "attention-bias": (dict(attention_bias=True), "'attention_bias' is True"),
    "mlp-bias": (dict(mlp_bias=True), "'mlp_bias' is True"),
    "activation": (dict(hidden_act="gelu"), "'hidden_act' is 'gelu'"),
    "quantized": (dict(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
                  "'quantization_config' is {'quant_method': 'bitsandbytes'"),
    "string-size": (dict(hidden_size="96"), "'hidden_size' is '96'; expected a positive integer"),
    "bool-size": (dict(num_hidden_layers=True), "'num_hidden_layers' is True"),
    "string-eps": (dict(rms_norm_eps="1e-5"), "'rms_norm_eps' is '1e-5'; expected a number"),
    "bad-eos-list": (dict(eos_token_id=[1, "2"]), "'eos_token_id' is \\[1, '2'\\]"),
    "bad-dtype": (dict(torch_dtype="int8"), "'torch_dtype' is 'int8'"),
    "gqa-heads": (dict(num_key_value_heads=3), "'num_key_value_heads'"),
    "missing-size": (dict(hidden_size=None), "'hidden_size'"),
    "rope-type-new": (dict(rope_parameters=dict(rope_type="yarn", factor=4.0)), "'rope_parameters.rope_type' is 'yarn'"),
    "rope-type-old": (dict(rope_parameters=None, rope_scaling=dict(type="linear", factor=2.0)),
                      "'rope_scaling.rope_type' is 'linear'"),
    "rope-dynamic": (dict(rope_parameters=None, rope_scaling=dict(type="dynamic", factor=2.0)),
                     "'rope_scaling.rope_type' is 'dynamic'"),
    "rope-longrope": (dict(rope_parameters=None, rope_scaling=dict(rope_type="longrope", long_factor=[1.0], short_factor=[1.0])),
                      "'rope_scaling.rope_type' is 'longrope'"),
    "rope-yarn-old": (dict(rope_parameters=None, rope_scaling=dict(rope_type="yarn", factor=4.0)),
                      "'rope_scaling.rope_type' is 'yarn'"),
    "rope-string-theta": (dict(rope_parameters=None, rope_theta="10000"), "'rope_theta' is '10000'"),
    "rope-missing-factor": (dict(rope_parameters=dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0)),
                            "'rope_parameters.factor'"),
    "rope-unknown-key": (dict(rope_parameters={**LLAMA3, "mscale": 1.0}), "'rope_parameters.mscale'"),
    "rope-conflict": (dict(rope_theta=500000.0), "'rope_parameters' disagrees"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_configs(tmp_path, case):
    """Each config the model cannot honour raises ConfigError naming config.json, the key and (where it has
    one) the value, from LlamaConfig.from_json and from check_pretrained on the folder, before any weights
    are looked for (the folder has none)."""
    change, match = REFUSED[case]
    d = {k: v for k, v in {**BASE_CONFIG, **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(d))
    for load, arg in ((LlamaConfig.from_json, tmp_path / "config.json"), (check_pretrained, tmp_path)):
        with pytest.raises(ConfigError, match=match) as err:
            load(arg)
        assert str(tmp_path / "config.json") in str(err.value) and "\n" not in str(err.value)


def test_config_not_json(tmp_path):
    """A config.json that is not valid JSON (a truncated download) raises one ConfigError line naming it."""
    (tmp_path / "config.json").write_text(json.dumps(BASE_CONFIG)[:-20])
    with pytest.raises(ConfigError, match="not valid JSON") as err:
        check_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value) and "\n" not in str(err.value)


def test_ignored_keys(tmp_path, capsys):
    """Keys transformers' LlamaConfig does not read (tool metadata, sliding_window, which Llama does not
    have) are ignored, recorded in config.ignored_keys in file order and named in the one line
    from_pretrained prints; transformers' own bookkeeping keys are read silently; torch_dtype is kept."""
    extra = {"_name_or_path": "me/model", "auto_map": {"AutoConfig": "x.Config"}, "unsloth_version": "2024.9",
             "sliding_window": 4096, "transformers_version": "4.44.0", "use_cache": False, "torch_dtype": "float16"}
    config = LlamaConfig.from_dict({**BASE_CONFIG, **extra})
    assert config.ignored_keys == ("_name_or_path", "auto_map", "unsloth_version", "sliding_window")
    assert config.torch_dtype == "float16" and config == LlamaConfig.from_dict(BASE_CONFIG)
    make_checkpoint(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, **extra}))
    capsys.readouterr()
    Llama.from_pretrained(tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{tmp_path / 'config.json'}: ignoring _name_or_path, auto_map, unsloth_version, sliding_window "
                     "(transformers does not read them either)"]


def test_accepted_config_spellings():
    """Old keys (rope_theta + rope_scaling with 'type'), new rope_parameters, and both at once when they
    agree, all give the same config; null values count as absent; unusual spellings of the fixed values
    transformers accepts are accepted."""
    old = {**BASE_CONFIG, "rope_parameters": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
           "rope_scaling": {k if k != "rope_type" else "type": v for k, v in LLAMA3.items() if k != "rope_theta"}}
    both = {**BASE_CONFIG, "rope_theta": 10000.0, "head_dim": None, "pad_token_id": None}
    configs = [LlamaConfig.from_dict(d) for d in (old, BASE_CONFIG, both)]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert (configs[0].head_dim, configs[0].num_key_value_heads) == (16, 2)
    assert LlamaConfig.from_dict(configs[0].to_dict()) == configs[0]
    # transformers computes "swish" as SiLU, and an integer 0 dropout is no dropout
    assert LlamaConfig.from_dict({**BASE_CONFIG, "hidden_act": "swish", "attention_dropout": 0}) == configs[1]


def _rewrite(file, edit):
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})


def _single_missing(p):
    _rewrite(p / "model.safetensors", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    return "model.layers.1.mlp.up_proj.weight", "model.safetensors"


def _single_shape(p):
    _rewrite(p / "model.safetensors", lambda s: s.update({"model.norm.weight": torch.ones(65)}))
    return r"'model.norm.weight' has shape \(65,\)", "model.safetensors"


def _single_unexpected(p):
    _rewrite(p / "model.safetensors", lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    return "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'", "model.safetensors"


def _shard_missing(p):
    index = json.loads((p / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    os.remove(p / shard)
    return f"shard '{shard}' is missing", "model.safetensors.index.json"


def _shard_missing_tensor(p):
    index = json.loads((p / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.down_proj.weight"
    _rewrite(p / index["weight_map"][name], lambda s: s.pop(name))
    return f"missing tensor '{name}'", index["weight_map"][name]


def _shard_unlisted(p):
    index = json.loads((p / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.embed_tokens.weight"]
    (p / "model.safetensors.index.json").write_text(json.dumps(index))
    return "missing tensor 'model.embed_tokens.weight'", "model.safetensors.index.json"


def _single_truncated(p):
    file = p / "model.safetensors"
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[:-100])  # an interrupted download: the last tensor's bytes are cut short
    return f"truncated: tensor 'model\\.[^']+' ends at byte {size}, the file has {size - 100}", "model.safetensors"


def _single_garbage_header(p):
    file = p / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:12] = b"#!?x"  # the JSON header no longer parses
    file.write_bytes(bytes(data))
    return "the safetensors header does not parse", "model.safetensors"


def _single_int_dtype(p):
    _rewrite(p / "model.safetensors", lambda s: s.update({"model.norm.weight": torch.ones(64, dtype=torch.int8)}))
    return "'model.norm.weight' is stored as I8", "model.safetensors"


def _shard_index_not_json(p):
    (p / "model.safetensors.index.json").write_text('{"weight_map": {')
    return "not a valid index", "model.safetensors.index.json"


BROKEN = {"missing-tensor": (_single_missing, False), "wrong-shape": (_single_shape, False),
          "unexpected-tensor": (_single_unexpected, False), "truncated": (_single_truncated, False),
          "garbage-header": (_single_garbage_header, False), "int-dtype": (_single_int_dtype, False),
          "missing-shard": (_shard_missing, True), "shard-lacks-listed-tensor": (_shard_missing_tensor, True),
          "tensor-not-in-index": (_shard_unlisted, True), "index-not-json": (_shard_index_not_json, True)}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoints(tmp_path, case, monkeypatch):
    """Each broken checkpoint raises one CheckpointError line naming the tensor (or shard) and the file:
    from check_pretrained, which reads no tensor data (safe_open, the only tensor reader, is made to
    fail), and from from_pretrained, with the same message."""
    break_it, shard = BROKEN[case]
    make_checkpoint(tmp_path, shard=shard)
    what, file = break_it(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(model_module, "safe_open", lambda *a, **k: pytest.fail("check_pretrained read tensor data"))
        with pytest.raises(CheckpointError, match=what) as checked:
            check_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=what) as err:
        Llama.from_pretrained(tmp_path)
    assert str(err.value) == str(checked.value) and "\n" not in str(err.value)
    assert str(tmp_path / file) in str(err.value)


def test_check_pretrained_reads_headers_only(tmp_path, monkeypatch):
    """check_pretrained on a sound sharded checkpoint returns the config from_pretrained uses, without
    opening a tensor (safe_open made to fail)."""
    make_checkpoint(tmp_path, shard=True)
    monkeypatch.setattr(model_module, "safe_open", lambda *a, **k: pytest.fail("read tensor data"))
    config = check_pretrained(tmp_path)
    monkeypatch.undo()
    assert config == Llama.from_pretrained(tmp_path).config and config.torch_dtype == "float32"
