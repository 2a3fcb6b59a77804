"""
Llama 2 / 3 / 3.1 / 3.2 in plain PyTorch, reading and writing Hugging Face checkpoints.

Module and parameter names are exactly transformers' LlamaForCausalLM names, so a checkpoint loads
with a strict state-dict load and no key map, and what save_pretrained writes loads in transformers.
config.json is read the way transformers reads it: a key it honours with a value this model does not
compute is refused, a key it does not read is ignored (and reported). check_pretrained checks a
whole folder from the safetensors headers, before any tensor is read.
Depends only on torch, safetensors and the standard library.
"""

import json
import math
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from hf_format import CheckpointError, ConfigError, atomic_dir, crash_point


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
    rms_norm_eps: float = 1e-6  # added to the mean square in RMSNorm
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict | None = None  # None, or {"rope_type": "llama3", "factor", "low_freq_factor",
    #                                   "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1+)
    tie_word_embeddings: bool = False  # lm_head reuses embed_tokens.weight (Llama 3.2 1B/3B, SmolLM2)
    bos_token_id: int | None = None  # token ids: carried through to config.json, not used by the model
    eos_token_id: int | list[int] | None = None  # a list where generation stops at any of several (Llama 3.1+)
    pad_token_id: int | None = None  # often unset; padded positions are masked, so its value never matters here
    # how the weights are stored ("bfloat16", ...), not what the model computes in, so two configs that
    # differ only here (or in ignored_keys) describe the same model and compare equal
    torch_dtype: str | None = field(default=None, compare=False)
    ignored_keys: tuple = field(default=(), compare=False)  # keys of config.json transformers does not read either

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
        try:
            with open(path) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_dict(cls, d, source="config.json"):
        return parse_config(d, source)  # validation lives with the checkpoint code below

    def to_dict(self):
        # RoPE goes out as the older rope_theta / rope_scaling keys: transformers v4 reads only those,
        # and v5 converts them to its rope_parameters on load.
        d = {k: v for k, v in asdict(self).items() if k != "ignored_keys"}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **d,
                **{k: allowed[0] for k, allowed in FIXED_KEYS.items()}}


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
        """Load a HF checkpoint folder (model.safetensors, or shards listed in model.safetensors.index.json)
        in `dtype` on `device`. Every file is checked (see check_pretrained) before any tensor is read."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such checkpoint folder")
        config = LlamaConfig.from_json(path / "config.json")
        if config.ignored_keys and not (dist.is_available() and dist.is_initialized() and dist.get_rank() > 0):
            print(f"{path / 'config.json'}: ignoring {', '.join(config.ignored_keys)} "
                  "(transformers does not read them either)")
        with torch.device("meta"):  # no memory until the real tensors are assigned below
            model = cls(config)
        # one tensor at a time, straight into its final dtype/device: no second copy of the model
        dtype = as_torch_dtype(dtype)
        state = {name: tensor[:].to(device=device, dtype=dtype) for name, tensor in checkpoint_tensors(path, config)}
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_word_embeddings:  # assign=True gave the two modules separate Parameter objects; share one again
            model.lm_head.weight = model.model.embed_tokens.weight
        model.source_dir = str(path)
        return model

    def save_pretrained(self, path, source_dir=None, state_dict=None, dtype=None, atomic=True,
                        max_shard_size=5 * 1024**3):
        """Write a HF checkpoint folder: safetensors shards + index, config.json, and the tokenizer /
        generation files of source_dir (default: the folder this model was loaded from).
        state_dict: a full (gathered) state dict when the model is sharded, e.g. under FSDP.
        dtype: cast each tensor as it is written (None: as it is); config.json's torch_dtype says which.
        atomic: write through atomic_dir, so path holds the old folder or the new one, never half of one;
        False writes into path directly (a caller that has its own atomic_dir around a larger folder)."""
        state = self.state_dict() if state_dict is None else state_dict
        source = source_dir if source_dir is not None else self.source_dir
        if not atomic:
            Path(path).mkdir(parents=True, exist_ok=True)
        with atomic_dir(path) if atomic else nullcontext(Path(path)) as folder:
            write_checkpoint(folder, self.config, state, source, dtype, max_shard_size)


# ----------------------------------------------------------------------------------------------
# reading config.json like transformers' LlamaConfig


# keys transformers reads whose every other value changes the computation (first value: what we write)
FIXED_KEYS = {"hidden_act": ("silu", "swish"), "attention_bias": (False,), "mlp_bias": (False,),
              "attention_dropout": (0.0,)}
# keys transformers reads that do not change the computation: its own bookkeeping, which every
# config.json it writes carries (pretraining_tp only split the same matmuls into slices in old versions)
SILENT_KEYS = ("transformers_version", "use_cache", "initializer_range", "pretraining_tp",
               "output_attentions", "output_hidden_states", "return_dict")
POSITIVE, INT, NUMBER, BOOL = "a positive integer", "an integer", "a number", "true or false"
FIELD_KINDS = dict(vocab_size=POSITIVE, hidden_size=POSITIVE, intermediate_size=POSITIVE, num_hidden_layers=POSITIVE,
                   num_attention_heads=POSITIVE, num_key_value_heads=POSITIVE, head_dim=POSITIVE,
                   max_position_embeddings=POSITIVE, rms_norm_eps=NUMBER, tie_word_embeddings=BOOL,
                   bos_token_id=INT, eos_token_id=INT, pad_token_id=INT)
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
READ_KEYS = {*FIELD_KINDS, *FIXED_KEYS, *SILENT_KEYS, "architectures", "model_type", "quantization_config",
             "torch_dtype", "dtype", "rope_theta", "rope_scaling", "rope_parameters"}
DTYPES = ("float32", "bfloat16", "float16", "float64")


def parse_config(raw, source="config.json"):
    """LlamaConfig from a config.json dict, or a one-line ConfigError naming source, the key and its value."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {_short(raw)}")
    d = {k: v for k, v in raw.items() if v is not None}  # HF writes null for "not set"

    def refuse(key, why):
        raise ConfigError(f"{source}: '{key}' is {_short(d[key])}; {why}")

    if d.get("architectures", ["LlamaForCausalLM"]) != ["LlamaForCausalLM"]:
        refuse("architectures", "only ['LlamaForCausalLM'] is supported")
    if d.get("model_type", "llama") != "llama":
        refuse("model_type", "only 'llama' is supported")
    for key, allowed in FIXED_KEYS.items():
        if key in d and (d[key] not in allowed or isinstance(d[key], bool) != isinstance(allowed[0], bool)):
            refuse(key, f"this implementation computes only {allowed[0]!r}")
    if "quantization_config" in d:
        refuse("quantization_config", "quantized checkpoints are not supported")
    values = {}
    for key, kind in FIELD_KINDS.items():
        if key in d:
            values[key] = _typed(source, key, d[key], kind)
    for key in REQUIRED:
        if key not in values:
            raise ConfigError(f"{source}: required key '{key}' is missing")
    dtype = d.get("dtype", d.get("torch_dtype"))  # transformers keeps dtype when both are present
    if dtype is not None:
        key = "dtype" if "dtype" in d else "torch_dtype"
        if not isinstance(dtype, str) or dtype.removeprefix("torch.") not in DTYPES:
            refuse(key, f"expected one of {', '.join(DTYPES)}")
        values["torch_dtype"] = dtype.removeprefix("torch.")
    values["rope_theta"], values["rope_scaling"] = _parse_rope(d, source)
    values["ignored_keys"] = tuple(k for k in raw if k not in READ_KEYS)
    try:
        return LlamaConfig(**values)
    except ConfigError as e:  # __post_init__'s checks, now with the file name
        raise ConfigError(f"{source}: {e}") from None


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _typed(source, key, value, kind):
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {POSITIVE: is_int and value > 0, INT: is_int, BOOL: isinstance(value, bool),
          NUMBER: isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]
    if key == "eos_token_id" and isinstance(value, list):  # Llama 3 instruct models stop on any of several
        ok = bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ConfigError(f"{source}: '{key}' is {_short(value)}; expected {kind}")
    return float(value) if kind == NUMBER else value


