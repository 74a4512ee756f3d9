"""The no-grad halting loop on the tokens still running (``CWSConfig.loop = "compact"``).

The reference loop (``settle.py``) iterates every token until the last one halts and freezes
halted tokens with masks, so halting saves no work. This loop keeps a working set: the flat
(B*T) indices of the tokens it still iterates, with their state and per-token context
gathered into (1, N, ...) rows (``TokenContext.select``). Tokens that halt stay in the set,
frozen by masks as in the reference, until the active ones fall below ``RECOMPACT_BELOW``
of the set; then the set's state is written back to the full grid and the set shrinks to
the active tokens. So the set never holds more than 4/3 of the active tokens, and there are
at most log(B*T) / log(4/3) gathers per call (about 35 for 32 x 512 tokens), each moving
about one iteration's inputs for the set: cheap against the iteration's S*d^2 per token.
(A threshold of 1/2 measured the same on CPU within noise; it allows twice the active work.)

Everything per token (the state, the cum accumulator, the SSM's proposals, the grounding,
the workspace's projections, the MLP probe and SIREN prior) runs on the set. The attention
probe's keys and values are per sequence: the set's queries are scattered back onto the
(B, T) grid and attend densely (see ``AttentionProbe.forward``), which keeps each query's
own sequence and causal position without gathering keys per token.

Halting decisions need the number of active tokens on the host, so this loop reads one
scalar back per iteration; it also ends the loop as soon as every token has halted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from parallax.models.cws.halting import HaltMonitor
from parallax.models.cws.pool import ExpertPool, TokenContext
from parallax.models.cws.workspace import Workspace

RECOMPACT_BELOW = 0.75  # shrink the working set when its active share falls below this


def _keep(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``mask`` (leading dims of the tensors) is set, else ``old``."""
    return torch.where(mask.view(*mask.shape, *[1] * (new.dim() - mask.dim())), new, old)


@torch.no_grad()
def settle_compact(
    workspace: Workspace,
    full_step: Callable,
    pool: ExpertPool,
    context: TokenContext,
    monitor: HaltMonitor,
    h: Tensor,
    cum: Tensor,
    *,
    k_max: int,
    history: int = 0,
) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    """Run the halting loop from (h (B, T, d), cum (B, T, H, S)); returns the settled h and cum
    and, for the training replay, a ring of the last ``history`` states before each token's
    iterations (as ``settle._reference_ring_loop``), all on the full grid.

    ``full_step`` (the workspace step, maybe compiled) runs while the set is the whole grid;
    the eager ``workspace.step`` runs the shrunken set, whose size changes.
    """
    grid = h.shape[:2]
    states = [h, cum] * (1 + history)  # [h, cum, ring_0 h, ring_0 cum, ...], grid or (1, N) rows
    full = [x.flatten(0, 1) for x in states]  # the same as (B*T, ...), written back on shrinking
    rows: Tensor | None = None  # flat indices of the working set; None: the whole grid
    ctx = context
    for k in range(1, k_max + 1):
        running = monitor.active if rows is None else monitor.flat_active[rows].unsqueeze(0)
        if history:
            ring = states[2:]
            states[2:] = [_keep(running, new, old) for old, new in zip(ring, ring[2:] + states[:2])]
        step = full_step if rows is None else workspace.step
        h_next, cum_next, raw = step(states[0], states[1], pool, ctx)
        monitor.observe(k, raw, rows)
        states[0], states[1] = _keep(running, h_next, states[0]), _keep(running, cum_next, states[1])
        still = monitor.flat_active if rows is None else monitor.flat_active[rows]
        active = int(still.sum())  # the host read
        if active == 0:
            break
        if active < RECOMPACT_BELOW * still.numel():
            full = _write_back(full, states, rows)
            rows = still.nonzero().squeeze(1) if rows is None else rows[still]
            states = [x[rows].unsqueeze(0) for x in full]
            ctx = context.select(rows)
    full = _write_back(full, states, rows)
    full = [x.view(*grid, *x.shape[1:]) for x in full]
    return full[0], full[1], list(zip(full[2::2], full[3::2]))


def _write_back(full: list[Tensor], states: list[Tensor], rows: Tensor | None) -> list[Tensor]:
    """The (B*T, ...) grid tensors with the working set's rows replaced by its states."""
    if rows is None:
        return [x.flatten(0, 1) for x in states]
    return [f.index_copy(0, rows, x[0]) for f, x in zip(full, states)]
