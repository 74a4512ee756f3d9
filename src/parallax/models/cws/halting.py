"""Per-token halting on the momentum of the raw logits, with static shapes.

The signal is the relative change of a token's raw-logit tensor (all heads and slots)::

    delta_k = ||raw_k - raw_{k-1}|| / max(||raw_k||, ||raw_{k-1}||, 1e-6)

made relative so one tolerance means the same at initialisation (tiny logits) and after
training (large ones). It is defined from iteration 2 on and recorded per token in
``trace`` (B, T, k_max), NaN at k = 1 and after the token halted.

* ``first`` rule: halt once delta_k < tol -- the raw logits have stopped moving.
* ``second`` rule: halt once |delta_k - delta_{k-1}| < tol on two consecutive iterations --
  the step itself has stopped changing, which also stops a token that settles into a steady
  oscillation rather than a fixed point.

Default ``first``: it is the seed's own criterion (halt when ``||raw_k - raw_{k-1}||``
saturates), it can fire from iteration 2, and an independent reading of the seed found the
second-order rule at a 5% tolerance never settled. Both stay available for measurement.

A token halts only within [k_min, k_max]; halted tokens are frozen by the caller, with
``active`` as a mask (reference loop) or by leaving the working set (compact loop).

State is kept over the flattened (B*T) token axis so ``observe`` can be given the raw logits
of only some tokens (``rows``, flat indices): the compact loop observes just the tokens it
still runs. Tokens outside ``rows`` must already have halted; for them ``observe`` would
change nothing anyway. Nothing here reads a value back to the host: ``active`` stays on the
device and the caller decides when to look at it.
"""

from __future__ import annotations

import torch
from torch import Tensor

HALT_CONFIRMATIONS = 2  # consecutive quiet steps the second-order rule needs


def _rows(x: Tensor, rows: Tensor | None) -> Tensor:
    return x if rows is None else x[rows]


def _write(x: Tensor, rows: Tensor | None, value: Tensor) -> None:
    if rows is None:
        x.copy_(value)
    else:
        x.index_copy_(0, rows, value)


def _rows_replaced(x: Tensor, rows: Tensor | None, value: Tensor) -> Tensor:
    return value if rows is None else x.index_copy(0, rows, value)


class HaltMonitor:
    """Tracks each token's raw-logit momentum, its iteration count and whether it still runs.

    ``active`` (B, T) bool: still iterating. ``k_used`` (B, T) float: iterations done.
    ``trace`` (B, T, k_max) float: delta_k at index k-1. ``width`` is the number of raw
    logits per token (heads x slots).

    Every tensor is allocated once and updated in place, and ``observe`` takes the iteration
    number as an int or as a 0-dim device tensor, so a CUDA graph can capture it
    (``graphed.py``). ``active`` is a view: copy it to keep what it said before an ``observe``.
    """

    def __init__(
        self, batch: int, length: int, *, width: int, k_max: int, k_min: int, rule: str, tol: float,
        enabled: bool, device,
    ):
        self.k_min, self.rule, self.tol, self.enabled = k_min, rule, tol, enabled
        self.shape = (batch, length)
        n = batch * length
        self.flat_active = torch.ones(n, dtype=torch.bool, device=device)
        self._k_used = torch.zeros(n, device=device)
        self._trace = torch.full((k_max, n), float("nan"), device=device)  # one row per iteration
        self._prev_raw = torch.zeros(n, width, device=device)
        self._prev_delta = torch.zeros(n, device=device)
        self._quiet = torch.zeros(n, dtype=torch.long, device=device)

    def tensors(self) -> list[Tensor]:
        """Everything ``observe`` changes (for a graph capture to save and restore)."""
        return [self.flat_active, self._k_used, self._trace, self._prev_raw, self._prev_delta, self._quiet]

    def reset(self) -> None:
        """Back to the state before iteration 1, in place."""
        for x, value in zip(self.tensors(), (True, 0, float("nan"), 0, 0, 0)):
            x.fill_(value)

    @property
    def active(self) -> Tensor:
        return self.flat_active.view(self.shape)

    @property
    def k_used(self) -> Tensor:
        return self._k_used.view(self.shape)

    @property
    def trace(self) -> Tensor:
        return self._trace.t().reshape(*self.shape, -1)

    def running(self, rows: Tensor | None = None) -> Tensor:
        """A copy of ``active`` (rows None) or of the (1, N) rows of the tokens ``rows``."""
        return self.active.clone() if rows is None else self.flat_active[rows].unsqueeze(0)

    def observe(self, k: int | Tensor, raw: Tensor, rows: Tensor | None = None) -> None:
        """Record iteration k (1-based; an int, or a 0-dim integer tensor on the device) of the
        tokens ``rows`` (flat indices; None = all) whose raw logits are raw (..., H, S) with one
        entry per token in ``rows``; update ``active``. Reads nothing back to the host.

        No autograd inside (a ``with`` block: torch.compile cannot trace a ``torch.no_grad``
        method of a monitor made in the compiled forward, and broke the graph at each call)."""
        with torch.no_grad():
            raw = raw.detach().reshape(-1, raw.shape[-2] * raw.shape[-1]).float()
            running = _rows(self.flat_active, rows)
            _write(self._k_used, rows, torch.where(running, k, _rows(self._k_used, rows)))
            compared = k > 1  # at k = 1 there is nothing to compare with: no delta, no halt
            prev_raw = _rows(self._prev_raw, rows)
            change = (raw - prev_raw).norm(dim=-1)
            scale = torch.maximum(raw.norm(dim=-1), prev_raw.norm(dim=-1)).clamp_min(1e-6)
            delta = change / scale
            row = (k - 1).view(1) if isinstance(k, Tensor) else torch.full((1,), k - 1, device=raw.device)
            trace = self._trace.index_select(0, row)[0]
            trace = _rows_replaced(trace, rows, torch.where(running & compared, delta, _rows(trace, rows)))
            self._trace.index_copy_(0, row, trace.unsqueeze(0))
            if self.rule == "first":
                settled = delta < self.tol
            else:
                prev_delta = _rows(self._prev_delta, rows)
                quiet = ((delta - prev_delta).abs() < self.tol) & (k > 2)
                count = _rows(self._quiet, rows)
                count = torch.where(running, torch.where(quiet, count + 1, 0), count)
                _write(self._quiet, rows, count)
                settled = count >= HALT_CONFIRMATIONS
                _write(self._prev_delta, rows, torch.where(running, delta, prev_delta))
            _write(self._prev_raw, rows, torch.where(running[:, None], raw, prev_raw))
            if self.enabled:
                _write(self.flat_active, rows, running & ~(settled & compared & (k >= self.k_min)))

    @property
    def all_halted(self) -> bool:
        """Reads back to the host: a device sync, so callers ask only every few iterations."""
        return not bool(self.flat_active.any())
