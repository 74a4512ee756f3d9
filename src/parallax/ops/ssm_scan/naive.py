"""Sequential reference of the selective scan: one token at a time, exactly the recurrence.

For every channel ``d`` and state index ``n``::

    s_t = exp(delta_t[d] * A[d, n]) * s_{t-1} + delta_t[d] * B_t[n] * u_t[d]
    y_t[d] = sum_n C_t[n] * s_t[d, n] + D[d] * u_t[d]

Shapes: ``u``, ``delta`` (B, T, D); ``A`` (D, N); ``B``, ``C`` (B, T, N); ``D`` (D,) or None;
``state`` (B, D, N) or None (zeros). Returns ``y`` (B, T, D) and the final state (B, D, N).
"""

from __future__ import annotations

import torch
from torch import Tensor


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    batch, length, channels = u.shape
    if state is None:
        state = u.new_zeros(batch, channels, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, t, :, None] * A)  # (B, D, N)
        drive = (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]  # (B, D, N)
        state = decay * state + drive
        ys.append(torch.einsum("bdn,bn->bd", state, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(batch, 0, channels)
    if D is not None:
        y = y + D * u
    return y, state
