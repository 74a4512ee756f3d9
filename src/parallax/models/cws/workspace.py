"""One workspace iteration, exactly the pseudo-code of the CWS overview (section 03)::

    h_eff   = RMSNorm(h)
    pool    = RMSNorm(concat(e(h_eff, x) for e in experts))     # (B, T, S, d)
    q       = Q(h_eff).view(H, dh)
    k, v    = K(pool), V(pool)
    raw     = q . k^T / sqrt(dh)                                  # unnormalised, per head and slot
    cum    <- decay * cum + (1 - decay) + raw
    weights = log1p(silu(cum)) / ln(base)                         # no softmax over slots
    h      <- O_proj(sum_s weights_s * v_s)

``CWSConfig.read = "projected"`` runs exactly this; the default ``"absorbed"`` computes the
same raw and read without K(pool) and V(pool) (see ``Workspace._absorbed``; ``"fused"`` runs
it, with cum and the weights, as one Triton kernel when there is no gradient): 2 instead of
2 S d x d products per token and iteration. In their place it writes two (B, T, H, d) tensors
(the query in slot space and the per-head weighted sum) where the projected read writes the
(B, T, S, d) keys and values, so it moves fewer bytes only when there are fewer heads than
slots, and its scores cost 2 H S d per token instead of 2 S d (BENCHMARKS.md has both).
``"fused_projected"`` goes the other way when there is no gradient: the projected read, the
token-clocked slots' keys and values computed once per forward (``prepare``), the h-clocked
ones' as one product per iteration and the rest as one Triton kernel in head space.
Both fused reads also compute the query and the h-clocked experts' first layers as one product
of h_eff, their weights stacked once per forward (``prepare``; not with grounding).

Shapes: h (B, T, d); cum and raw (B, T, H, S). Nothing here knows a slot's index or a
token's position, so the workspace is permutation-invariant over slots; order enters only
through the experts. The pool normalises its slots itself (``ExpertPool``), the token-clocked
ones once per forward.

Starting point (chosen in ``initial_state``): h_0 is the token's observation (its embedding,
plus the SSM read when the pool has one) and cum_0 = 1. h_0 must depend on the token, or the
first query would be the same for every position; it has no parameters of its own, because
under the K - live_steps no-grad contract a dedicated h_0 projection would get no gradient
once K > live_steps, while the embedding and SSM are trained through the decoder and the
pool. cum_0 = 1 is the rest point of ``cum <- decay*cum + (1 - decay)`` when raw = 0: the
accumulator starts at the unit attractor mass the update pulls it toward, so the first
iteration is a perturbation of rest rather than a jump from 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallax.models.cws.config import FUSED_READS, CWSConfig
from parallax.models.cws.pool import ExpertPool, TokenContext
from parallax.models.layers import RMSNorm
from parallax.ops import fused_read


class Workspace(nn.Module):
    def __init__(self, cfg: CWSConfig):
        super().__init__()
        dim = cfg.d_model
        self.config = cfg  # ``read`` is looked up at every step, like the loop's other knobs
        self.n_heads, self.head_dim = cfg.n_heads, dim // cfg.n_heads
        self.decay, self.base = cfg.decay, cfg.base
        self.h_norm = RMSNorm(dim, cfg.norm_eps)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def initial_state(self, observation: Tensor, n_slots: int) -> tuple[Tensor, Tensor]:
        """(h_0, cum_0) for observation (B, T, d): h_0 = observation, cum_0 = 1 (B, T, H, S)."""
        b, t, _ = observation.shape
        return observation, observation.new_ones(b, t, self.n_heads, n_slots)

    def step(
        self, h: Tensor, cum: Tensor, pool: ExpertPool, context: TokenContext
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One iteration: returns (h_next (B, T, d), cum_next (B, T, H, S), raw (B, T, H, S))."""
        h_eff = self.h_norm(h)
        read = self.config.read
        if read in FUSED_READS and not torch.is_grad_enabled() and fused_read.usable(h):
            return self._fused_step(h_eff, cum, pool, context)
        token_clocked, h_clocked = pool.slot_groups(h_eff, context)  # (B, T, S_i, d) each, or None
        q = self._heads(self.q_proj(h_eff))
        slots = torch.cat([group for group in (token_clocked, h_clocked) if group is not None], dim=2)  # (B, T, S, d)
        if read == "projected":
            raw, read_of = self._projected(q, slots)
        else:
            raw, read_of = self._absorbed(q, slots)
        cum = self.decay * cum + (1.0 - self.decay) + raw
        weights = torch.log1p(F.silu(cum)) / math.log(self.base)
        return self.o_proj(read_of(weights).flatten(-2)), cum, raw

    def _heads(self, x: Tensor) -> Tensor:
        """(..., d) -> (..., H, dh)."""
        return x.unflatten(-1, (self.n_heads, self.head_dim))

    def _fused_step(
        self, h_eff: Tensor, cum: Tensor, pool: ExpertPool, context: TokenContext
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``step`` without gradient through a fused read, the query and the h-clocked experts'
        first layers as one product of h_eff where ``prepare`` stacked their weights: one launch
        instead of one per layer, and a wider product, which cuBLAS runs closer to its peak."""
        if context.input_weight is None:
            q, inputs = self.q_proj(h_eff), None
        else:
            widths = [self.q_proj.out_features] + [layer.out_features for layer in pool.input_layers()]
            q, *inputs = F.linear(h_eff, context.input_weight).split(widths, dim=-1)
        token_clocked, h_clocked = pool.slot_groups(h_eff, context, inputs)  # (B, T, S_i, d) each, or None
        if self.config.read == "fused":
            return self._fused(self._heads(q), token_clocked, h_clocked, cum)
        return self._fused_projected(self._heads(q), token_clocked, h_clocked, cum, context.fixed_kv)

    def _fused(
        self, q: Tensor, token_clocked: Tensor | None, h_clocked: Tensor | None, cum: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The absorbed read, cum and weights in one Triton kernel (no gradient), which reads
        the two groups of slots where they are."""
        w_k = self.k_proj.weight.view(self.n_heads, self.head_dim, -1)
        w_v = self.v_proj.weight.view(self.n_heads, self.head_dim, -1)
        lead = q.shape[:-2]
        if h_clocked is None:  # a pool of token-clocked experts only
            token_clocked, h_clocked = None, token_clocked
        raw, cum, read = fused_read.fused_read(
            q.flatten(0, -3), h_clocked.flatten(0, -3), cum.flatten(0, -3), w_k, w_v, self.decay, self.base,
            fixed=None if token_clocked is None else token_clocked.flatten(0, -3),
        )
        return self._unflattened(lead, raw, cum, read)

    def _unflattened(self, lead, raw: Tensor, cum: Tensor, read: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A fused read's (N, ...) outputs as ``step``'s: (h_next, cum', raw) over the ``lead`` dims."""
        return self.o_proj(read.reshape(*lead, -1)), cum.view(*lead, *cum.shape[1:]), raw.view(*lead, *raw.shape[1:])

    def prepare(self, context: TokenContext, pool: ExpertPool) -> TokenContext:
        """``context`` with what a forward's no-grad iterations read and do not change, for the
        fused reads: W_q stacked on the h-clocked experts' input layers, cast as autocast would
        (``input_weight``; not with grounding, which the experts add to h_eff and the query
        does not), and for ``read = "fused_projected"`` the keys and values of the token-clocked
        slots (``fixed_kv``). Computed without gradient (only the no-grad iterations read them)."""
        if self.config.read not in FUSED_READS or not fused_read.usable(context.observation):
            return context
        with torch.no_grad():
            layers = pool.input_layers()
            if context.grounding is None and layers:
                weight = torch.cat([self.q_proj.weight] + [layer.weight for layer in layers])
                context = dataclasses.replace(context, input_weight=weight.to(_matmul_dtype(weight)))
            if self.config.read == "fused_projected" and context.fixed:
                fixed = context.token_clocked_slots()
                fixed_kv = fused_read.slot_keys_values(fixed, self._keys_values_weight().to(fixed.dtype))
                context = dataclasses.replace(context, fixed_kv=fixed_kv)
        return context

    def _keys_values_weight(self) -> Tensor:
        """W_k stacked on W_v, (2 d, d): the keys and values of a slot in one product."""
        return torch.cat([self.k_proj.weight, self.v_proj.weight])

    def _fused_projected(
        self, q: Tensor, token_clocked: Tensor | None, h_clocked: Tensor | None, cum: Tensor, fixed_kv: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The projected read as one product (the h-clocked slots' keys and values) and one Triton
        kernel (no gradient), the token-clocked slots' keys and values from ``prepare``."""
        if token_clocked is not None and fixed_kv is None:  # not a silent slow path: a context lost them
            raise RuntimeError(
                "read='fused_projected' without the token-clocked slots' keys and values: settle a context "
                "from Workspace.prepare (it computes them once per forward)"
            )
        w_kv = self._keys_values_weight()
        lead = q.shape[:-2]
        raw, cum, read = fused_read.fused_projected_read(
            q.flatten(0, -3), None if h_clocked is None else h_clocked.flatten(0, -3), cum.flatten(0, -3), w_kv,
            self.decay, self.base, fixed_kv=None if fixed_kv is None else fixed_kv.flatten(0, -3),
        )
        return self._unflattened(lead, raw, cum, read)

    def _projected(self, q: Tensor, slots: Tensor):
        """The pseudo-code as written: K and V of every slot, (B, T, S, H, dh) each."""
        k = self.k_proj(slots).unflatten(-1, (self.n_heads, self.head_dim))
        v = self.v_proj(slots).unflatten(-1, (self.n_heads, self.head_dim))
        raw = torch.einsum("bthe,btshe->bths", q, k) / math.sqrt(self.head_dim)
        return raw, lambda weights: torch.einsum("bths,btshe->bthe", weights, v)

    def _absorbed(self, q: Tensor, slots: Tensor):
        """The same scores and read with W_k and W_v moved off the slots.

        q_h . (W_k,h s) = (W_k,h^T q_h) . s and sum_s w_s W_v,h s = W_v,h (sum_s w_s s): each
        token pays two d x d products per iteration instead of 2 S of them, and writes (H, d)
        twice instead of (S, d) keys and values. Exact in real arithmetic; it rounds differently.
        """
        w_k = self.k_proj.weight.unflatten(0, (self.n_heads, self.head_dim))  # (H, dh, d)
        w_v = self.v_proj.weight.unflatten(0, (self.n_heads, self.head_dim))
        q_in_slot_space = torch.einsum("bthe,hed->bthd", q, w_k)  # (B, T, H, d)
        raw = torch.einsum("bthd,btsd->bths", q_in_slot_space, slots) / math.sqrt(self.head_dim)
        return raw, lambda weights: torch.einsum(
            "bthd,hed->bthe", torch.einsum("bths,btsd->bthd", weights, slots), w_v
        )


def _matmul_dtype(weight: Tensor) -> torch.dtype:
    """The dtype a product reads ``weight`` in: autocast's where it is on, else its own."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def compiled_step(workspace: Workspace):
    """``workspace.step`` through ``torch.compile`` (inductor, default mode), for the no-grad
    iterations outside the compact loop, whose shapes do not change within a call (the
    compact loop compiles its whole iteration, ``compact.Iterations``).

    The unbound ``Workspace.step`` is compiled once per process: modules are inlined, so every
    workspace of the same structure reuses its graphs, and no compiled function is stored on
    a module (a deep-copied model would otherwise run the original's weights). CUDA graphs
    are added apart (``graphed.py``, ``CWSConfig.cuda_graph``).
    """
    step = _compiled_workspace_step()
    return lambda h, cum, pool, context: step(workspace, h, cum, pool, context)


@functools.cache
def _compiled_workspace_step():
    return torch.compile(Workspace.step)