def _parse_rope(d, source):
    """(rope_theta, rope_scaling) from the old-style keys (rope_theta, rope_scaling) and/or the new-style
    rope_parameters, with rope_scaling normalised to None or a llama3 dict."""
    max_pos = d.get("max_position_embeddings", 2048)

    def parse(rope, theta, key):
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: '{key}' is {_short(rope)}; expected an object")
        rope = dict(rope)
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))  # "type" is the pre-4.45 spelling
        theta = _typed(source, f"{key}.rope_theta", rope.pop("rope_theta", theta), NUMBER)
        scaling = None
        if rope_type == "llama3":
            scaling = {"rope_type": "llama3"}
            for k in ("factor", "low_freq_factor", "high_freq_factor"):
                if k not in rope:
                    raise ConfigError(f"{source}: '{key}.{k}' is missing (required by rope_type 'llama3')")
                scaling[k] = _typed(source, f"{key}.{k}", rope.pop(k), NUMBER)
            # transformers falls back to max_position_embeddings as well
            k = "original_max_position_embeddings"
            scaling[k] = _typed(source, f"{key}.{k}", rope.pop(k, max_pos), POSITIVE)
        elif rope_type != "default":  # linear, dynamic, yarn, longrope, ...: other position encodings
            raise ConfigError(f"{source}: '{key}.rope_type' is {rope_type!r}; "
                              "only 'default' and 'llama3' are supported")
        if rope:
            raise ConfigError(f"{source}: unsupported key '{key}.{next(iter(rope))}' for rope_type {rope_type!r}")
        return theta, scaling

    theta = _typed(source, "rope_theta", d["rope_theta"], NUMBER) if "rope_theta" in d else None
    scaling = d.get("rope_scaling")
    default_theta = theta if theta is not None else 10000.0
    old = parse(scaling or {}, default_theta, "rope_scaling")
    if "rope_parameters" not in d:
        return old
    new = parse(d["rope_parameters"], default_theta, "rope_parameters")
    if (theta is not None and new[0] != old[0]) or (scaling is not None and new[1] != old[1]):
        raise ConfigError(f"{source}: 'rope_parameters' disagrees with 'rope_theta'/'rope_scaling'")
    return new


