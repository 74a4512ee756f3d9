"""The K-iteration settling loop and the training contract around it.

Without gradient (evaluation, generation) the loop simply runs up to ``k_max`` iterations,
stopping early once every token has halted. With gradient:

* halting off: iterations 1 .. K - live_steps run under ``torch.no_grad``, the last
  ``live_steps`` with gradient. Autograd keeps only what the live steps save, so memory
  grows with ``live_steps`` and not with K.
* halting on (``halt_in_training``): a no-grad pass runs the whole halting loop and keeps,
  per token, the state it had ``live_steps`` iterations before it halted (a masked ring of
  ``live_steps`` states, so again nothing grows with K). The live steps then replay each
  token's last ``live_steps`` iterations from that state with gradient. A token's trajectory
  depends only on its own state and the token-clocked context, so the replay reproduces
  exactly the values of the no-grad pass.

Token-clocked expert outputs are computed before the loop with gradient, so they receive
gradient through the live steps like the h-clocked experts do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from parallax.models.cws.halting import HaltMonitor
from parallax.models.cws.pool import ExpertPool, TokenContext
from parallax.models.cws.workspace import Workspace


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
) -> Settled:
    """Settle every token of ``context``; ``live_steps = 0`` means no gradient is wanted."""
    h, cum = workspace.initial_state(context.observation, pool.total_slots)
    b, t, _ = h.shape
    monitor = HaltMonitor(
        b, t, k_max=k_max, k_min=min(k_min, k_max), rule=rule, tol=tol, enabled=halting, device=h.device
    )

    def iterate(k: int, h: Tensor, cum: Tensor) -> tuple[Tensor, Tensor]:
        running = monitor.active
        h_next, cum_next, raw = workspace.step(h, cum, pool, context)
        monitor.observe(k, raw)
        if not halting:
            return h_next, cum_next
        return (
            torch.where(running[..., None], h_next, h),
            torch.where(running[..., None, None], cum_next, cum),
        )

    live = min(live_steps, k_max)
    if live == 0:
        for k in range(1, k_max + 1):
            h, cum = iterate(k, h, cum)
            if halting and monitor.all_halted:
                break
    elif not halting:
        with torch.no_grad():
            for k in range(1, k_max - live + 1):
                h, cum = iterate(k, h, cum)
        for k in range(k_max - live + 1, k_max + 1):
            h, cum = iterate(k, h, cum)
    else:
        h = _replay_last_iterations(workspace, pool, context, monitor, iterate, h, cum, k_max, live)
    return Settled(h=h, k_used=monitor.k_used, trace=monitor.trace)


def _replay_last_iterations(
    workspace: Workspace,
    pool: ExpertPool,
    context: TokenContext,
    monitor: HaltMonitor,
    iterate,
    h: Tensor,
    cum: Tensor,
    k_max: int,
    live: int,
) -> Tensor:
    """Halting loop without gradient, then each token's last ``live`` iterations with it."""
    with torch.no_grad():
        ring = [(h, cum)] * live  # ring[i]: state before the token's (live - i)-th last iteration
        for k in range(1, k_max + 1):
            running = monitor.active
            kept_h, kept_c = running[..., None], running[..., None, None]
            ring = [
                (torch.where(kept_h, new[0], old[0]), torch.where(kept_c, new[1], old[1]))
                for old, new in zip(ring, ring[1:] + [(h, cum)])
            ]
            h, cum = iterate(k, h, cum)
            if monitor.all_halted:
                break
    h, cum = ring[0]
    for j in range(live):
        replaying = j >= live - monitor.k_used  # tokens that ran fewer than `live` iterations wait
        h_next, cum_next, _ = workspace.step(h, cum, pool, context)
        h = torch.where(replaying[..., None], h_next, h)
        cum = torch.where(replaying[..., None, None], cum_next, cum)
    return h
