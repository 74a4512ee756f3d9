"""The per-token half of a CWS workspace read in one Triton kernel (``CWSConfig.read = "fused"``).

The absorbed read (``Workspace._absorbed``) is two dense products with the weights, which
cuBLAS runs well, around two per-token products with the token's own S slots, which it does not:
8 heads by 6 slots at d 512 are a (8, 512) x (512, 6) and a (8, 6) x (6, 512) product per token,
memory-bound, and run as batched matmuls at about a third of the copy bandwidth (BENCHMARKS.md).
This kernel does the per-token part and the cum / weights update between in one pass over memory,
one token per program, all heads at once::

    q_slot       = q @ W_k                        (per head, cuBLAS; (N, H, d))
    raw[n, h, s] = q_slot[n, h] . slots[n, s] * scale      \
    cum'         = decay * cum + (1 - decay) + raw          |  this kernel: reads q_slot once
    w            = log1p(silu(cum')) * inv_ln_base          |  and the slots twice (once per
    mixed[n, h]  = sum_s w[n, h, s] slots[n, s]            /   pass), writes raw, cum' and
                                                               mixed
    read         = mixed @ W_v^T                  (per head, cuBLAS; (N, H, dh))

``fused_projected_read`` (``CWSConfig.read = "fused_projected"``) does the same in head space, the
pseudo-code's way: the slots' keys and values by one cuBLAS product, (N, S, d) x (d, 2 d), then one
kernel, one token per program, for the per-head scores, the update and the weighted sum of the
values. Its product costs 4 S d^2 FLOPs per token where the absorbed read's two with W_k and W_v
cost 4 d^2, but it writes and reads the (N, S, 2 d) keys and values instead of two (N, H, d)
tensors: fewer bytes where S < H.
Keys and values of slots that do not change between iterations (the workspace's token-clocked
ones) are computed once (``slot_keys_values``) and read in place.

Forward only: iterations with gradient use the PyTorch read. ``fused_read`` and
``fused_projected_read`` are the entry points; ``absorbed_read_reference`` and
``projected_read_reference`` are the same computations in PyTorch, for tests. With
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

# launch shape, from benchmarks/fused_read.py on an H200 (d 512, 8 heads, 6 slots, bf16): one
# warp per token and wide chunks of the model dimension run fastest (more warps per token only
# add cross-warp reductions of a tile this small); tuned at that shape only
BLOCK_D = 512
NUM_WARPS = 1
# the projected read's kernel: one warp per 4096 elements of a token's (S, H, dh) keys, so one at
# that shape (73 us per call against 126-143 with 2-8 warps); more for larger tiles, untuned. A
# program holds a token's whole tile, so past 8 warps' worth (32768 elements, e.g. d 4096 with more
# than 8 slots) each thread holds more than at the tuned shape; only d 512 has been timed
PROJECTED_ELEMENTS_PER_WARP = 4096

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter, for tests


def usable(x: Tensor) -> bool:
    """Whether the kernel can run on ``x``'s device: Triton is installed, and the tensors are
    on CUDA (or Triton interprets on CPU)."""
    return triton is not None and (x.is_cuda or INTERPRETED)


def absorbed_read_reference(
    q: Tensor, slots: Tensor, cum: Tensor, w_k: Tensor, w_v: Tensor, decay: float, base: float,
    fixed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """q (N, H, dh), slots (N, S, d), cum (N, H, S), w_k and w_v (H, dh, d): (raw, cum', read
    (N, H, dh)), as ``Workspace._absorbed`` and ``Workspace.step`` compute them. ``fixed``
    (N, S_f, d), if given, are slots before ``slots`` (then cum is (N, H, S_f + S))."""
    if fixed is not None:
        slots = torch.cat([fixed, slots], dim=1)
    q_in_slot_space = torch.einsum("nhe,hed->nhd", q, w_k)
    raw = torch.einsum("nhd,nsd->nhs", q_in_slot_space, slots) / math.sqrt(q.shape[-1])
    cum = decay * cum + (1.0 - decay) + raw
    weights = torch.log1p(F.silu(cum)) / math.log(base)
    read = torch.einsum("nhd,hed->nhe", torch.einsum("nhs,nsd->nhd", weights.to(slots.dtype), slots), w_v)
    return raw, cum, read


def fused_read(
    q: Tensor, slots: Tensor, cum: Tensor, w_k: Tensor, w_v: Tensor, decay: float, base: float,
    fixed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``absorbed_read_reference`` as two weight products and one kernel launch between them.
    The kernel reads ``fixed`` and ``slots`` where they are (the workspace's token-clocked
    slots, normalised once per forward, and the h-clocked ones of this iteration), so they
    are never copied into one tensor.
    cum' comes out in cum's dtype, raw and read in the products' (q's, or autocast's), and the
    weights are cast to it, as the absorbed read's products give and take them under autocast.
    (raw is computed in fp32 and rounded to that dtype, once, after scaling, because the
    halting monitor compares it against a tolerance: kept in fp32, bf16 runs settled 1-2% fewer
    tokens at the fp32 run's K than the absorbed read's did; BENCHMARKS.md.)"""
    torch._check(
        q.dim() == 3 and tuple(q.shape[1:]) == tuple(w_k.shape[:2]),
        lambda: f"fused read: q {tuple(q.shape)} must be (N, H, dh) for W_k (H, dh, d) {tuple(w_k.shape)}",
    )
    head_dim = q.shape[-1]
    # q_slot comes out of the per-head product head-major; the kernel reads it in that layout
    q_slot = torch.einsum("nhe,hed->nhd", q, w_k.to(q.dtype))
    raw, new_cum, mixed = token_read(
        q_slot, fixed, slots, cum, decay, 1.0 / math.sqrt(head_dim), 1.0 / math.log(base)
    )
    read = torch.einsum("nhd,hed->nhe", mixed, w_v.to(q.dtype))
    return raw, new_cum, read


