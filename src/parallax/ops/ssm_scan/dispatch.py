"""Choose the selective-scan implementation for the tensors at hand.

mamba-ssm's fused CUDA kernel (an optional extra: ``pip install parallax[mamba]``) is used
when it imports, the inputs live on CUDA and the scan starts from a zero state (the kernel
takes no initial state). Otherwise, on CUDA with Triton 3.3 or later installed
(``parallax[gpu]``) and in fp16, bf16 or fp32, the Triton scan; everywhere else the chunked
PyTorch scan.
"""

from __future__ import annotations

from torch import Tensor

from parallax.ops.ssm_scan import triton_scan
from parallax.ops.ssm_scan.chunked import selective_scan_chunked

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_scan
except ImportError:  # the optional kernel is not installed: the Triton or PyTorch scan serves
    _mamba_scan = None


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    state: Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor]:
    """Shapes as in ``naive.selective_scan_ref``; returns (y (B, T, D), final state (B, D, N)).
    ``chunk_size`` is the chunked scan's (the others choose their own)."""
    if _mamba_scan is not None and u.is_cuda and state is None:
        y, last = _mamba_scan(
            u.transpose(1, 2).contiguous(),
            delta.transpose(1, 2).contiguous(),
            A.contiguous(),
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            D,
            return_last_state=True,
        )
        return y.transpose(1, 2), last
    if triton_scan.usable(u):
        return triton_scan.selective_scan_triton(u, delta, A, B, C, D, state)
    return selective_scan_chunked(u, delta, A, B, C, D, state, chunk_size)
