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


class HaltMonitor:
    """Tracks each token's raw-logit momentum, its iteration count and whether it still runs.

    ``active`` (B, T) bool: still iterating. ``k_used`` (B, T) float: iterations done.
    ``trace`` (B, T, k_max) float: delta_k at index k-1.
    """

    def __init__(
        self, batch: int, length: int, *, k_max: int, k_min: int, rule: str, tol: float,
        enabled: bool, device,
    ):
        self.k_min, self.rule, self.tol, self.enabled = k_min, rule, tol, enabled
        self.shape = (batch, length)
        n = batch * length
        self.flat_active = torch.ones(n, dtype=torch.bool, device=device)  # replaced, never mutated
        self._k_used = torch.zeros(n, device=device)
        self._trace = torch.full((k_max, n), float("nan"), device=device)  # one row per iteration
        self._prev_raw: Tensor | None = None
        self._prev_delta = torch.zeros(n, device=device)
        self._quiet = torch.zeros(n, dtype=torch.long, device=device)

    @property
    def active(self) -> Tensor:
        return self.flat_active.view(self.shape)

    @property
    def k_used(self) -> Tensor:
        return self._k_used.view(self.shape)

    @property
    def trace(self) -> Tensor:
        return self._trace.t().reshape(*self.shape, -1)

    @torch.no_grad()
    def observe(self, k: int, raw: Tensor, rows: Tensor | None = None) -> None:
        """Record iteration k (1-based) of the tokens ``rows`` (flat indices; None = all) whose
        raw logits are raw (..., H, S) with one entry per token in ``rows``; update ``active``."""
        raw = raw.detach().reshape(-1, raw.shape[-2] * raw.shape[-1]).float()
        running = _rows(self.flat_active, rows)
        _write(self._k_used, rows, torch.where(running, float(k), _rows(self._k_used, rows)))
        if self._prev_raw is None:  # k = 1: every token runs, nothing to compare with yet
            self._prev_raw = raw.new_zeros(self.flat_active.shape[0], raw.shape[1])
            _write(self._prev_raw, rows, raw)
            return
        prev_raw = _rows(self._prev_raw, rows)
        change = (raw - prev_raw).norm(dim=-1)
        scale = torch.maximum(raw.norm(dim=-1), prev_raw.norm(dim=-1)).clamp_min(1e-6)
        delta = change / scale
        _write(self._trace[k - 1], rows, torch.where(running, delta, _rows(self._trace[k - 1], rows)))
        if self.rule == "first":
            settled = delta < self.tol
        else:
            prev_delta = _rows(self._prev_delta, rows)
            quiet = (delta - prev_delta).abs() < self.tol if k > 2 else torch.zeros_like(running)
            count = _rows(self._quiet, rows)
            count = torch.where(running, torch.where(quiet, count + 1, 0), count)
            _write(self._quiet, rows, count)
            settled = count >= HALT_CONFIRMATIONS
            _write(self._prev_delta, rows, torch.where(running, delta, prev_delta))
        _write(self._prev_raw, rows, torch.where(running[:, None], raw, prev_raw))
        if self.enabled and k >= self.k_min:
            still = running & ~settled
            self.flat_active = still if rows is None else self.flat_active.index_copy(0, rows, still)

    @property
    def all_halted(self) -> bool:
        """Reads back to the host: a device sync, so callers ask only every few iterations."""
        return not bool(self.flat_active.any())