def projected_read_reference(
    q: Tensor, slots: Tensor, cum: Tensor, w_k: Tensor, w_v: Tensor, decay: float, base: float,
    fixed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``absorbed_read_reference``'s inputs and outputs, computed as the pseudo-code writes it
    (``Workspace._projected``): the keys and values of every slot, then per-head scores and sum."""
    if fixed is not None:
        slots = torch.cat([fixed, slots], dim=1)
    heads, head_dim, _ = w_k.shape
    k = (slots @ w_k.flatten(0, 1).T.to(slots.dtype)).unflatten(-1, (heads, head_dim))  # (N, S, H, dh)
    v = (slots @ w_v.flatten(0, 1).T.to(slots.dtype)).unflatten(-1, (heads, head_dim))
    raw = torch.einsum("nhe,nshe->nhs", q, k) / math.sqrt(head_dim)
    cum = decay * cum + (1.0 - decay) + raw
    weights = torch.log1p(F.silu(cum)) / math.log(base)
    return raw, cum, torch.einsum("nhs,nshe->nhe", weights.to(v.dtype), v)


def slot_keys_values(slots: Tensor, w_kv: Tensor) -> Tensor:
    """The keys and values of slots (..., S, d) as one product: (..., S, 2 d), each row [K | V],
    for ``w_kv`` (2 d, d) = W_k stacked on W_v (the layout ``fused_projected_read`` reads)."""
    return F.linear(slots, w_kv)


def fused_projected_read(
    q: Tensor, slots: Tensor | None, cum: Tensor, w_kv: Tensor, decay: float, base: float,
    fixed_kv: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``projected_read_reference`` as one product (the keys and values of ``slots``) and one
    kernel launch. ``fixed_kv`` (N, S_f, 2 d), if given, are the keys and values of slots before
    ``slots``, computed beforehand (``slot_keys_values``): the workspace's token-clocked slots,
    whose keys and values do not change from one iteration to the next.
    ``slots`` None: the ``fixed_kv`` are every slot's. Dtypes as ``fused_read``'s: cum' in
    cum's, raw and read in q's."""
    torch._check(
        q.dim() == 3 and 2 * q.shape[1] * q.shape[2] == w_kv.shape[0],
        lambda: f"projected read: q {tuple(q.shape)} must be (N, H, dh) for W_k stacked on W_v (2 H dh, d) "
        f"{tuple(w_kv.shape)}",
    )
    head_dim = q.shape[-1]
    if slots is None:
        kv, fixed_kv = fixed_kv, None
    else:
        kv = slot_keys_values(slots.to(q.dtype), w_kv.to(q.dtype))  # the product in q's dtype, as autocast's
    return projected_token_read(q, fixed_kv, kv, cum, decay, 1.0 / math.sqrt(head_dim), 1.0 / math.log(base))


def _projected_token_read_outputs(
    q: Tensor, fixed_kv: Tensor | None, kv: Tensor, cum: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Empty (raw, cum', read) for the projected token read, once the shapes are checked."""
    raw, new_cum = _checked_score_outputs(
        "projected read", ("q", q), ("fixed_kv", fixed_kv), ("kv", kv), cum, 2 * q.shape[1] * q.shape[2],
        "(N, H, dh), (N, S_f, 2 H dh) or None, (N, S, 2 H dh)",
    )
    return raw, new_cum, torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _token_read_outputs(
    q_slot: Tensor, fixed: Tensor | None, slots: Tensor, cum: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Empty (raw, cum', mixed) for the token read, once the shapes are checked: raw in q_slot's
    dtype, cum' in cum's, mixed head-major (for the per-head product that reads it)."""
    raw, new_cum = _checked_score_outputs(
        "fused read", ("q_slot", q_slot), ("fixed", fixed), ("slots", slots), cum, q_slot.shape[2],
        "(N, H, d), (N, S_f, d) or None, (N, S, d)",
    )
    n, heads, dim = q_slot.shape
    mixed = torch.empty(heads, n, dim, dtype=q_slot.dtype, device=q_slot.device).transpose(0, 1)
    return raw, new_cum, mixed


def _checked_score_outputs(read: str, query, fixed, slots, cum: Tensor, width: int, shapes: str) -> tuple[Tensor, Tensor]:
    """Empty raw (in the query's dtype) and cum' (in cum's), (N, H, S_f + S), once the named
    ``query`` (N, H, ...), ``fixed`` (N, S_f, width) or None and ``slots`` (N, S, width) are checked
    against cum: a one-line error naming every shape, not an out-of-bounds read."""
    (q_name, q), (f_name, f), (s_name, sl) = query, fixed, slots
    n, heads = q.shape[:2]
    n_fixed = 0 if f is None else f.shape[1]
    torch._check(
        sl.dim() == 3 and sl.shape[0] == n and sl.shape[2] == width
        and (f is None or (f.dim() == 3 and f.shape[0] == n and f.shape[2] == width))
        and tuple(cum.shape) == (n, heads, n_fixed + sl.shape[1]),
        lambda: f"{read}: {q_name} {tuple(q.shape)}, {f_name} {None if f is None else tuple(f.shape)}, "
        f"{s_name} {tuple(sl.shape)} and cum {tuple(cum.shape)} must be {shapes} and (N, H, S_f + S)",
    )
    return torch.empty(cum.shape, dtype=q.dtype, device=cum.device), torch.empty(cum.shape, dtype=cum.dtype, device=cum.device)


if triton is not None:

    @triton.jit
    def _token_slots(fixed_ptr, slots_ptr, token, s, d, s_ok, d_ok, FIXED: tl.constexpr, SLOTS: tl.constexpr,
                     DIM: tl.constexpr):
        """The token's slots s at columns d, fp32: s < FIXED from fixed (N, FIXED, d), the rest
        from slots (N, SLOTS - FIXED, d)."""
        own = s - FIXED
        rows = (token * (SLOTS - FIXED) + own) * DIM
        sl = tl.load(slots_ptr + rows[:, None] + d[None, :], mask=(s_ok & (own >= 0))[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        if FIXED > 0:
            fixed_rows = (token * FIXED + s) * DIM
            sl += tl.load(fixed_ptr + fixed_rows[:, None] + d[None, :], mask=(s < FIXED)[:, None] & d_ok[None, :],
                          other=0.0).to(tl.float32)
        return sl

    @triton.jit
    def _update(raw, cum_ptr, raw_ptr, new_cum_ptr, out_ptr, at, ok, DECAY: tl.constexpr, INV_LN_BASE: tl.constexpr):
        """The workspace's update over one token's (heads, slots) tile of raw scores (fp32), at
        offsets ``at`` into the (N, H, S) tensors: stores raw and cum' = decay cum + (1 - decay) +
        raw, and returns the weights log1p(silu(cum')) / ln(base), zero where not ``ok``, rounded
        to ``out_ptr``'s dtype (the weighted sum's, as autocast casts them) and back to fp32."""
        cum = tl.load(cum_ptr + at, mask=ok, other=0.0).to(tl.float32)
        cum = DECAY * cum + (1.0 - DECAY) + raw
        silu = cum / (1.0 + tl.exp(-cum))
        weights = tl.where(ok, tl.log(1.0 + silu) * INV_LN_BASE, 0.0)
        tl.store(raw_ptr + at, raw.to(raw_ptr.dtype.element_ty), mask=ok)
        tl.store(new_cum_ptr + at, cum.to(new_cum_ptr.dtype.element_ty), mask=ok)
        return weights.to(out_ptr.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _token_read_kernel(
        q_slot_ptr, fixed_ptr, slots_ptr, cum_ptr, raw_ptr, new_cum_ptr, mixed_ptr,
        q_token_stride, q_head_stride, mixed_token_stride, mixed_head_stride,  # (N, H, d), d contiguous
        DECAY: tl.constexpr, SCALE: tl.constexpr, INV_LN_BASE: tl.constexpr,  # of the config: folded in,
        # one build per configuration
        HEADS: tl.constexpr, HEADS_P2: tl.constexpr, FIXED: tl.constexpr, SLOTS: tl.constexpr,
        SLOTS_P2: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # SLOTS: all, FIXED ones included
    ):
        token = tl.program_id(0).to(tl.int64)  # 64-bit offsets
        h = tl.arange(0, HEADS_P2)
        s = tl.arange(0, SLOTS_P2)
        dd = tl.arange(0, BLOCK_D)
        h_ok = h < HEADS
        s_ok = s < SLOTS
        q_rows = token * q_token_stride + h.to(tl.int64) * q_head_stride
        mixed_rows = token * mixed_token_stride + h.to(tl.int64) * mixed_head_stride
        scores = tl.zeros((HEADS_P2, SLOTS_P2), dtype=tl.float32)
        for d0 in range(0, DIM, BLOCK_D):
            d = d0 + dd
            d_ok = d < DIM
            qs = tl.load(q_slot_ptr + q_rows[:, None] + d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
            sl = _token_slots(fixed_ptr, slots_ptr, token, s, d, s_ok, d_ok, FIXED, SLOTS, DIM)
            scores += tl.sum(qs.to(tl.float32)[:, None, :] * sl[None, :, :], axis=2)
        hs_ok = h_ok[:, None] & s_ok[None, :]
        hs = (token * HEADS + h[:, None]) * SLOTS + s[None, :]  # (H, S) into (N, H, S)
        weights = _update(scores * SCALE, cum_ptr, raw_ptr, new_cum_ptr, mixed_ptr, hs, hs_ok, DECAY, INV_LN_BASE)
        for d0 in range(0, DIM, BLOCK_D):
            d = d0 + dd
            d_ok = d < DIM
            sl = _token_slots(fixed_ptr, slots_ptr, token, s, d, s_ok, d_ok, FIXED, SLOTS, DIM)
            mixed = tl.sum(weights[:, :, None] * sl[None, :, :], axis=1)  # (H, BD)
            tl.store(mixed_ptr + mixed_rows[:, None] + d[None, :], mixed.to(mixed_ptr.dtype.element_ty),
                     mask=h_ok[:, None] & d_ok[None, :])

    # An opaque custom op rather than a kernel torch.compile traces into: traced, the kernel's
    # writes into its outputs were functionalised into copies, about one copy of an empty
    # (N, H, d) buffer per iteration (4.5% of the compiled training step; BENCHMARKS.md)

    @torch.library.custom_op("parallax::fused_read_tokens", mutates_args=())
    def token_read(
        q_slot: Tensor, fixed: Tensor | None, slots: Tensor, cum: Tensor, decay: float, scale: float,
        inv_ln_base: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The kernel's part: (raw, cum', mixed (N, H, d)) from q_slot (N, H, d), the slots
        fixed (N, S_f, d) or None and slots (N, S, d), and cum (N, H, S_f + S)."""
        raw, new_cum, mixed = _token_read_outputs(q_slot, fixed, slots, cum)
        n, heads, dim = q_slot.shape
        n_slots = cum.shape[2]  # all of them, the ``fixed`` ones first
        if q_slot.stride(-1) != 1:
            q_slot = q_slot.contiguous()
        slots, cum = slots.contiguous(), cum.contiguous()
        fixed = slots if fixed is None else fixed.contiguous()  # not read when there are none
        if n:  # no tokens (an emptied working set): no launch, as a grid of zero programs is an error
            _token_read_kernel[(n,)](
                q_slot, fixed, slots, cum, raw, new_cum, mixed, *q_slot.stride()[:2], *mixed.stride()[:2],
                DECAY=decay, SCALE=scale, INV_LN_BASE=inv_ln_base,
                HEADS=heads, HEADS_P2=triton.next_power_of_2(heads), FIXED=n_slots - slots.shape[1], SLOTS=n_slots,
                SLOTS_P2=triton.next_power_of_2(n_slots), DIM=dim, BLOCK_D=min(BLOCK_D, triton.next_power_of_2(dim)),
                num_warps=NUM_WARPS,
            )
        return raw, new_cum, mixed

    @token_read.register_fake
    def _(q_slot, fixed, slots, cum, decay, scale, inv_ln_base):
        return _token_read_outputs(q_slot, fixed, slots, cum)

    @triton.jit
    def _token_kv(fixed_ptr, kv_ptr, token, s, h, e, s_ok, he_ok, FIXED: tl.constexpr, SLOTS: tl.constexpr,
                  DIM: tl.constexpr, HEAD_DIM: tl.constexpr):
        """The token's keys and values (SLOTS_P2, HEADS_P2, HEAD_DIM_P2) each, fp32: slots s < FIXED
        from fixed_kv (N, FIXED, 2 d), the rest from kv (N, SLOTS - FIXED, 2 d); a row is [K | V]."""
        own = s - FIXED
        cols = (h[:, None] * HEAD_DIM + e[None, :])[None, :, :]
        rows = ((token * (SLOTS - FIXED) + own) * 2 * DIM)[:, None, None]
        mask = ((s_ok & (own >= 0))[:, None, None]) & he_ok[None, :, :]
        k = tl.load(kv_ptr + rows + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(kv_ptr + rows + DIM + cols, mask=mask, other=0.0).to(tl.float32)
        if FIXED > 0:
            fixed_rows = ((token * FIXED + s) * 2 * DIM)[:, None, None]
            fixed_mask = (s < FIXED)[:, None, None] & he_ok[None, :, :]
            k += tl.load(fixed_ptr + fixed_rows + cols, mask=fixed_mask, other=0.0).to(tl.float32)
            v += tl.load(fixed_ptr + fixed_rows + DIM + cols, mask=fixed_mask, other=0.0).to(tl.float32)
        return k, v

    @triton.jit
    def _projected_token_read_kernel(
        q_ptr, fixed_ptr, kv_ptr, cum_ptr, raw_ptr, new_cum_ptr, read_ptr,  # q and read (N, H, dh), (H, dh) packed
        q_token_stride,  # read contiguous; q may be columns of a wider product's rows
        DECAY: tl.constexpr, SCALE: tl.constexpr, INV_LN_BASE: tl.constexpr,
        HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
        FIXED: tl.constexpr, SLOTS: tl.constexpr, SLOTS_P2: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)  # 64-bit offsets
        DIM: tl.constexpr = HEADS * HEAD_DIM
        s = tl.arange(0, SLOTS_P2)
        h = tl.arange(0, HEADS_P2)
        e = tl.arange(0, HEAD_DIM_P2)
        s_ok = s < SLOTS
        he_ok = (h < HEADS)[:, None] & (e < HEAD_DIM)[None, :]
        head_cols = h[:, None] * HEAD_DIM + e[None, :]
        he = token * DIM + head_cols  # (H, dh) into (N, H, dh)
        q = tl.load(q_ptr + token * q_token_stride + head_cols, mask=he_ok, other=0.0).to(tl.float32)
        k, v = _token_kv(fixed_ptr, kv_ptr, token, s, h, e, s_ok, he_ok, FIXED, SLOTS, DIM, HEAD_DIM)
        raw = tl.sum(q[None, :, :] * k, axis=2) * SCALE  # (S, H)
        sh_ok = s_ok[:, None] & (h < HEADS)[None, :]
        sh = (token * HEADS + h[None, :]) * SLOTS + s[:, None]  # (S, H) into (N, H, S)
        weights = _update(raw, cum_ptr, raw_ptr, new_cum_ptr, read_ptr, sh, sh_ok, DECAY, INV_LN_BASE)
        read = tl.sum(weights[:, :, None] * v, axis=0)  # (H, dh)
        tl.store(read_ptr + he, read.to(read_ptr.dtype.element_ty), mask=he_ok)

    @torch.library.custom_op("parallax::projected_read_tokens", mutates_args=())
    def projected_token_read(
        q: Tensor, fixed_kv: Tensor | None, kv: Tensor, cum: Tensor, decay: float, scale: float, inv_ln_base: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The projected read's per-token part: (raw, cum', read (N, H, dh)) from q (N, H, dh), the
        slots' keys and values fixed_kv (N, S_f, 2 d) or None and kv (N, S, 2 d), and cum (N, H, S_f + S)."""
        raw, new_cum, read = _projected_token_read_outputs(q, fixed_kv, kv, cum)
        n, heads, head_dim = q.shape
        n_slots = cum.shape[2]
        if q.stride(2) != 1 or q.stride(1) != head_dim:  # a token's heads not packed
            q = q.contiguous()
        kv, cum = kv.contiguous(), cum.contiguous()
        fixed_kv = kv if fixed_kv is None else fixed_kv.contiguous()  # not read when there are none
        if n:
            _projected_token_read_kernel[(n,)](
                q, fixed_kv, kv, cum, raw, new_cum, read, q.stride(0),
                DECAY=decay, SCALE=scale, INV_LN_BASE=inv_ln_base,
                HEADS=heads, HEADS_P2=triton.next_power_of_2(heads), HEAD_DIM=head_dim,
                HEAD_DIM_P2=triton.next_power_of_2(head_dim), FIXED=n_slots - kv.shape[1], SLOTS=n_slots,
                SLOTS_P2=triton.next_power_of_2(n_slots), num_warps=_projected_warps(n_slots, heads, head_dim),
            )
        return raw, new_cum, read

    def _projected_warps(n_slots: int, heads: int, head_dim: int) -> int:
        tile = triton.next_power_of_2(n_slots) * triton.next_power_of_2(heads) * triton.next_power_of_2(head_dim)
        return min(8, max(1, tile // PROJECTED_ELEMENTS_PER_WARP))

    @projected_token_read.register_fake
    def _(q, fixed_kv, kv, cum, decay, scale, inv_ln_base):
        return _projected_token_read_outputs(q, fixed_kv, kv, cum)
