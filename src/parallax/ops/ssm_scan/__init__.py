"""Selective state-space scan (Mamba-style, diagonal, SISO per channel).

``selective_scan`` picks the fastest path that applies: mamba-ssm's CUDA kernel when it is
installed, the tensors are on CUDA and no initial state is given; otherwise the chunked
PyTorch scan. ``selective_scan_ref`` is the sequential reference both are tested against.
"""

from parallax.ops.ssm_scan.chunked import selective_scan_chunked
from parallax.ops.ssm_scan.dispatch import selective_scan
from parallax.ops.ssm_scan.naive import selective_scan_ref

__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_ref"]
