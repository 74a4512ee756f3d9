"""Chunked selective scan: parallel inside chunks of ``chunk_size`` tokens, sequential across.

Inside a chunk the recurrence unrolls to a masked sum over earlier positions::

    s_l = exp(S_l) * s_0 + sum_{m <= l} exp(S_l - S_m) * delta_m * B_m * u_m,
    S_l = sum_{j <= l} delta_j * A          (cumulative log-decay, <= 0)

Every exponent is ``S_l - S_m <= 0`` for the kept terms, so nothing overflows however fast
a channel decays. The chunk-to-chunk carry is a short Python loop over ``T / chunk_size``
chunks. Memory is (B, T, D, N, chunk_size) inside the kernel, traded for a loop that is
``chunk_size`` times shorter than the sequential reference.

Shapes as in ``naive.selective_scan_ref``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    state: Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor]:
    batch, length, channels = u.shape
    n_state = A.shape[1]
    if state is None:
        state = u.new_zeros(batch, channels, n_state)
    if length == 0:
        return u.new_zeros(batch, 0, channels), state
    size = min(chunk_size, length)
    pad = (-length) % size
    # padded positions have delta = 0: no decay and no drive, so they leave the state as is
    du, dl, pb, pc = (F.pad(x, (0, 0, 0, pad)) for x in (u, delta, B, C))
    n_chunks = (length + pad) // size
    log_decay = (dl[..., None] * A).view(batch, n_chunks, size, channels, n_state)
    drive = ((dl * du)[..., None] * pb[:, :, None, :]).view(batch, n_chunks, size, channels, n_state)
    cum = log_decay.cumsum(dim=2)  # (B, c, L, D, N)
    causal = torch.ones(size, size, dtype=torch.bool, device=u.device).tril()  # [l, m]: m <= l
    segment = cum[:, :, :, None] - cum[:, :, None, :]  # (B, c, L_l, L_m, D, N)
    segment = segment.masked_fill(~causal[:, :, None, None], float("-inf"))
    within = torch.einsum("bclmdn,bcmdn->bcldn", segment.exp(), drive)  # zero initial state
    entry_decay = cum.exp()  # (B, c, L, D, N): decay from the chunk start to position l
    starts = []
    for c in range(n_chunks):
        starts.append(state)
        state = entry_decay[:, c, -1] * state + within[:, c, -1]
    carried = entry_decay * torch.stack(starts, dim=1)[:, :, None]
    states = within + carried  # (B, c, L, D, N)
    pc = pc.view(batch, n_chunks, size, n_state)
    y = torch.einsum("bcldn,bcln->bcld", states, pc).reshape(batch, n_chunks * size, channels)
    y = y[:, :length]
    if D is not None:
        y = y + D * u
    return y, state
