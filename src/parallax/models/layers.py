"""Shared building blocks: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

Attention runs through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
on GPU). Shapes: activations are ``(B, T, D)``; inside attention, heads are ``(B, H, T, Dh)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # the weight in x's dtype: with a bf16 input (QK-norm under autocast) and an fp32 weight,
        # torch falls back from the fused kernel to a composite of several
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def check_rope(head_dim: int, base: float, what: str = "the head dimension") -> None:
    """RoPE rotates pairs of channels by angles base^(-2i/d): an even head dimension and a
    positive base, checked where a config is validated as well as where the table is built."""
    if head_dim % 2:
        raise ValueError(f"{what} must be even (RoPE), got {head_dim}")
    if not base > 0:
        raise ValueError(f"rope_base must be positive, got {base}")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) with cached cos/sin tables.

    ``forward(x, start)`` rotates ``x`` of shape (B, H, T, Dh) by the angles of positions
    ``start .. start + T - 1``. ``start`` is an int (the table grows on demand, checked on the
    host without waiting on the device) or a 0-dim device tensor, for a CUDA graph replayed
    at every position; then the table must already hold them (``reserve``).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, max_seq_len: int = 2048):
        super().__init__()
        check_rope(head_dim, base)
        self.head_dim = head_dim
        self.base = base
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(max_seq_len)

    def _build(self, length: int) -> None:
        t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        angles = torch.outer(t, self.inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def reserve(self, length: int) -> None:
        """Make the tables hold positions 0 .. length - 1."""
        if length > self.cos.shape[0]:
            self._build(max(length, 2 * self.cos.shape[0]))

    def forward(self, x: Tensor, start: int | Tensor = 0) -> Tensor:
        if isinstance(start, Tensor):
            positions = start + torch.arange(x.shape[-2], device=start.device)
            cos, sin = self.cos[positions].to(x.dtype), self.sin[positions].to(x.dtype)
        else:
            end = start + x.shape[-2]
            self.reserve(end)
            cos = self.cos[start:end].to(x.dtype)  # (T, Dh/2)
            sin = self.sin[start:end].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2)


class SwiGLU(nn.Module):
    """``w3(silu(w1(x)) * w2(x))``; hidden defaults to 8/3 * dim rounded up to 32."""

    def __init__(self, dim: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        hidden = hidden or 32 * math.ceil(8 * dim / 3 / 32)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w3(F.silu(self.w1(x)) * self.w2(x)))


def cache_dtype(device, dtype: torch.dtype) -> torch.dtype:
    """The dtype to cache keys and values in: under autocast they reach attention in the
    autocast dtype anyway, so caching them in it loses nothing and halves the bytes that
    every decoding step reads (the weights' fp32 otherwise)."""
    kind = torch.device(device).type
    if dtype == torch.float32 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return dtype


class KVCache:
    """Preallocated keys/values for one attention layer during incremental decoding.

    ``k``/``v`` are (B, H_kv, max_len, Dh); ``length`` is how many positions are filled.

    A ``static`` cache (for a decoding step captured as a CUDA graph, ``generation.py``) also
    keeps that count on the device (``position``): new keys are written at it and the whole
    buffers come back, with the positions not yet written masked, so every step has the same
    shapes and addresses. A replayed graph advances ``position`` only; ``length`` then
    counts the host's own calls.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int, device, dtype, static: bool = False):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, device=device, dtype=cache_dtype(device, dtype))
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.position = torch.zeros((), dtype=torch.long, device=device) if static else None

    @property
    def start(self) -> int | Tensor:
        """The first new position: the host count, or a static cache's device count (a copy,
        as ``append`` advances it in place)."""
        return self.length if self.position is None else self.position.clone()

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new (B, H_kv, T, Dh) keys and values; returns the keys and values to attend
        over: the positions filled so far, or a static cache's whole buffers."""
        t = k.shape[2]
        if self.length + t > self.k.shape[2]:
            raise ValueError(
                f"KV cache holds {self.k.shape[2]} positions; cannot add {t} after {self.length}"
            )
        self.length += t
        if self.position is not None:
            index = self.position + torch.arange(t, device=k.device)
            self.k.index_copy_(2, index, k.to(self.k.dtype))
            self.v.index_copy_(2, index, v.to(self.v.dtype))
            self.position += t
            return self.k, self.v
        self.k[:, :, self.length - t : self.length] = k
        self.v[:, :, self.length - t : self.length] = v
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


def attention_mask(
    q_len: int, kv_len: int, window: int | None, device, q_start: Tensor | None = None
) -> Tensor | None:
    """Boolean (q_len, kv_len) mask, True = attend. Queries are the last ``q_len`` positions,
    or, with ``q_start`` (a 0-dim device tensor: a static cache's whole buffers), positions
    ``q_start ..``, and the later keys (not yet written) are masked.

    Returns None when plain causal attention (``is_causal``) already expresses it.
    """
    if window is None and q_len == kv_len and q_start is None:
        return None
    first = kv_len - q_len if q_start is None else q_start
    q_pos = (first + torch.arange(q_len, device=device)).unsqueeze(1)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE, optional QK-norm and sliding window.

    ``n_kv_heads`` < ``n_heads`` shares each key/value head across a group of query heads.
    With ``cache`` given, new keys/values are appended and queries attend to the whole cache.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        window: int | None = None,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(
                f"dim {dim} must divide by n_heads {n_heads}, and n_heads by n_kv_heads {n_kv_heads}"
            )
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.window = window
        self.dropout = dropout
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, rope_base)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None

    def new_cache(self, batch: int, max_len: int, device, dtype, static: bool = False) -> KVCache:
        return KVCache(batch, self.n_kv_heads, self.head_dim, max_len, device, dtype, static)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        start = cache.start if cache is not None else 0
        if isinstance(start, Tensor):  # a static cache: positions are looked up on the device
            self.rope.reserve(cache.k.shape[2])
        q, k = self.rope(q, start), self.rope(k, start)
        if cache is not None:
            k, v = cache.append(k, v)
        mask = attention_mask(t, k.shape[2], self.window, x.device, start if isinstance(start, Tensor) else None)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and t > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    ``mlp`` may be replaced (e.g. by a mixture of experts) by passing a module.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        window: int | None = None,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        mlp: nn.Module | None = None,
    ):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, n_heads, n_kv_heads, rope_base, qk_norm, window, dropout, norm_eps)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = mlp if mlp is not None else SwiGLU(dim, dropout=dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), cache))
        return x + self.mlp(self.mlp_norm(x))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-style init: normal(0, std) for linear and embedding weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
