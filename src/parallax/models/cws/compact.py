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
Under CUDA graphs the set is padded to a bucket size (``pad_to``): then it holds at most
5/4 x 4/3 of the active tokens, or the smallest bucket, and it shrinks only when the padded
size is smaller than the set.
(A threshold of 1/2 measured the same on CPU within noise; it allows twice the active work.)

Everything per token (the state, the cum accumulator, the SSM's proposals, the grounding,
the workspace's projections, the MLP probe and SIREN prior) runs on the set. The attention
probe's keys and values are per sequence: the set's queries are scattered back onto the
(B, T) grid and attend densely (see ``AttentionProbe.forward``), which keeps each query's
own sequence and causal position without gathering keys per token.

Shrinking and stopping need the number of active tokens on the host. The loop reads it one
iteration late (``LaggedCount``): on CUDA the count is copied to pinned memory without
blocking, and the host waits only for the previous iteration while the current one is already
queued, so the GPU is never left idle by the read. So the set shrinks, and the loop ends, one
iteration after the count says so; the extra iteration is a masked no-op for halted tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from parallax.models.cws.halting import HaltMonitor
from parallax.models.cws.pool import ExpertPool, TokenContext

RECOMPACT_BELOW = 0.75  # shrink the working set when its active share falls below this


class LaggedCount:
    """Per-iteration counts read on the host one iteration late (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: tuple[Tensor, torch.cuda.Event | None] | None = None

    def push(self, count: Tensor) -> int | None:
        """Queue this iteration's ``count`` (a 0-dim device tensor); return the previous
        pushed one (None right after a ``reset``)."""
        previous = None
        if self.pending is not None:
            value, event = self.pending
            if event is not None:
                event.synchronize()
            previous = int(value)
        if self.cuda:
            host = torch.empty((), dtype=count.dtype, pin_memory=True)
            host.copy_(count, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (host, event)
        else:
            self.pending = (count, None)
        return previous

    def reset(self) -> None:
        self.pending = None


def _keep(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``mask`` (leading dims of the tensors) is set, else ``old``."""
    return torch.where(mask.view(*mask.shape, *[1] * (new.dim() - mask.dim())), new, old)


@torch.no_grad()
def settle_compact(
    full_step: Callable,
    set_step: Callable,
    pool: ExpertPool,
    context: TokenContext,
    monitor: HaltMonitor,
    h: Tensor,
    cum: Tensor,
    *,
    k_max: int,
    history: int = 0,
    pad_to: Callable[[int], int] | None = None,
) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    """Run the halting loop from (h (B, T, d), cum (B, T, H, S)); returns the settled h and cum
    and, for the training replay, a ring of the last ``history`` states before each token's
    iterations (as ``settle._reference_ring_loop``), all on the full grid.

    ``full_step`` (the workspace step, maybe compiled with static shapes) runs while the set is
    the whole grid; ``set_step`` (eager, or compiled with dynamic shapes) runs the shrunken
    set, whose size changes. ``pad_to`` (for CUDA graphs, which need a few fixed sizes) maps
    the number of active tokens to the set's size; the extra rows repeat one halted token,
    which every iteration leaves as it is, so its copies agree wherever they are written.
    """
    grid = h.shape[:2]
    states = [h, cum] * (1 + history)  # [h, cum, ring_0 h, ring_0 cum, ...], grid or (1, N) rows
    full = [x.flatten(0, 1) for x in states]  # the same as (B*T, ...), written back on shrinking
    rows: Tensor | None = None  # flat indices of the working set; None: the whole grid
    ctx = context
    counts = LaggedCount(h.device)
    for k in range(1, k_max + 1):
        running = monitor.active if rows is None else monitor.flat_active[rows].unsqueeze(0)
        if history:
            ring = states[2:]
            states[2:] = [_keep(running, new, old) for old, new in zip(ring, ring[2:] + states[:2])]
        step = full_step if rows is None else set_step
        h_next, cum_next, raw = step(states[0], states[1], pool, ctx)
        monitor.observe(k, raw, rows)
        states[0], states[1] = _keep(running, h_next, states[0]), _keep(running, cum_next, states[1])
        still = monitor.flat_active if rows is None else monitor.flat_active[rows]
        active = counts.push(still.sum())  # active after iteration k - 1, in the same set
        if active == 0:
            break  # iteration k was a masked no-op
        smaller = active is not None and (pad_to is None or pad_to(active) < still.numel())
        if smaller and active < RECOMPACT_BELOW * still.numel() and k < k_max:
            kept = still.nonzero().squeeze(1) if rows is None else rows[still]
            if kept.numel() == 0:  # a host read, once per shrink
                break
            if pad_to is not None:
                halted = torch.argmin(monitor.flat_active.to(torch.uint8))  # one exists: the set shrank
                kept = torch.cat([kept, halted.expand(pad_to(kept.numel()) - kept.numel())])
            full = _write_back(full, states, rows)
            rows = kept
            states = [x[rows].unsqueeze(0) for x in full]
            ctx = context.select(rows)
            counts.reset()  # the queued count is of the old set
    full = _write_back(full, states, rows)
    full = [x.view(*grid, *x.shape[1:]) for x in full]
    return full[0], full[1], list(zip(full[2::2], full[3::2]))


def _write_back(full: list[Tensor], states: list[Tensor], rows: Tensor | None) -> list[Tensor]:
    """The (B*T, ...) grid tensors with the working set's rows replaced by its states."""
    if rows is None:
        return [x.flatten(0, 1) for x in states]
    return [f.index_copy(0, rows, x[0]) for f, x in zip(full, states)]


def planned_set_sizes(k_used: Tensor, k_max: int, pad_to: Callable[[int], int] | None = None) -> list[int]:
    """The working-set size of every iteration ``settle_compact`` runs, for tokens that take
    ``k_used`` iterations each: its shrink rule replayed on counts alone, so a benchmark can
    tell the work halting leaves (the sum of these over k_max x B*T) from the time it takes."""
    counts = torch.bincount(k_used.flatten().long(), minlength=k_max + 1)
    active_after = [int(counts[j + 1:].sum()) for j in range(k_max + 1)]  # active after iteration j
    size, pending, sizes = k_used.numel(), None, []
    for k in range(1, k_max + 1):
        sizes.append(size)
        active, pending = pending, active_after[k]  # the count read one iteration late
        if active == 0:
            break
        smaller = active is not None and (pad_to is None or pad_to(active) < size)
        if smaller and active < RECOMPACT_BELOW * size and k < k_max:
            if active_after[k] == 0:
                break
            size = pad_to(active_after[k]) if pad_to is not None else active_after[k]
            pending = None
    return sizes