def as_torch_dtype(dtype):
    return getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype


# ----------------------------------------------------------------------------------------------
# checking and reading checkpoint folders


SAFETENSORS_FLOATS = ("F32", "BF16", "F16", "F64")  # dtypes a weight may be stored in


def check_pretrained(path):
    """Check a HF checkpoint folder without reading tensor data: config.json parses and asks for nothing
    this model cannot compute, and every safetensors header holds exactly the tensors config implies
    (name, shape, floating dtype), each lying inside its file. Returns the LlamaConfig, or raises one
    ConfigError / CheckpointError line naming the file and the key or tensor."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    config = LlamaConfig.from_json(path / "config.json")
    _locate_tensors(path, config)
    return config


def checkpoint_tensors(path, config):
    """Yield (name, tensor slice) for every weight of the HF checkpoint folder `path`, lazily: a slice
    reads nothing until indexed, slice[:] is the whole tensor and slice[a:b] only rows a..b-1 (how a
    sharded loader reads just its own rows). All of check_pretrained's checks on the files run before
    the first tensor is yielded. A tied lm_head.weight is not yielded: it is model.embed_tokens.weight."""
    by_file = {}
    for name, file in _locate_tensors(Path(path), config).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names:
                yield name, f.get_slice(name)


def _locate_tensors(path, config):
    """{tensor name: file holding it}, after checking every safetensors header against config."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Llama(config).state_dict().items()}
    tied = config.tie_word_embeddings
    if tied:  # HF omits it from the file; older saves may not
        del expected["lm_head.weight"]
    located = {}
    for file, listed in _checkpoint_files(path):
        header = read_safetensors_header(file)
        for name in listed:
            if name not in header:
                raise CheckpointError(f"{file}: missing tensor '{name}' (listed in model.safetensors.index.json)")
        for name, (dtype, shape) in header.items():
            if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                continue  # recomputed from config / shared with embed_tokens
            if name not in expected:
                raise CheckpointError(f"{file}: unexpected tensor '{name}'")
            if name in located:
                raise CheckpointError(f"{file}: tensor '{name}' also appears in {located[name].name}")
            if shape != expected[name]:
                raise CheckpointError(f"{file}: tensor '{name}' has shape {shape}, "
                                      f"config.json implies {expected[name]}")
            if dtype not in SAFETENSORS_FLOATS:
                raise CheckpointError(f"{file}: tensor '{name}' is stored as {dtype}; expected one of "
                                      f"{', '.join(SAFETENSORS_FLOATS)} (quantized weights are not supported)")
            located[name] = file
    missing = [name for name in expected if name not in located]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        where = next(f for f in (path / "model.safetensors.index.json", path / "model.safetensors") if f.is_file())
        raise CheckpointError(f"{where}: missing tensor '{missing[0]}'{more}")
    return located


