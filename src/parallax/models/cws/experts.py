"""The experts: everything that writes per-slot proposals (B, T, S, d) into the workspace pool.

Two clocks. The SSM expert is token-clocked: it reads the token stream once per forward (a
context update) and its proposals stay fixed while the workspace iterates. The attention
probe, the MLP probe and the SIREN prior are h-clocked: they are re-run on the normalised
workspace state ``h_eff`` (B, T, d) at every iteration. The attention probe is both: its
keys/values are token-clocked (computed once, cached during generation), its query is h.

Position lives here (the SSM scan order, RoPE in the probe); the workspace itself never sees
a position.

Each h-clocked expert names its first layer, a product of h_eff (``input_layer``), and takes
that product precomputed (``projected``, without the layer's bias): the workspace's fused
reads compute it with its own query and the other experts' as one wider product.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallax.models.layers import KVCache, RotaryEmbedding, attention_mask
from parallax.ops.ssm_scan import selective_scan


class SSMExpert(nn.Module):
    """Mamba-style selective SSM over the tokens: diagonal A, input-dependent delta, B and C.

    ``read(x, state)`` scans the embeddings x (B, T, d) from ``state`` (B, d_inner, N), or
    zeros, and returns the gated read (B, T, d) with the final state. ``proposals(read)`` turns
    the read into this expert's slots (B, T, S, d). The read at position t has seen tokens
    <= t, which is what lets the attention probe key on "the token before".
    """

    def __init__(self, dim: int, slots: int, n_state: int, expand: int, chunk_size: int):
        super().__init__()
        inner = expand * dim
        self.slots, self.dim, self.chunk_size = slots, dim, chunk_size
        self.dt_rank = math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * n_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(inner, n_state))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.to_slots = nn.Linear(dim, slots * dim, bias=False)
        self.reset_expert_parameters()

    def reset_expert_parameters(self) -> None:
        """Mamba's init: A = -(1..N) per channel, step sizes log-uniform in [1e-3, 1e-1]."""
        inner, n_state = self.A_log.shape
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.arange(1, n_state + 1, dtype=torch.float32)).expand(inner, -1))
            self.D.fill_(1.0)
            dt = torch.exp(torch.rand(inner) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def read(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u, gate = self.in_proj(x).chunk(2, dim=-1)
        n_state = self.A_log.shape[1]
        dt, B, C = self.x_proj(u).split([self.dt_rank, n_state, n_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        y, state = selective_scan(
            u, delta, -torch.exp(self.A_log), B, C, self.D, state, self.chunk_size
        )
        return self.out_proj(y * F.silu(gate)), state

    def proposals(self, read: Tensor) -> Tensor:
        return self.to_slots(read).unflatten(-1, (self.slots, self.dim))


class AttentionProbe(nn.Module):
    """Causal attention read of the token sequence, queried by the workspace state.

    One head per slot. Keys/values come from a token-clocked ``source`` (B, T, d_source) with
    RoPE, built once per forward by ``keys_values``; the query of token t comes from its own
    h_eff and attends to positions <= t. Output (B, T, S, d).

    In incremental decoding the keys and values are those of the positions cached so far, or,
    for CUDA graphs (``static``), the whole preallocated cache, max_len positions, with the
    queries' first position ``start`` as a device tensor: the positions not yet written are
    masked, so every call has the same shapes and one graph of the workspace step serves every
    token (``graphed.py``), at the price of attending over max_len positions.
    """

    matmul_weights = ("wo",)  # cast once per call for CUDA graphs, as Linear weights are (cast_weights.py)

    def __init__(self, dim: int, slots: int, head_dim: int, source_dim: int, rope_base: float):
        super().__init__()
        self.slots, self.head_dim = slots, head_dim
        self.wq = nn.Linear(dim, slots * head_dim, bias=False)
        self.wk = nn.Linear(source_dim, slots * head_dim, bias=False)
        self.wv = nn.Linear(source_dim, slots * head_dim, bias=False)
        self.wo = nn.Parameter(torch.empty(slots, head_dim, dim).normal_(0.0, 0.02))  # per slot
        self.rope = RotaryEmbedding(head_dim, rope_base)

    @property
    def input_layer(self) -> nn.Linear:
        return self.wq

    def new_cache(self, batch: int, max_len: int, device, dtype, static: bool = False) -> KVCache:
        return KVCache(batch, self.slots, self.head_dim, max_len, device, dtype, static)

    def keys_values(self, source: Tensor, cache: KVCache | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(B, S, L, dh) keys and values: of the T positions of ``source`` (L = T), or with a
        cache, of every position cached so far (L = start + T), or a static cache's whole
        buffers (L = max_len), after writing these T in; and for a static cache the first new
        position as a device tensor (``forward``'s ``start``), else None."""
        b, t, _ = source.shape
        k = self.wk(source).view(b, t, self.slots, self.head_dim).transpose(1, 2)
        v = self.wv(source).view(b, t, self.slots, self.head_dim).transpose(1, 2)
        start = cache.start if cache is not None else 0
        static = isinstance(start, Tensor)
        if static:  # the queries' and keys' positions are looked up on the device
            self.rope.reserve(cache.k.shape[2])
        k = self.rope(k, start)
        if cache is None:
            return k, v, None
        k, v = cache.append(k, v)
        return k, v, start if static else None

    def forward(
        self,
        h_eff: Tensor,
        keys: Tensor,
        values: Tensor,
        rows: Tensor | None = None,
        grid: tuple[int, int] | None = None,
        start: Tensor | None = None,
        projected: Tensor | None = None,
    ) -> Tensor:
        """Slots (B, T, S, d) for h_eff (B, T, d); or, for a subset of the tokens, (1, N, S, d)
        for h_eff (1, N, d) at flat indices ``rows`` (N,) of the (B, T) grid ``grid``. ``start``
        (0-dim device tensor): the keys are a cache's whole buffers and these T tokens are at
        positions start .. start + T - 1; None: the last T of the keys are these tokens'.

        A subset is scattered back onto the grid (zero queries elsewhere) and attends densely:
        keys and values are per sequence and the probe's share of an iteration's work is small
        (about L*S*dh per token against the workspace's S*d^2), so only the projections, which
        dominate, run on the subset. Each query's output depends on that query alone, so the
        subset's slots equal the full grid's. ``projected``: ``wq(h_eff)``, computed elsewhere.
        """
        q = self.wq(h_eff) if projected is None else projected
        if rows is None:
            b, t, _ = h_eff.shape
        else:
            (b, t), q_rows = grid, q[0]
            q = q_rows.new_zeros(b * t, q_rows.shape[1]).index_copy(0, rows, q_rows)
        q = q.view(b, t, self.slots, self.head_dim).transpose(1, 2)
        q = self.rope(q, keys.shape[2] - t if start is None else start)
        mask = attention_mask(t, keys.shape[2], None, h_eff.device, start)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and t > 1)
        if rows is not None:
            y = y.transpose(1, 2).flatten(0, 1)[rows].transpose(0, 1).unsqueeze(0)  # (1, S, N, dh)
        return torch.einsum("bstk,skd->btsd", y, self.wo)


class MLPProbe(nn.Module):
    """A stateless two-layer MLP of h_eff alone: (B, T, d) -> (B, T, S, d)."""

    def __init__(self, dim: int, slots: int, hidden: int):
        super().__init__()
        self.slots, self.dim = slots, dim
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, slots * dim, bias=False)

    @property
    def input_layer(self) -> nn.Linear:
        return self.up

    def forward(self, h_eff: Tensor, projected: Tensor | None = None) -> Tensor:
        """``projected``: ``up(h_eff)``, computed elsewhere."""
        hidden = self.up(h_eff) if projected is None else projected
        return self.down(F.silu(hidden)).unflatten(-1, (self.slots, self.dim))


class SirenPrior(nn.Module):
    """A periodic prior on h: two sine layers (SIREN) then a linear map to the slots.

    ``sin(omega * (W x + b))`` with SIREN's init (first layer U(-1/in, 1/in), later layers
    U(-sqrt(6/in)/omega, +sqrt(6/in)/omega)) keeps activations spread over many periods
    without saturating, whatever the depth. (B, T, d) -> (B, T, S, d).
    """

    def __init__(self, dim: int, slots: int, hidden: int, omega: float):
        super().__init__()
        self.slots, self.dim, self.omega = slots, dim, omega
        self.first = nn.Linear(dim, hidden)
        self.hidden = nn.Linear(hidden, hidden)
        self.to_slots = nn.Linear(hidden, slots * dim)
        self.reset_expert_parameters()

    def reset_expert_parameters(self) -> None:
        with torch.no_grad():
            for layer in (self.first, self.hidden, self.to_slots):
                fan_in = layer.in_features
                bound = 1.0 / fan_in if layer is self.first else math.sqrt(6.0 / fan_in) / self.omega
                layer.weight.uniform_(-bound, bound)
                layer.bias.uniform_(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    @property
    def input_layer(self) -> nn.Linear:
        return self.first

    def forward(self, h_eff: Tensor, projected: Tensor | None = None) -> Tensor:
        """``projected``: ``h_eff @ first.weight^T`` (no bias), computed elsewhere; the bias is
        added in its dtype, as autocast casts it (and as a CUDA graph's weight casts hold it)."""
        first = self.first(h_eff) if projected is None else projected + self.first.bias.to(projected.dtype)
        z = torch.sin(self.omega * first)
        z = torch.sin(self.omega * self.hidden(z))
        return self.to_slots(z).unflatten(-1, (self.slots, self.dim))
