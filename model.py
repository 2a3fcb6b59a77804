"""
Llama 2 / 3 / 3.1 / 3.2 in plain PyTorch, reading and writing Hugging Face checkpoints.

Module and parameter names are exactly transformers' LlamaForCausalLM names, so a checkpoint loads
with a strict state-dict load and no key map, and what save_pretrained writes loads in transformers.
Depends only on torch, safetensors and the standard library.
"""

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint


class ConfigError(ValueError):
    """config.json asks for something this model cannot compute."""


class CheckpointError(ValueError):
    """The tensors on disk do not match what config.json describes."""


# config.json keys that do not change the computation: metadata, inference switches, and
# pretraining_tp (it only splits the same matmuls into slices in old transformers versions)
IGNORED_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                "initializer_range", "pretraining_tp")
# settings this implementation hard-codes; any other value would change the model
FIXED_KEYS = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0}
# files copied next to the weights so the saved folder is a complete checkpoint
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")


@dataclass
class LlamaConfig:
    vocab_size: int  # rows of embed_tokens and lm_head
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # inner width of the SwiGLU MLP
    num_hidden_layers: int  # transformer blocks
    num_attention_heads: int  # query heads
    num_key_value_heads: int | None = None  # fewer than query heads = grouped-query attention; None = same
    head_dim: int | None = None  # width of one head; None = hidden_size // num_attention_heads
    max_position_embeddings: int = 2048  # advertised context length; RoPE itself does not enforce it
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict | None = None  # None, or {"rope_type": "llama3", "factor", "low_freq_factor",
    #                                   "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1+)
    tie_word_embeddings: bool = False  # lm_head reuses embed_tokens.weight (Llama 3.2 1B/3B)
    bos_token_id: int | None = None  # token ids are carried through to config.json, not used here
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                              f"'num_attention_heads' ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"'head_dim' ({self.head_dim}) must be even for RoPE")

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f), source=str(path))

    @classmethod
    def from_dict(cls, d, source="config.json"):
        d = {k: v for k, v in d.items() if v is not None}  # HF writes null for "not set"
        arch = d.pop("architectures", ["LlamaForCausalLM"])
        if arch != ["LlamaForCausalLM"]:
            raise ConfigError(f"{source}: 'architectures' is {arch}; only ['LlamaForCausalLM'] is supported")
        if d.pop("model_type", "llama") != "llama":
            raise ConfigError(f"{source}: 'model_type' must be 'llama'")
        for key, want in FIXED_KEYS.items():
            if d.pop(key, want) != want:
                raise ConfigError(f"{source}: '{key}' must be {want!r}; this implementation supports nothing else")
        for key in IGNORED_KEYS:
            d.pop(key, None)
        d["rope_theta"], d["rope_scaling"] = _parse_rope(d, source)
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ConfigError(f"{source}: unsupported key '{key}'")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ConfigError(f"{source}: required key '{key}' is missing")
        try:
            return cls(**d)
        except ConfigError as e:  # __post_init__'s checks, now with the file name
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self):
        # RoPE goes out as the older rope_theta / rope_scaling keys: transformers v4 reads only those,
        # and v5 converts them to its rope_parameters on load.
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **asdict(self), **FIXED_KEYS}


def _parse_rope(d, source):
    """Pop the RoPE keys, old-style (rope_theta, rope_scaling) and/or new-style (rope_parameters),
    and return (rope_theta, rope_scaling) with rope_scaling normalised to None or a llama3 dict."""
    max_pos = d.get("max_position_embeddings", 2048)

    def parse(rope, theta, key):
        rope = dict(rope)
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))  # "type" is the pre-4.45 spelling
        theta = float(rope.pop("rope_theta", theta))
        scaling = None
        if rope_type == "llama3":
            scaling = {"rope_type": "llama3"}
            for k in ("factor", "low_freq_factor", "high_freq_factor"):
                if k not in rope:
                    raise ConfigError(f"{source}: '{key}.{k}' is missing (required by rope_type 'llama3')")
                scaling[k] = float(rope.pop(k))
            # transformers falls back to max_position_embeddings as well
            scaling["original_max_position_embeddings"] = int(rope.pop("original_max_position_embeddings", max_pos))
        elif rope_type != "default":
            raise ConfigError(f"{source}: '{key}.rope_type' is {rope_type!r}; "
                              "only 'default' and 'llama3' are supported")
        if rope:
            raise ConfigError(f"{source}: unsupported key '{key}.{next(iter(rope))}' for rope_type {rope_type!r}")
        return theta, scaling

    theta, scaling = d.pop("rope_theta", None), d.pop("rope_scaling", None)
    default_theta = theta if theta is not None else 10000.0
    old = parse(scaling or {}, default_theta, "rope_scaling")
    if "rope_parameters" not in d:
        return old
    new = parse(d.pop("rope_parameters"), default_theta, "rope_parameters")
    if (theta is not None and new[0] != old[0]) or (scaling is not None and new[1] != old[1]):
        raise ConfigError(f"{source}: 'rope_parameters' disagrees with 'rope_theta'/'rope_scaling'")
    return new