def _checkpoint_files(path):
    """[(safetensors file, tensor names the index places in it)]."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid index ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        shards = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        for shard, names in shards.items():
            if not (path / shard).is_file():
                raise CheckpointError(f"{index}: shard '{shard}' is missing "
                                      f"(it holds '{names[0]}' and {len(names) - 1} more)")
        return [(path / shard, names) for shard, names in shards.items()]
    if (path / "model.safetensors").is_file():
        return [(path / "model.safetensors", [])]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_safetensors_header(file):
    """{tensor name: (dtype, shape)} from a safetensors file's header: an 8-byte little-endian length,
    then that many bytes of JSON giving each tensor's dtype, shape and byte range in the data that follows.
    A truncated file (an interrupted download or copy) is caught here, by its last byte range."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{file}: not a safetensors file (header of {n} bytes in a file of {size})")
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            tensors = {name: (h["dtype"], tuple(int(x) for x in h["shape"]), int(h["data_offsets"][1]))
                       for name, h in header.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{file}: the safetensors header does not parse ({type(e).__name__}: {e})") from None
    if tensors:
        name, (_, _, end) = max(tensors.items(), key=lambda item: item[1][2])
        if 8 + n + end > size:
            raise CheckpointError(f"{file}: truncated: tensor '{name}' ends at byte {8 + n + end}, the file has {size}")
    return {name: (dtype, shape) for name, (dtype, shape, _) in tensors.items()}


# ----------------------------------------------------------------------------------------------
# writing checkpoint folders


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")  # copied so the folder is complete


def write_checkpoint(folder, config, state, source_dir=None, dtype=None, max_shard_size=5 * 1024**3):
    """Write state (a Llama state dict) into the existing folder as HF shards + index, config.json, and
    source_dir's tokenizer / generation files; tensors cast to dtype if given."""
    folder, dtype = Path(folder), as_torch_dtype(dtype)
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    item_size = dtype.itemsize if dtype is not None else None
    shards, size = [[]], 0  # consecutive tensors, at most max_shard_size bytes per shard
    for name, t in state.items():
        nbytes = t.numel() * (item_size or t.element_size())
        if shards[-1] and size + nbytes > max_shard_size:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total_size = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: state[n].detach().to("cpu", dtype).contiguous() for n in names}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        crash_point()
        weight_map.update({n: file for n in names})
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    crash_point()
    written = dtype or next(iter(state.values())).dtype
    config_dict = {**config.to_dict(), "torch_dtype": str(written).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    crash_point()
    for name in TOKENIZER_FILES if source_dir is not None else ():
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, folder / name)
            crash_point()
