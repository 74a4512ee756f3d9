"""The CWS workspace read of one iteration in one Triton kernel (``CWSConfig.read = "fused"``).

The absorbed read (``Workspace._absorbed``) runs as four PyTorch products and an elementwise
update: the query moved into slot space (q_h W_k,h, a (H, d) tensor per token written to
memory), its scores against the token's own S slots, cum and the weights, the weighted sum of
the slots (another (H, d) per token) and W_v. The per-token products are tiny (8 heads by 6
slots at d 512) and memory-bound, and cuBLAS runs them far below the copy bandwidth
(BENCHMARKS.md: about a third of a compiled iteration's GPU time). This kernel does all of it
for a block of tokens and one head per loop step, keeping the slot-space query and the
weighted sum in registers::

    raw[n, h, s] = (q[n, h] @ W_k[h]) . slots[n, s] * scale         (pass 1 over d)
    cum'         = decay * cum + (1 - decay) + raw
    w            = log1p(silu(cum')) * inv_ln_base
    read[n, h]   = (sum_s w[n, h, s] slots[n, s]) @ W_v[h]^T          (pass 2 over d)

Forward only: iterations with gradient use the PyTorch read. ``fused_read`` is the entry
point; ``absorbed_read_reference`` is the same computation in PyTorch, for tests. With
``TRITON_INTERPRET=1`` set before this module is imported, Triton runs the kernel on CPU.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the optional extra (pip install parallax[gpu]) is not installed
    triton = None

BLOCK_TOKENS = 16  # tokens per program: the smallest M of tl.dot


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter, for tests


def usable(x: Tensor) -> bool:
    """Whether the kernel can run on ``x``'s device: Triton is installed, and the tensors are
    on CUDA (or Triton interprets on CPU)."""
    return triton is not None and (x.is_cuda or INTERPRETED)


def block_d(slots_p2: int, dtype: torch.dtype) -> int:
    """The model-dimension chunk of both passes: the (tokens, slots, chunk) fp32 tile of the
    slots must fit in registers (sm_90, compiled offline: 8 heads of 64, 6 slots in bf16 use 254
    registers and no stack at 32; 12 slots, or fp32 inputs, need 16)."""
    return 32 if slots_p2 <= 8 and dtype != torch.float32 else 16


def absorbed_read_reference(
    q: Tensor, slots: Tensor, cum: Tensor, w_k: Tensor, w_v: Tensor, decay: float, base: float
) -> tuple[Tensor, Tensor, Tensor]:
    """q (N, H, dh), slots (N, S, d), cum (N, H, S), w_k and w_v (H, dh, d): (raw, cum', read
    (N, H, dh)), as ``Workspace._absorbed`` and ``Workspace.step`` compute them."""
    q_in_slot_space = torch.einsum("nhe,hed->nhd", q, w_k)
    raw = torch.einsum("nhd,nsd->nhs", q_in_slot_space, slots) / math.sqrt(q.shape[-1])
    cum = decay * cum + (1.0 - decay) + raw
    weights = torch.log1p(F.silu(cum)) / math.log(base)
    read = torch.einsum("nhd,hed->nhe", torch.einsum("nhs,nsd->nhd", weights.to(slots.dtype), slots), w_v)
    return raw, cum, read


def fused_read(
    q: Tensor, slots: Tensor, cum: Tensor, w_k: Tensor, w_v: Tensor, decay: float, base: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``absorbed_read_reference`` in one kernel launch. raw and cum' come out in cum's dtype,
    read in q's; the weights are cast to q's dtype, as autocast would for the products."""
    n, heads, head_dim = q.shape
    n_slots, dim = slots.shape[1:]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"the fused read needs a power-of-two head dimension of at least 16, got {head_dim}")
    q, slots, cum = q.contiguous(), slots.contiguous(), cum.contiguous()
    w_k, w_v = w_k.to(q.dtype).contiguous(), w_v.to(q.dtype).contiguous()
    raw = torch.empty_like(cum)
    new_cum = torch.empty_like(cum)
    read = torch.empty_like(q)
    grid = (triton.cdiv(n, BLOCK_TOKENS),)
    slots_p2 = triton.next_power_of_2(n_slots)
    _read_kernel[grid](
        q, slots, cum, w_k, w_v, raw, new_cum, read,
        n, dim, DECAY=decay, SCALE=1.0 / math.sqrt(head_dim), INV_LN_BASE=1.0 / math.log(base),
        HEADS=heads, HEAD_DIM=head_dim, SLOTS=n_slots, SLOTS_P2=slots_p2,
        BLOCK_N=BLOCK_TOKENS, BLOCK_D=block_d(slots_p2, q.dtype),
        PRECISION="ieee" if q.dtype == torch.float32 else None,
    )
    return raw, new_cum, read