# ----------------------------------------------------------------------------------------------
# model


def rope_inv_freq(config, device=None):
    """RoPE inverse frequencies (head_dim/2,) in float32, with Llama 3.1's frequency scaling if configured.
    Computed on the fly (a few tiny ops) rather than stored in a buffer: nothing to materialise after a
    meta-device build, and model.to(bfloat16) cannot round them."""
    hs = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float32, device=device) / hs)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # llama3: wavelengths shorter than old_len / high_freq_factor are kept, those longer than
    # old_len / low_freq_factor are stretched by `factor`, and the band in between is interpolated.
    old_len, factor = s["original_max_position_embeddings"], s["factor"]
    lo, hi = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - lo) / (hi - lo)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, interpolated)
    return torch.where(wavelen < old_len / hi, inv_freq, scaled)


def rope_cos_sin(config, position_ids, dtype):
    freqs = position_ids[..., None].float() * rope_inv_freq(config, position_ids.device)  # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hs), broadcast over heads
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    # Split-half ("rotate_half") layout: dimension i rotates together with i + hs/2, not with i + 1 as in
    # Meta's original code. HF's conversion script permuted q_proj/k_proj rows for this layout, so the
    # interleaved variant would load HF weights without error and silently compute something else.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # the mean of squares in bfloat16 loses too many bits; compute in float32 and cast back
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class KVCache:
    """Keys and values of one layer for generation, preallocated for max_len positions."""

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, dtype, device):
        self.k = torch.zeros(batch_size, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, k, v):  # k, v: (B, nkv, T, hs)
        if self.k.dtype != k.dtype:  # FSDP's mixed precision computes in bf16 while the weights stay float32
            self.k, self.v = self.k.to(k.dtype), self.v.to(k.dtype)
        T = k.shape[2]
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]  # (B, nkv, S, hs)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, nkv, S, hs), S = cached + T
        # grouped-query attention: each key/value head serves n_head // n_kv_head consecutive query heads
        # (repeated explicitly rather than with enable_gqa, which not every SDPA kernel accepts with a mask)
        rep = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, S, hs)
        if callable(mask):  # an attention function for packed batches (packing.SegmentAttention, FlexAttention)
            y = mask(q, k, v)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    accepts_attention_fn = True  # forward takes a callable attention(q, k, v) as attn_mask (see packing.py)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # fresh weights drawn as transformers draws them (normal, std 0.02; norms start at 1);
        # from_pretrained builds on the meta device, where this costs nothing, then assigns the real ones
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        self.gradient_checkpointing = False  # recompute each block's activations in backward
        self.source_dir = None  # checkpoint folder this model was loaded from (tokenizer files live there)

    def forward(self, input_ids, position_ids=None, attn_mask=None, return_hidden=False, kv_cache=None):
        """input_ids (B, T) long. position_ids (B, T) long, default arange (after any cached tokens).
        attn_mask: None for causal attention, or bool (B, T, T) with True where query t may attend key s;
        every query must be allowed at least one key (e.g. itself), or SDPA returns NaN for it;
        or a callable attention(q, k, v) -> y, all (B, n_head, T, head_dim), used in every layer in
        place of SDPA (packing.py's SegmentAttention and FlexAttention skip what a dense mask hides).
        Returns logits (B, T, vocab) in the model dtype, or the final-norm hidden states (B, T, hidden)
        with return_hidden=True, so a caller can apply lm_head chunk by chunk."""
        B, T = input_ids.shape
        past = kv_cache[0].length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        mask = None  # None: causal over the T tokens, SDPA's is_causal fast path
        if callable(attn_mask):
            if kv_cache is not None:
                raise ValueError("a callable attn_mask cannot be combined with a kv_cache")
            mask = attn_mask
        elif attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise TypeError(f"attn_mask must be bool (True = may attend), got {attn_mask.dtype}")
            mask = attn_mask[:, None]  # (B, 1, T, S), broadcast over heads
        elif past > 0:  # new tokens see every cached token and causally each other
            mask = torch.ones(T, past + T, dtype=torch.bool, device=input_ids.device).tril(diagonal=past)
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)  # (B, 1, T, hs) each
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv_cache[i] if kv_cache is not None else None)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)  # (B, T, H) or (B, T, V)

    def new_kv_cache(self, batch_size, max_len):
        w, c = self.model.embed_tokens.weight, self.config
        return [KVCache(batch_size, c.num_key_value_heads, max_len, c.head_dim, w.dtype, w.device)
                for _ in range(c.num_hidden_layers)]

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load a HF checkpoint folder: model.safetensors, or shards listed in model.safetensors.index.json."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such checkpoint folder")
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        config = LlamaConfig.from_json(path / "config.json")
        with torch.device("meta"):  # no memory until the real tensors are assigned below
            model = cls(config)
        # one tensor at a time, straight into its final dtype/device: no second copy of the model
        state = {name: tensor[:].to(device=device, dtype=dtype) for name, tensor in checkpoint_tensors(path, config)}
        tied = config.tie_word_embeddings
        if tied:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if tied:  # assign=True gave the two modules separate Parameter objects; share one again
            model.lm_head.weight = model.model.embed_tokens.weight
        model.source_dir = str(path)
        return model

    def save_pretrained(self, path, max_shard_size=5 * 1024**3, source_dir=None, state_dict=None):
        """Write a HF checkpoint folder atomically: safetensors shards + index, config.json, and the
        tokenizer / generation files of source_dir (default: the folder this model was loaded from).
        state_dict: pass a full (gathered) state dict when the model is sharded, e.g. under FSDP."""
        path = Path(path)
        state = self.state_dict() if state_dict is None else state_dict
        if self.config.tie_word_embeddings:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        shards, size = [[]], 0  # consecutive tensors, at most max_shard_size bytes per shard
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_size:
                shards, size = shards + [[]], 0
            shards[-1].append(name)
            size += nbytes
        # write next to the target (same file system, so the final rename is atomic); a crash leaves
        # at worst a hidden .tmp folder, never a half checkpoint under the final name
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            weight_map, total_size = {}, 0
            for i, names in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                tensors = {n: state[n].detach().to("cpu").contiguous() for n in names}
                save_file(tensors, tmp / file, metadata={"format": "pt"})
                weight_map.update({n: file for n in names})
                total_size += sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
            config = {**self.config.to_dict(), "torch_dtype": dtype}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            source = source_dir if source_dir is not None else self.source_dir
            for name in TOKENIZER_FILES if source is not None else ():
                if (Path(source) / name).is_file():
                    shutil.copy2(Path(source) / name, tmp / name)
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not path.exists():  # died between the two renames: put the old one back
                old.rename(path)
            raise


