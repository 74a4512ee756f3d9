"""Analytic FLOP counts of one forward pass and one training step, from a model's config.

Achieved TFLOP/s needs the work a step really does, and for these models most of it runs in
iterations without gradient (the CWS's K - live_steps workspace iterations, the recurrent
core's r - backprop_depth steps, the EAM's solver steps before its gradient tail), which a
"6 x parameters" rule misses. Conventions, those of ``torch.utils.flop_counter`` (which the
tests check these counts against):

* a matrix product (m x k) @ (k x n) is 2mkn FLOPs; norms, activations, the SSM's elementwise
  recurrence, HRR's FFTs and the loss are not counted;
* attention is counted over the full T x T score matrix even when causal or windowed (the
  windowed kernels with a mask compute it all; nanoGPT's MFU counts causal attention so too);
* a training step is the forward of every iteration plus a backward of twice the forward of
  the parts that carry gradient.

Shapes: ``batch`` sequences of ``seq`` tokens (the EAM appends one position: it denoises
``seq + 1`` tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from parallax.errors import ConfigError


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one forward pass split by gradient: ``no_grad`` runs forward only."""

    no_grad: float
    with_grad: float

    @property
    def forward(self) -> float:
        return self.no_grad + self.with_grad

    @property
    def train(self) -> float:
        return self.no_grad + 3.0 * self.with_grad


def linear(n: int, d_in: int, d_out: int) -> float:
    return 2.0 * n * d_in * d_out