if triton is not None:

    @triton.jit
    def _read_kernel(
        q_ptr, slots_ptr, cum_ptr, wk_ptr, wv_ptr, raw_ptr, new_cum_ptr, read_ptr,
        n_tokens, dim,
        DECAY: tl.constexpr, SCALE: tl.constexpr, INV_LN_BASE: tl.constexpr,  # constants of the config (a
        # float argument would arrive as fp64 under torch.compile and pull the epilogue into fp64)
        HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr, SLOTS_P2: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # PRECISION: fp32 inputs multiply in full fp32 ("ieee"), as torch's matmul does unless
        # TF32 is allowed; None (the default) for bf16 and fp16 inputs
        tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # (BN,), 64-bit offsets
        token_ok = tokens < n_tokens
        s = tl.arange(0, SLOTS_P2)
        s_ok = s < SLOTS
        e = tl.arange(0, HEAD_DIM)
        dd = tl.arange(0, BLOCK_D)
        # slots[n, s, d] at (n * SLOTS + s) * dim + d
        slot_rows = (tokens[:, None] * SLOTS + s[None, :]) * dim  # (BN, S)
        slot_ok = token_ok[:, None] & s_ok[None, :]
        for h in range(HEADS):
            q = tl.load(q_ptr + (tokens[:, None] * HEADS + h) * HEAD_DIM + e[None, :],
                        mask=token_ok[:, None], other=0.0)  # (BN, dh)
            scores = tl.zeros((BLOCK_N, SLOTS_P2), dtype=tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                d = d0 + dd
                d_ok = d < dim
                w_k = tl.load(wk_ptr + (h * HEAD_DIM + e[:, None]) * dim + d[None, :],
                              mask=d_ok[None, :], other=0.0)  # (dh, BD)
                q_slot = tl.dot(q, w_k, input_precision=PRECISION)  # (BN, BD), fp32
                sl = tl.load(slots_ptr + slot_rows[:, :, None] + d[None, None, :],
                             mask=slot_ok[:, :, None] & d_ok[None, None, :], other=0.0)  # (BN, S, BD)
                scores += tl.sum(q_slot[:, None, :] * sl.to(tl.float32), axis=2)
            raw = scores * SCALE
            hs = (tokens[:, None] * HEADS + h) * SLOTS + s[None, :]  # (BN, S) into (N, H, S)
            cum = tl.load(cum_ptr + hs, mask=slot_ok, other=0.0).to(tl.float32)
            cum = DECAY * cum + (1.0 - DECAY) + raw
            silu = cum / (1.0 + tl.exp(-cum))
            weights = tl.where(slot_ok, tl.log(1.0 + silu) * INV_LN_BASE, 0.0)
            tl.store(raw_ptr + hs, raw.to(raw_ptr.dtype.element_ty), mask=slot_ok)
            tl.store(new_cum_ptr + hs, cum.to(new_cum_ptr.dtype.element_ty), mask=slot_ok)
            weights = weights.to(q_ptr.dtype.element_ty).to(tl.float32)  # as autocast casts them
            read = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                d = d0 + dd
                d_ok = d < dim
                sl = tl.load(slots_ptr + slot_rows[:, :, None] + d[None, None, :],
                             mask=slot_ok[:, :, None] & d_ok[None, None, :], other=0.0)
                mixed = tl.sum(weights[:, :, None] * sl.to(tl.float32), axis=1)  # (BN, BD)
                w_v = tl.load(wv_ptr + (h * HEAD_DIM + e[None, :]) * dim + d[:, None],
                              mask=d_ok[:, None], other=0.0)  # (BD, dh): W_v[h] transposed
                read += tl.dot(mixed.to(w_v.dtype), w_v, input_precision=PRECISION)
            tl.store(read_ptr + (tokens[:, None] * HEADS + h) * HEAD_DIM + e[None, :],
                     read.to(read_ptr.dtype.element_ty), mask=token_ok[:, None])
