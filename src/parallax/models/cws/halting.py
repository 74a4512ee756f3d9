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

A token halts only within [k_min, k_max]; halted tokens are frozen by the caller with
``active`` as a mask, so every tensor keeps its shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

HALT_CONFIRMATIONS = 2  # consecutive quiet steps the second-order rule needs


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
        self.active = torch.ones(batch, length, dtype=torch.bool, device=device)
        self.k_used = torch.zeros(batch, length, device=device)
        self.trace = torch.full((batch, length, k_max), float("nan"), device=device)
        self._prev_raw: Tensor | None = None
        self._prev_delta: Tensor | None = None
        self._quiet = torch.zeros(batch, length, dtype=torch.long, device=device)

    @torch.no_grad()
    def observe(self, k: int, raw: Tensor) -> None:
        """Record iteration k (1-based) whose raw logits are raw (B, T, H, S); update ``active``."""
        running = self.active
        raw = raw.detach().flatten(2).float()
        self.k_used = torch.where(running, float(k), self.k_used)
        if self._prev_raw is None:
            self._prev_raw = raw
            return
        change = (raw - self._prev_raw).norm(dim=-1)
        scale = torch.maximum(raw.norm(dim=-1), self._prev_raw.norm(dim=-1)).clamp_min(1e-6)
        delta = change / scale
        self.trace[:, :, k - 1] = torch.where(running, delta, self.trace[:, :, k - 1])
        if self.rule == "first":
            settled = delta < self.tol
        else:
            quiet = (
                (delta - self._prev_delta).abs() < self.tol
                if self._prev_delta is not None
                else torch.zeros_like(running)
            )
            self._quiet = torch.where(running, torch.where(quiet, self._quiet + 1, 0), self._quiet)
            settled = self._quiet >= HALT_CONFIRMATIONS
        self._prev_raw = torch.where(running[..., None], raw, self._prev_raw)
        if self._prev_delta is not None:
            delta = torch.where(running, delta, self._prev_delta)
        self._prev_delta = delta
        if self.enabled and k >= self.k_min:
            self.active = running & ~settled

    @property
    def all_halted(self) -> bool:
        return not bool(self.active.any())
