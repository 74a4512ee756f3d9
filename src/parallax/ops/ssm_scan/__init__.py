"""Selective state-space scan (Mamba-style, diagonal, SISO per channel).

``selective_scan`` picks the fastest path that applies: mamba-ssm's CUDA kernel when it is
installed, the tensors are on CUDA and no initial state is given; otherwise on CUDA the Triton
scan (``triton_scan``, when Triton is installed); otherwise the chunked PyTorch scan.
``selective_scan_ref`` is the sequential reference they are tested against.
"""

from parallax.ops.ssm_scan.chunked import selective_scan_chunked
from parallax.ops.ssm_scan.dispatch import selective_scan
from parallax.ops.ssm_scan.naive import selective_scan_ref
from parallax.ops.ssm_scan.triton_scan import selective_scan_triton

__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_ref", "selective_scan_triton"]
