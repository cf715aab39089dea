"""The language model f_phi: a LLaMA decoder (LLaMA-1/2, Vicuna, TinyLlama: any from its config.json).

Parameters are named as in the hub's LLaMA checkpoints (`model.layers.0.self_attn.q_proj.weight`, ...).
Reading order: config -> RMSNorm and RoPE -> KV cache -> attention -> MLP -> block -> model.
Shapes: B batch, T tokens in this call, S tokens attended to (cache + T), D width, V vocabulary,
nh query heads, nkv key/value heads, hs head size.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class LlamaConfig:
    # Defaults are transformers' LlamaConfig defaults (= LLaMA-7B): hub configs leave out fields equal to them.
    vocab_size: int = 32000             # V
    hidden_size: int = 4096             # D
    intermediate_size: int = 11008      # SwiGLU width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32       # nh
    num_key_value_heads: int = None     # nkv < nh: grouped-query attention (TinyLlama); None = nh
    head_dim: int = None                # hs; None = D // nh
    rms_norm_eps: float = 1e-6          # 1e-6 LLaMA-1/Vicuna v1.x, 1e-5 LLaMA-2/Vicuna-v1.5
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0    # "linear" RoPE scaling (e.g. Vicuna-16k): positions / factor
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0               # LLaVA pads with 0 = <unk>

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d):
        """From a LLaMA `config.json` (or llava-hf's `text_config`); refuses what this file cannot run."""
        d = dict(d)
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type {d['model_type']!r} is not a LLaMA-architecture model")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError("LLaMA checkpoints with attention_bias/mlp_bias are not supported")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}   # transformers 5 / 4 spelling
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear"):
            raise ValueError(f"RoPE scaling {kind!r} is not supported (only default and linear)")
        d.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        d["rope_scaling_factor"] = rope.get("factor", 1.0) if kind == "linear" else 1.0
        for key in ("eos_token_id", "bos_token_id"):   # some configs list several ids: keep the first
            if isinstance(d.get(key), list):
                d[key] = d[key][0]
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})

    def to_dict(self):
        d = {"model_type": "llama", **{f.name: getattr(self, f.name) for f in fields(self)}}
        factor = d.pop("rope_scaling_factor")
        d["rope_scaling"] = {"rope_type": "linear", "factor": factor} if factor != 1.0 else None
        return d

# ---------------------------------------------------------------- RMSNorm and rotary embeddings


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 as the reference does, then cast back: bf16 sums of squares lose digits.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(cfg, position_ids, dtype):
    """cos, sin of shape (B, 1, T, hs) for absolute positions (B, T), computed in fp32.
    HF's "rotate half" convention: frequencies are repeated as [f_0..f_{hs/2-1}, f_0..f_{hs/2-1}]."""
    hs = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hs, 2, device=position_ids.device).float() / hs)
    angles = (position_ids.float() / cfg.rope_scaling_factor)[..., None] * inv_freq   # (B, T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]                               # (B, 1, T, hs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin   # x rotated by angle, pairs (i, i + hs/2)

# ---------------------------------------------------------------- KV cache


class KVCache:
    """A static cache: keys/values for every layer allocated once for `max_len` positions and
    filled in place, so decoding never re-allocates or concatenates. `length` = positions filled.
    `key_mask` (B, max_len) is False at left-padding positions, None when no row is padded."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_len, self.length, self.key_mask = max_len, 0, None

    def update(self, i, k, v):
        """Write this call's (B, nkv, T, hs) keys/values of layer i; return everything so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[i][:, :, start:end] = k
        self.v[i][:, :, start:end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]     # (B, nkv, S, hs)

# ---------------------------------------------------------------- attention, MLP, block


class LlamaAttention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx, self.nh, self.nkv, self.hs = layer_idx, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, self.nh * self.hs, bias=False)
        self.k_proj = nn.Linear(D, self.nkv * self.hs, bias=False)
        self.v_proj = nn.Linear(D, self.nkv * self.hs, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hs, D, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs).transpose(1, 2)    # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)   # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                       # (B, nkv, S, hs)
        # One mask convention: mask is None -> plain causal (is_causal, the fused kernels' fast path),
        # or the single query of a decode step (sees everything); else a boolean (B, 1, T, S), True = attend.
        if T == 1:
            # A decode step. Query heads j*g .. j*g + g - 1 all read key/value head j (g = nh / nkv), so
            # they can be g queries of one head: (B, nkv, g, hs), no copies of k and v for the groups.
            # Same result; on CPU in bf16 several times faster than enable_gqa at batch 8 (torch 2.13).
            y = F.scaled_dot_product_attention(q.reshape(B, self.nkv, self.nh // self.nkv, self.hs), k, v,
                                               attn_mask=mask)             # (B, nkv, g, hs)
            return self.o_proj(y.reshape(B, 1, self.nh * self.hs))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.nkv != self.nh)  # GQA: nh/nkv queries share a head
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))   # SwiGLU


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

# ---------------------------------------------------------------- the model


def attention_mask(T, cache, device):
    """The one place masks are built. None when plain causal attention is right: no cache offset
    and no padding (training, first prefill), or a single decode query without padding."""
    past = cache.length if cache is not None else 0
    key_mask = cache.key_mask if cache is not None else None
    if key_mask is None and (past == 0 or T == 1):
        return None
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]                              # (1, 1, T, S) causal, bottom-right
    if key_mask is not None:
        # Padding is never attended to; a padding query still sees itself, so no row is empty (NaN).
        mask = (mask & key_mask[:, None, None, :S]) | (k_pos == q_pos)
    return mask


class LlamaModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, x, position_ids=None, cache=None):
        """x: input embeddings (B, T, D) -> final hidden states (B, T, D). Fills `cache` if given."""
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)      # shared by all layers
        mask = attention_mask(T, cache, x.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                # Keep only each block's input; recompute its inside during backward (memory for time).
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, position_ids=None, cache=None):
        """input_ids (B, T) -> logits (B, T, V); for text-only use and the parity tests."""
        return self.lm_head(self.model(self.model.embed_tokens(input_ids), position_ids, cache))
