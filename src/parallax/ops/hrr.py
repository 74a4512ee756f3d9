"""Holographic reduced representations (HRR): circular-convolution binding and unbinding.

Binding ``a ⊛ b`` mixes two vectors into one of the same width, so a role (a position) can be
bound into a filler (a token) without adding a dimension, and unbound again with the role's
approximate inverse (its involution ``a*[i] = a[-i mod n]``, exact when ``a`` is unitary, i.e.
every Fourier coefficient has modulus 1). The fast path runs in O(n log n) through the real FFT;
``*_reference`` twins compute the same O(n^2) sums directly, for tests.

Shapes: inputs broadcast over leading dimensions; the last dimension (n) is bound.
"""

from __future__ import annotations

import torch
from torch import Tensor


def circular_bind(a: Tensor, b: Tensor) -> Tensor:
    """Circular convolution ``(a ⊛ b)[k] = sum_i a[i] b[(k - i) mod n]`` via the FFT."""
    n = a.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(a.float(), n=n) * torch.fft.rfft(b.float(), n=n), n=n).to(a.dtype)


def approximate_inverse(a: Tensor) -> Tensor:
    """The involution ``a*[i] = a[-i mod n]``: the HRR inverse, exact for unitary vectors."""
    return torch.roll(a.flip(-1), 1, dims=-1)


def circular_unbind(c: Tensor, a: Tensor) -> Tensor:
    """Recover ``b`` from ``c = a ⊛ b`` approximately: ``a* ⊛ c`` (circular correlation)."""
    return circular_bind(approximate_inverse(a), c)


def circular_bind_reference(a: Tensor, b: Tensor) -> Tensor:
    """O(n^2) direct circular convolution; the twin of :func:`circular_bind`."""
    n = a.shape[-1]
    k = torch.arange(n, device=a.device)
    shifted = b[..., (k.unsqueeze(1) - k.unsqueeze(0)) % n]  # (..., k, i) = b[(k - i) mod n]
    return (a.unsqueeze(-2) * shifted).sum(-1)


def circular_unbind_reference(c: Tensor, a: Tensor) -> Tensor:
    """O(n^2) direct circular correlation ``sum_i a[i] c[(k + i) mod n]``."""
    n = a.shape[-1]
    k = torch.arange(n, device=a.device)
    shifted = c[..., (k.unsqueeze(1) + k.unsqueeze(0)) % n]  # (..., k, i) = c[(k + i) mod n]
    return (a.unsqueeze(-2) * shifted).sum(-1)


def unitary_role_powers(base_phases: Tensor, positions: Tensor) -> Tensor:
    """Roles ``r_t = r^{⊛t}`` of a unitary base role, built in the Fourier domain.

    ``base_phases`` (n // 2 + 1,) are the angles of the base role's Fourier coefficients; the
    role for position ``t`` has angles ``t * base_phases``, so every role is unitary (its
    inverse is exact) and ``r_s* ⊛ r_t = r_{t-s}``: binding encodes relative offsets.
    Returns (len(positions), n) with n = 2 * (len(base_phases) - 1); each role has unit norm.
    """
    n = 2 * (base_phases.shape[-1] - 1)
    real_bins = torch.zeros_like(base_phases, dtype=torch.bool)
    real_bins[[0, -1]] = True  # DC and Nyquist coefficients of a real signal are real: phase 0
    angles = positions.float().unsqueeze(-1) * base_phases.masked_fill(real_bins, 0.0)
    return torch.fft.irfft(torch.polar(torch.ones_like(angles), angles), n=n)
