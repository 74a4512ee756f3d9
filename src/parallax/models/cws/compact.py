"""The no-grad halting loop on the tokens still running (``CWSConfig.loop = "compact"``).

The reference loop (``settle.py``) iterates every token until the last one halts and freezes
halted tokens with masks, so halting saves no work. This loop keeps a working set: the flat
(B*T) indices of the tokens it still iterates, with their state and per-token context
gathered into (1, N, ...) rows (``TokenContext.select``). Tokens that halt stay in the set,
frozen by masks as in the reference, until the active ones fall below ``RECOMPACT_BELOW``
of the set; then the set's state is written back to the full grid and the set shrinks to
about the active tokens. So right after a shrink the set holds the tokens that were active at
most one iteration earlier (see below), at most 4/3 of those active when it shrinks next, and
there are at most log(B*T) / log(4/3) gathers per call (about 35 for 32 x 512 tokens), each
moving about one iteration's inputs for the set: cheap against the iteration's S*d^2 per token.
Under CUDA graphs the set is padded to a bucket size (``pad_to``), at most 5/4 of that, or
the smallest bucket.
(A threshold of 1/2 measured the same on CPU within noise; it allows twice the active work.)

Everything per token (the state, the cum accumulator, the SSM's proposals, the grounding,
the workspace's projections, the MLP probe and SIREN prior) runs on the set. The attention
probe's keys and values are per sequence: the set's queries are scattered back onto the
(B, T) grid and attend densely (see ``AttentionProbe.forward``), which keeps each query's
own sequence and causal position without gathering keys per token.

Shrinking and stopping need the number of active tokens on the host. The loop mostly reads it
one iteration late (``ActiveCounts``): on CUDA the count is copied to pinned memory without
blocking, and the host waits only for the previous iteration while the current one is already
queued, so the GPU is never left idle by the read. A shrink after iteration k then keeps as
many tokens as were active after iteration k - 1 (the number the host has): those still
active after iteration k first, then halted ones, which iterations leave as they are.
Ordering the set's tokens so needs no host read. When the counts so far say that iteration
k's count would end the loop or shrink the set (``worth_waiting``), the host waits for it:
the GPU idles for the host's turnaround once, instead of running one more iteration of the
larger set (or a masked no-op at the end).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from parallax.models.cws.halting import HaltMonitor
from parallax.models.cws.pool import ExpertPool, TokenContext
from parallax.models.cws.workspace import Workspace

RECOMPACT_BELOW = 0.75  # shrink the working set when its active share falls below this


class ActiveCounts:
    """The number of active tokens after each iteration, read on the host (see the module
    docstring): each count is queued on the device with its iteration and read one iteration
    late, or at once when the loop asks (``wait``). ``read`` holds the counts read so far,
    after iterations 0 (all ``total`` tokens), 1, 2, ..."""

    def __init__(self, total: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.read = [total]
        self.pending: list[tuple[Tensor, torch.cuda.Event | None]] = []

    def push(self, count: Tensor) -> None:
        """Queue this iteration's ``count`` (a 0-dim device tensor) and read the earlier ones."""
        if self.cuda:
            host = torch.empty((), dtype=count.dtype, pin_memory=True)
            host.copy_(count, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((host, event))
        else:
            self.pending.append((count.clone(), None))  # a CUDA graph's output buffer is rewritten by its next replay
        self._read_until(len(self.pending) - 1)

    def wait(self) -> None:
        """Read the last pushed count too (waiting for its iteration to finish)."""
        self._read_until(len(self.pending))

    def _read_until(self, n: int) -> None:
        for value, event in self.pending[:n]:
            if event is not None:
                event.synchronize()
            self.read.append(int(value))
        del self.pending[:n]


def worth_waiting(read: list[int], size: int, pad_to: Callable[[int], int] | None) -> bool:
    """Whether to wait for the count of the iteration just queued rather than decide on the
    one before: when the counts read so far, extrapolated at their last rate of decline, say
    it ends the loop or shrinks the set where the earlier count would not. A wait leaves the
    GPU idle for the host's turnaround (tens of microseconds); deciding one iteration late
    costs an iteration on the old set, and the new set holds the tokens active one iteration
    earlier."""
    if len(read) < 2 or read[-1] == 0:  # no rate yet, or the loop ends anyway
        return False
    squared, last = read[-1] ** 2, read[-2]  # expected: squared / last (counts never rise, so last > 0)
    if squared < last:
        return True  # fewer than one token expected
    expected = -(-squared // last)  # rounded up
    return next_size(read[-1], size, pad_to) is None and next_size(expected, size, pad_to) is not None


def next_size(active: int, size: int, pad_to: Callable[[int], int] | None) -> int | None:
    """The size to shrink a set of ``size`` tokens to when ``active`` of them run, or None to
    keep it."""
    if active >= RECOMPACT_BELOW * size:
        return None
    new_size = active if pad_to is None else pad_to(active)
    return new_size if new_size < size else None


def _keep(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``mask`` (leading dims of the tensors) is set, else ``old``."""
    return torch.where(mask.view(*mask.shape, *[1] * (new.dim() - mask.dim())), new, old)


def iterate(
    step: Callable, pool: ExpertPool, context: TokenContext, monitor: HaltMonitor,
    states: list[Tensor], rows: Tensor | None, k: int | Tensor,
) -> Tensor:
    """Iteration ``k`` of the tokens ``rows`` (None: the whole grid), in place.

    ``states`` is [h, cum] followed by the training replay's ring of earlier [h, cum] pairs,
    oldest first, each shifted one along where a token still runs. Returns how many of
    these tokens are still active after it (a 0-dim device tensor). Everything it touches is
    updated in place, so a CUDA graph can capture it whole (``graphed.GraphedIterations``).
    """
    running = monitor.running(rows)
    ring = states[2:]
    for old, new in zip(ring, ring[2:] + states[:2]):  # oldest first: each reads a not yet shifted one
        old.copy_(_keep(running, new, old))
    h_next, cum_next, raw = step(states[0], states[1], pool, context)
    monitor.observe(k, raw, rows)
    states[0].copy_(_keep(running, h_next, states[0]))
    states[1].copy_(_keep(running, cum_next, states[1]))
    return monitor.running(rows).sum()


class Iterations:
    """Runs the compact loop's iterations (``iterate``) on the whole grid and on working sets.

    ``compiled``: each iteration (the workspace step, the monitor and the masks) runs through
    ``torch.compile``, static shapes on the whole grid and dynamic ones on the shrinking set,
    so the monitor's and masks' small kernels are fused with the step's instead of launched
    one by one (at a set of a few dozen tokens each kernel costs its launch, not its work).
    """

    def __init__(self, workspace: Workspace, pool: ExpertPool, monitor: HaltMonitor, compiled: bool):
        self.workspace, self.pool, self.monitor, self.compiled = workspace, pool, monitor, compiled

    def load(
        self, states: list[Tensor], rows: Tensor | None, context: TokenContext
    ) -> tuple[list[Tensor], TokenContext]:
        """The states and context to iterate from now on: the grid's (``rows`` None) or those
        of the tokens ``rows`` of the (B*T, ...) ``states`` and the grid's ``context``."""
        if rows is None:
            return states, context
        return [x[rows].unsqueeze(0) for x in states], context.select(rows)

    def shrink(
        self, full: list[Tensor], states: list[Tensor], rows: Tensor | None, size: int, context: TokenContext
    ) -> tuple[list[Tensor], list[Tensor], Tensor, TokenContext]:
        """Shrink the working set to ``size`` tokens (``shrunk_rows``): returns the grid states,
        the new set's states, its rows and its context."""
        full, rows = shrunk_rows(self.monitor, full, states, rows, size)
        states, context = self.load(full, rows, context)
        return full, states, rows, context

    def __call__(self, k: int, states: list[Tensor], rows: Tensor | None, context: TokenContext) -> Tensor:
        return self.function(rows)(self.workspace, self.pool, context, self.monitor, states, rows, self.number(k))

    def function(self, rows: Tensor | None) -> Callable:
        """``iterate`` with the workspace's step, compiled or not, for the grid or a set."""
        if not self.compiled:
            return _iterate_workspace
        return _compiled_iteration(working_set=rows is not None)

    def number(self, k: int) -> int | Tensor:
        """The iteration number as the function takes it: compiled, a device tensor (an int
        would be a constant of the compiled graph, recompiled for the next k)."""
        return torch.full((), k, device=self.monitor.flat_active.device) if self.compiled else k


def _iterate_workspace(workspace: Workspace, pool, context, monitor, states, rows, k) -> Tensor:
    return iterate(lambda *args: Workspace.step(workspace, *args), pool, context, monitor, states, rows, k)


def _iterate_working_set(workspace: Workspace, pool, context, monitor, states, rows, k) -> Tensor:
    """``_iterate_workspace`` under a code object of its own, so its dynamic-shape graphs are
    cached apart from the whole grid's static ones (dynamo caches per code object)."""
    return _iterate_workspace(workspace, pool, context, monitor, states, rows, k)


@functools.cache
def _compiled_iteration(working_set: bool) -> Callable:
    """Compiled once per process for every workspace (modules are inlined, as in
    ``workspace.compiled_step``)."""
    return torch.compile(_iterate_working_set if working_set else _iterate_workspace)


@torch.no_grad()
def settle_compact(
    iterations: Iterations,
    context: TokenContext,
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

    ``pad_to`` (for CUDA graphs, which need a few fixed sizes) maps the number of active
    tokens to the set's size; the extra rows are halted tokens, which every iteration leaves as
    they are.
    """
    grid = h.shape[:2]
    states = [x.clone() for x in [h, cum] * (1 + history)]  # [h, cum, ring_0 h, ring_0 cum, ...]
    rows: Tensor | None = None  # flat indices of the working set; None: the whole grid
    states, ctx = iterations.load(states, rows, context)
    full: list[Tensor] = []  # the (B*T, ...) grid, written back on every shrink
    counts = ActiveCounts(grid.numel(), h.device)
    for k in range(1, k_max + 1):
        counts.push(iterations(k, states, rows, ctx))  # read: the counts up to iteration k - 1
        if k == k_max:
            break
        size = states[0].shape[:2].numel()  # (B, T) or (1, N)
        if worth_waiting(counts.read, size, pad_to):
            counts.wait()  # and iteration k's
        if counts.read[-1] == 0:
            break  # none active: after a wait, iteration k was the last; else it was a masked no-op
        new_size = next_size(counts.read[-1], size, pad_to)
        if new_size is not None:
            full, states, rows, ctx = iterations.shrink(full, states, rows, new_size, context)
            # a count queued before the shrink stays good for the next decisions: every token it
            # counts as active after iteration k is in the new set
    full = _written_back(full, states, rows)
    full = [x.view(*grid, *x.shape[1:]).clone() for x in full]  # not a CUDA graph's buffers
    return full[0], full[1], list(zip(full[2::2], full[3::2]))


def shrunk_rows(
    monitor: HaltMonitor, full: list[Tensor], states: list[Tensor], rows: Tensor | None, size: int
) -> tuple[list[Tensor], Tensor]:
    """The set's states written into the (B*T, ...) grid ``full`` (on the first shrink, the grid
    states themselves), and the flat indices of the next set: the ``size`` tokens active after
    the last iteration first (no more than that), then halted ones. Sorting, unlike selecting the
    active ones, needs no host read of their number."""
    still = monitor.flat_active if rows is None else monitor.flat_active[rows]
    kept = torch.argsort(~still, stable=True)[:size]
    full = _written_back(full, states, rows)
    return full, kept if rows is None else rows[kept]


def _written_back(full: list[Tensor], states: list[Tensor], rows: Tensor | None) -> list[Tensor]:
    """The (B*T, ...) grid tensors with the working set's rows replaced by its states (on the
    whole grid, the states viewed as such)."""
    if rows is None:
        return [x.flatten(0, 1) for x in states]
    for f, x in zip(full, states):
        f.index_copy_(0, rows, x[0])
    return full


def planned_set_sizes(k_used: Tensor, k_max: int, pad_to: Callable[[int], int] | None = None) -> list[int]:
    """The working-set size of every iteration ``settle_compact`` runs, for tokens that take
    ``k_used`` iterations each: its shrink rule replayed on counts alone, so a benchmark can
    tell the work halting leaves (the sum of these over k_max x B*T) from the time it takes."""
    counts = torch.bincount(k_used.flatten().long(), minlength=k_max + 1)
    size, sizes = k_used.numel(), []
    active_after = [size] + [int(counts[j + 1:].sum()) for j in range(1, k_max + 1)]  # after iteration j
    for k in range(1, k_max + 1):
        sizes.append(size)
        if k == k_max:
            break
        read = active_after[:k]  # as ``ActiveCounts.read`` after iteration k's push
        if worth_waiting(read, size, pad_to):
            read = active_after[:k + 1]
        if read[-1] == 0:
            break
        new_size = next_size(read[-1], size, pad_to)
        if new_size is not None:
            size = new_size
    return sizes
