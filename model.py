"""
Llama 2 / 3 / 3.1 / 3.2 in plain PyTorch, reading and writing Hugging Face checkpoints.

Module and parameter names are exactly transformers' LlamaForCausalLM names, so a checkpoint loads
with a strict state-dict load and no key map, and what save_pretrained writes loads in transformers.
The folder format itself (config.json as transformers reads it, safetensors checks, sharded writing,
atomic folders) is hf_format.py's. Depends only on torch and hf_format.py.
"""

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hf_format import (
    ConfigError,
    as_torch_dtype,
    atomic_dir,
    config_json,
    parse_config,
    read_config,
    read_pretrained,
    tensor_slices,
    write_checkpoint,
)


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
            raise ConfigError(
                f"'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                f"'num_attention_heads' ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"'head_dim' ({self.head_dim}) must be even for RoPE")

    @classmethod
    def from_json(cls, path):
        """Read config.json as transformers reads it (see hf_format.parse_config)."""
        return cls.from_values(read_config(path), source=str(path))

    @classmethod
    def from_dict(cls, d, source="config.json"):
        return cls.from_values(parse_config(d, source), source)

    @classmethod
    def from_values(cls, values, source="config.json"):
        try:
            return cls(**values)
        except ConfigError as e:  # __post_init__'s checks, now with the file name
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self):
        return config_json({k: v for k, v in asdict(self).items() if k != "ignored_keys"})


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
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]  # (B, nkv, S, hs)


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
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
                layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
                norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            )
        )
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
        return [
            KVCache(batch_size, c.num_key_value_heads, max_len, c.head_dim, w.dtype, w.device)
            for _ in range(c.num_hidden_layers)
        ]

    @classmethod
    def tensor_shapes(cls, config):
        """{name: shape} of every weight of the model config describes (what its checkpoint folder holds)."""
        with torch.device("meta"):
            return {name: tuple(t.shape) for name, t in cls(config).state_dict().items()}

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load a HF checkpoint folder (model.safetensors, or shards listed in model.safetensors.index.json)
        in `dtype` on `device`. Every file is checked (see check_pretrained) before any tensor is read."""
        config, located = read_pretrained(path, LlamaConfig.from_values, cls.tensor_shapes, report_ignored=True)
        with torch.device("meta"):  # no memory until the real tensors are assigned below
            model = cls(config)
        # one tensor at a time, straight into its final dtype/device: no second copy of the model
        dtype = as_torch_dtype(dtype)
        state = {name: tensor[:].to(device=device, dtype=dtype) for name, tensor in tensor_slices(located)}
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_word_embeddings:  # assign=True gave the two modules separate Parameter objects; share one again
            model.lm_head.weight = model.model.embed_tokens.weight
        model.source_dir = str(Path(path))
        return model

    def save_pretrained(
        self, path, source_dir=None, state_dict=None, dtype=None, atomic=True, max_shard_size=5 * 1024**3
    ):
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
            write_checkpoint(folder, self.config.to_dict(), state, source, dtype, max_shard_size)


def check_pretrained(path):
    """Check a HF checkpoint folder without reading tensor data (see hf_format.read_pretrained): returns
    the LlamaConfig, or raises one ConfigError / CheckpointError line naming the file and the key or tensor."""
    return read_pretrained(path, LlamaConfig.from_values, Llama.tensor_shapes)[0]