def checkpoint_tensors(path, config):
    """Yield (name, tensor slice) for every weight of the HF checkpoint folder `path`, lazily: a slice
    reads nothing until indexed, slice[:] is the whole tensor and slice[a:b] only rows a..b-1 (how a
    sharded loader reads just its own rows). Checks names and shapes against what config implies and
    raises CheckpointError naming the file for a tensor that is unexpected, misshapen, duplicated or
    missing. A tied lm_head.weight is not yielded: it is model.embed_tokens.weight."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Llama(config).state_dict().items()}
    tied = config.tie_word_embeddings
    if tied:  # HF omits it from the file; older saves may not
        del expected["lm_head.weight"]
    files, where = _checkpoint_files(Path(path))
    seen = set()
    for file, listed in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in listed:
                if name not in f.keys():
                    raise CheckpointError(f"{file}: missing tensor '{name}' (listed in {where.name})")
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                    continue  # recomputed from config / shared with embed_tokens
                if name not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor '{name}'")
                if name in seen:
                    raise CheckpointError(f"{file}: tensor '{name}' also appears in another shard")
                tensor = f.get_slice(name)
                shape = tuple(tensor.get_shape())
                if shape != expected[name]:
                    raise CheckpointError(f"{file}: tensor '{name}' has shape {shape}, "
                                          f"config.json implies {expected[name]}")
                seen.add(name)
                yield name, tensor
    missing = [name for name in expected if name not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor '{missing[0]}'{more}")


def _checkpoint_files(path):
    """[(file, tensor names the index places in it)], and the file to name in 'missing tensor' errors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = {}
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        for shard in shards:
            if not (path / shard).is_file():
                raise CheckpointError(f"{index}: shard '{shard}' is missing")
        return [(path / shard, names) for shard, names in shards.items()], index
    if (path / "model.safetensors").is_file():
        return [(path / "model.safetensors", [])], path / "model.safetensors"
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


# ----------------------------------------------------------------------------------------------
# generation


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