def attention(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> float:
    """Scores and weighted sum; key/value heads shared by GQA cost as many as query heads."""
    return 4.0 * batch * heads * q_len * kv_len * head_dim


def swiglu_hidden(dim: int) -> int:
    """``parallax.models.layers.SwiGLU``'s default hidden width."""
    return 32 * math.ceil(8 * dim / 3 / 32)


def swiglu(n: int, dim: int, hidden: int | None = None) -> float:
    return 3 * linear(n, dim, hidden or swiglu_hidden(dim))


def transformer_block(batch: int, seq: int, dim: int, heads: int, kv_heads: int, mlp: float | None = None) -> float:
    """A ``TransformerBlock``: projections, attention, and a SwiGLU MLP unless ``mlp`` is given."""
    n, head_dim = batch * seq, dim // heads
    projections = 2 * linear(n, dim, dim) + 2 * linear(n, dim, kv_heads * head_dim)
    return projections + attention(batch, heads, seq, seq, head_dim) + (swiglu(n, dim) if mlp is None else mlp)


def _transformer(cfg, batch: int, seq: int) -> StepFlops:
    n = batch * seq
    block = transformer_block(batch, seq, cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads)
    return StepFlops(0.0, cfg.n_layers * block + linear(n, cfg.d_model, cfg.vocab_size))


def _swap(cfg, batch: int, seq: int) -> StepFlops:
    n = batch * seq
    block = transformer_block(batch, seq, cfg.n_embd, cfg.n_head, cfg.n_kv_heads)
    return StepFlops(0.0, cfg.num_loops * 2 * cfg.n_layer * block + linear(n, cfg.n_embd, cfg.vocab_size))


def recurrent_iterations(cfg) -> int:
    """r of a training step; only a fixed r makes a step's FLOPs a number."""
    if cfg.iterations != "fixed":
        raise ConfigError("recurrent FLOPs need a fixed r per step: set iterations='fixed' and mean_iterations")
    return cfg.mean_iterations


def _recurrent(cfg, batch: int, seq: int) -> StepFlops:
    n, d = batch * seq, cfg.d_model
    mlp = None
    if cfg.moe_experts:  # routed: every token runs top_k experts
        mlp = linear(n, d, cfg.moe_experts) + cfg.moe_top_k * swiglu(n, d)
    block = transformer_block(batch, seq, d, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, mlp)
    core = cfg.core_layers * block + (linear(n, 2 * d, d) if cfg.reground == "adapter" else 0.0)
    r = recurrent_iterations(cfg)
    live = min(r, cfg.backprop_depth)
    outer = (cfg.prelude_layers + cfg.coda_layers) * block + linear(n, d, cfg.vocab_size)
    return StepFlops((r - live) * core, outer + live * core)


def _eam(cfg, batch: int, seq: int) -> StepFlops:
    if cfg.gradient != "tail":
        raise ConfigError("EAM FLOPs are counted for gradient='tail' only")
    length = seq + 1
    n, d = batch * length, cfg.dim
    block = 4 * linear(n, d, d) + attention(batch, cfg.heads, length, length, d // cfg.heads)
    block += swiglu(n, d, cfg.mlp_hidden or None)
    frozen = cfg.solver_steps - cfg.grad_tail  # Anderson's small mixing solves are not counted
    return StepFlops(frozen * block, cfg.grad_tail * block + linear(n, d, cfg.vocab_size))


def cws_iteration(cfg, batch: int, seq: int, read: str) -> float:
    """One workspace iteration reading the pool by ``read``: the h-clocked experts, then the read."""
    n, d = batch * seq, cfg.d_model
    total = 0.0
    for name, slots in zip(cfg.experts, cfg.slots):
        if name == "attention":
            width = slots * cfg.probe_head_dim
            total += linear(n, d, width) + attention(batch, slots, seq, seq, cfg.probe_head_dim) + linear(n, width, d)
        elif name == "mlp":
            total += linear(n, d, cfg.mlp_hidden) + linear(n, cfg.mlp_hidden, slots * d)
        elif name == "siren":
            h = cfg.siren_hidden
            total += linear(n, d, h) + linear(n, h, h) + linear(n, h, slots * d)
    n_slots = sum(cfg.slots)
    if read in ("absorbed", "fused"):
        # q and o projections; W_k into the query and W_v after the read, once per token; raw
        # scores and the weighted sum, per head against the d-wide slots
        return total + 4 * linear(n, d, d) + 2 * 2.0 * n * cfg.n_heads * n_slots * d
    # q and o projections of h; k and v of every slot (for fused_projected, of the h-clocked
    # ones: the token-clocked ones' are counted once per forward, ``cws_fixed_keys_values``); raw
    # scores and the weighted read
    projected = n_slots if read == "projected" else n_slots - _token_clocked_slots(cfg)
    return total + 2 * linear(n, d, d) + 2 * linear(n * projected, d, d) + 2 * 2.0 * n * n_slots * d


def _token_clocked_slots(cfg) -> int:
    return sum(slots for name, slots in zip(cfg.experts, cfg.slots) if name == "ssm")


def cws_fixed_keys_values(cfg, batch: int, seq: int) -> float:
    """``read = "fused_projected"``: the token-clocked slots' keys and values, once per forward."""
    return 2 * linear(batch * seq * _token_clocked_slots(cfg), cfg.d_model, cfg.d_model)


def cws_token_clocked(cfg, batch: int, seq: int) -> float:
    """Once per forward: the SSM read and its slots, the probe's keys and values, grounding."""
    n, d = batch * seq, cfg.d_model
    total = 0.0
    slots = dict(zip(cfg.experts, cfg.slots))
    if "ssm" in slots:
        inner, dt_rank = cfg.ssm_expand * d, math.ceil(d / 16)
        total += linear(n, d, 2 * inner) + linear(n, inner, dt_rank + 2 * cfg.ssm_state)
        total += linear(n, dt_rank, inner) + 2.0 * n * inner * cfg.ssm_state  # read-out C . state
        total += linear(n, inner, d) + linear(n, d, slots["ssm"] * d)
    if "attention" in slots:
        source = 2 * d if cfg.probe_keys == "shift" else d
        total += 2 * linear(n, source, slots["attention"] * cfg.probe_head_dim)
    if cfg.ground and any(name != "ssm" for name in cfg.experts):
        total += linear(n, d, d)
    return total


def _cws(cfg, batch: int, seq: int) -> StepFlops:
    from parallax.models.cws.config import FUSED_READS
    from parallax.models.cws.decoder import DECODER_LAYERS

    n, d = batch * seq, cfg.d_model
    decoder = DECODER_LAYERS * transformer_block(batch, seq, d, cfg.decoder_heads, cfg.decoder_heads)
    live = min(cfg.live_steps, cfg.k_max)
    # with halting in training, a full no-grad pass runs before the live replay (upper bound: k_max)
    frozen = cfg.k_max if cfg.halting and cfg.halt_in_training else cfg.k_max - live
    outer = cws_token_clocked(cfg, batch, seq) + decoder + linear(n, d, cfg.vocab_size)
    live_read = "absorbed" if cfg.read in FUSED_READS else cfg.read  # the fused reads' kernels: no-grad only
    no_grad = frozen * cws_iteration(cfg, batch, seq, cfg.read)
    if cfg.read == "fused_projected" and frozen:
        no_grad += cws_fixed_keys_values(cfg, batch, seq)
    return StepFlops(no_grad, outer + live * cws_iteration(cfg, batch, seq, live_read))


COUNTERS: dict[str, Callable] = {
    "transformer": _transformer,
    "swap": _swap,
    "recurrent": _recurrent,
    "eam": _eam,
    "cws": _cws,
}


def step_flops(name: str, cfg, batch: int, seq: int) -> StepFlops:
    """FLOPs of model ``name`` (config ``cfg``) on a (batch, seq) batch of token ids."""
    if name not in COUNTERS:
        raise ConfigError(f"no FLOP counter for model {name!r}; counted: {', '.join(COUNTERS)}")
    return COUNTERS[name](cfg, batch, seq)
