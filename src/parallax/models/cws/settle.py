"""The K-iteration settling loop and the training contract around it.

Without gradient (evaluation, generation) the loop runs up to ``k_max`` iterations, stopping
early once every token has halted. With gradient:

* halting off: iterations 1 .. K - live_steps run under ``torch.no_grad``, the last
  ``live_steps`` with gradient. Autograd keeps only what the live steps save, so memory
  grows with ``live_steps`` and not with K.
* halting on (``halt_in_training``): a no-grad pass runs the whole halting loop and keeps,
  per token, the state it had ``live_steps`` iterations before it halted (a masked ring of
  ``live_steps`` states, so again nothing grows with K). The live steps then replay each
  token's last ``live_steps`` iterations from that state with gradient (from h_0 itself where
  a token ran no more than ``live_steps`` iterations, so its observation gets gradient as with
  halting off). A token's trajectory depends only on its own state and the token-clocked
  context, so the replay reproduces the values of the no-grad pass (exactly with the PyTorch
  reads; to float rounding with the fused ones, whose no-grad iterations run a kernel).

Token-clocked expert outputs are computed before the loop with gradient, so they receive
gradient through the live steps like the h-clocked experts do.

Two implementations of the no-grad halting loop (``CWSConfig.loop``): ``reference`` runs every
token until all have halted and freezes halted ones with masks (simple; halting saves no
work); ``compact`` (``compact.py``) runs only the tokens still active. They agree to float
rounding. ``compile_step`` runs the no-grad iterations through ``torch.compile`` (in the
compact loop the whole iteration, monitor and masks included, its shrinking set with dynamic
shapes); ``cuda_graph`` replays every no-grad iteration from CUDA graphs, the compact loop's
working set padded to a few sizes (``graphed.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from parallax.models.cws import graphed
from parallax.models.cws.compact import Iterations, settle_compact
from parallax.models.cws.config import HALT_RULES, LOOPS
from parallax.models.cws.halting import HaltMonitor
from parallax.models.cws.pool import ExpertPool, TokenContext
from parallax.models.cws.workspace import Workspace, compiled_step
from parallax.models.graph_step import in_graph_step

# The reference loop asks whether every token has halted (a device-to-host read) only every
# this many iterations; the iterations it runs past the last halt are masked no-ops.
HALT_CHECK_EVERY = 4


@dataclass
class Settled:
    h: Tensor  # (B, T, d) the settled workspace state
    k_used: Tensor  # (B, T) iterations each token used
    trace: Tensor  # (B, T, k_max) relative raw-logit change per iteration, NaN where none


def settle(
    workspace: Workspace,
    pool: ExpertPool,
    context: TokenContext,
    *,
    k_max: int,
    k_min: int,
    halting: bool,
    rule: str,
    tol: float,
    live_steps: int,
    loop: str = "compact",
    compile_step: bool = False,
    cuda_graph: bool = False,
) -> Settled:
    """Settle every token of ``context``; ``live_steps = 0`` means no gradient is wanted."""
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
    if rule not in HALT_RULES:
        raise ValueError(f"rule must be one of {', '.join(HALT_RULES)}, got {rule!r}")
    live = min(live_steps, k_max)
    if halting or live < k_max or not torch.is_grad_enabled():  # iterations without gradient will run
        context = workspace.prepare(context, pool)
    h, cum = workspace.initial_state(context.observation, pool.total_slots)
    h0 = h  # with gradient, for the replay of tokens that ran no more than ``live`` iterations
    b, t, _ = h.shape
    # a step of a CUDA graph (a whole decoding step, ``graph_step.py``) must not wait for the
    # device: the masked reference loop runs all k_max iterations, no early exit
    capturing = in_graph_step()
    # graphs replay the iterations without gradient: with halting off and all of them live, none
    graphs = cuda_graph and not capturing and (halting or live < k_max) and graphed.usable(h, context)
    settings = dict(
        width=workspace.n_heads * pool.total_slots, k_max=k_max, k_min=min(k_min, k_max), rule=rule, tol=tol,
        enabled=halting, device=h.device,
    )
    compact = halting and loop == "compact" and not capturing
    # the compact loop's graphs capture the monitor's buffers: one monitor from call to call
    if graphs and compact:
        monitor = graphed.halt_monitor(workspace, b, t, **settings)
    else:
        monitor = HaltMonitor(b, t, **settings)
    name = "compiled" if compile_step else "eager"
    if compact:
        if graphs:  # each iteration one replay, the working set padded to a few sizes
            iterations = graphed.GraphedIterations(workspace, pool, monitor, compile_step)
        else:
            iterations = Iterations(workspace, pool, monitor, compile_step)
        pad_to = graphed.bucket if graphs else None
        h, _, ring = settle_compact(iterations, context, h, cum, k_max=k_max, history=live, pad_to=pad_to)
        if live:
            h = _replay(workspace, pool, context, monitor, h0, *ring[0], live)
        return _settled(h, monitor)
    no_grad_step = compiled_step(workspace) if compile_step else workspace.step
    if graphs:
        no_grad_step = graphed.graphed_step(no_grad_step, workspace, pool, name)
    if not halting:
        with torch.no_grad():
            h, cum = _no_grad_prefix(no_grad_step, pool, context, monitor, h, cum, k_max - live)
            if graphs:  # copies, not the graph's buffers, which its next replay overwrites
                h, cum = h.clone(), cum.clone()
        for k in range(k_max - live + 1, k_max + 1):
            h, cum, raw = workspace.step(h, cum, pool, context)
            monitor.observe(k, raw)
    elif live == 0:
        with torch.no_grad():
            h, cum = _reference_loop(no_grad_step, pool, context, monitor, h, cum, k_max, not capturing)
    else:
        with torch.no_grad():
            ring = _reference_ring_loop(no_grad_step, pool, context, monitor, h, cum, k_max, live, not capturing)
        h = _replay(workspace, pool, context, monitor, h0, *ring[0], live)
    return _settled(h, monitor)


def _settled(h: Tensor, monitor: HaltMonitor) -> Settled:
    """The result, in tensors of its own (the monitor may be reused by the next call)."""
    return Settled(h=h, k_used=monitor.k_used.clone(), trace=monitor.trace.clone())


def _no_grad_prefix(step, pool, context, monitor, h, cum, iterations):
    """Iterations 1..``iterations`` with halting off."""
    for k in range(1, iterations + 1):
        h, cum, raw = step(h, cum, pool, context)
        monitor.observe(k, raw)
    return h, cum


def _reference_loop(step, pool, context, monitor, h, cum, k_max, early_exit=True):
    """Every token, every iteration until all have halted (``early_exit``, else k_max);
    halted tokens frozen by masks."""
    for k in range(1, k_max + 1):
        running = monitor.running()
        h_next, cum_next, raw = step(h, cum, pool, context)
        monitor.observe(k, raw)
        h = torch.where(running[..., None], h_next, h)
        cum = torch.where(running[..., None, None], cum_next, cum)
        if early_exit and k % HALT_CHECK_EVERY == 0 and monitor.all_halted:
            break
    return h, cum


def _reference_ring_loop(step, pool, context, monitor, h, cum, k_max, live, early_exit=True):
    """The halting loop keeping, per token, the last ``live`` states before each iteration.

    ring[i] is the state before the token's (live - i)-th last iteration (h_0 while it has
    run fewer iterations than that).
    """
    ring = [(h, cum)] * live
    for k in range(1, k_max + 1):
        running = monitor.running()
        kept_h, kept_c = running[..., None], running[..., None, None]
        ring = [
            (torch.where(kept_h, new[0], old[0]), torch.where(kept_c, new[1], old[1]))
            for old, new in zip(ring, ring[1:] + [(h, cum)])
        ]
        h_next, cum_next, raw = step(h, cum, pool, context)
        monitor.observe(k, raw)
        h = torch.where(kept_h, h_next, h)
        cum = torch.where(kept_c, cum_next, cum)
        if early_exit and k % HALT_CHECK_EVERY == 0 and monitor.all_halted:
            break
    return ring


def _replay(workspace, pool, context, monitor, h0, h, cum, live):
    """Each token's last ``live`` iterations from ``ring[0]`` (h, cum), with gradient. Where a
    token ran no more than ``live`` iterations, ring[0] holds h_0 as the no-grad pass saw it,
    detached: the replay starts from ``h0`` itself instead, so the observation gets gradient."""
    h = torch.where((monitor.k_used <= live)[..., None], h0, h)
    for j in range(live):
        replaying = j >= live - monitor.k_used  # tokens that ran fewer than `live` iterations wait
        h_next, cum_next, _ = workspace.step(h, cum, pool, context)
        h = torch.where(replaying[..., None], h_next, h)
        cum = torch.where(replaying[..., None, None], cum_next, cum)
    return h
