"""HRR binding: the FFT path equals the direct circular convolution, and unbinding inverts binding."""

import torch
import torch.nn.functional as F

from parallax.ops.hrr import (
    approximate_inverse,
    circular_bind,
    circular_bind_reference,
    circular_unbind,
    circular_unbind_reference,
    unitary_role_powers,
)


def test_fft_bind_equals_direct_convolution():
    g = torch.Generator().manual_seed(0)
    for n in (7, 16, 64):
        a, b = torch.randn(3, n, generator=g), torch.randn(3, n, generator=g)
        torch.testing.assert_close(circular_bind(a, b), circular_bind_reference(a, b), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(circular_unbind(a, b), circular_unbind_reference(a, b), atol=1e-4, rtol=1e-4)


def test_direct_convolution_matches_definition():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([0.0, 1.0, 0.0])  # a shift by one
    torch.testing.assert_close(circular_bind_reference(a, b), torch.tensor([3.0, 1.0, 2.0]))


def test_unbind_with_approximate_inverse_recovers_filler():
    n = 512
    g = torch.Generator().manual_seed(1)
    role, filler = torch.randn(8, n, generator=g) / n**0.5, torch.randn(8, n, generator=g) / n**0.5
    recovered = circular_unbind(circular_bind(role, filler), role)
    assert F.cosine_similarity(recovered, filler, dim=-1).min() > 0.6
    # A different role does not recover it.
    other = torch.randn(8, n, generator=g) / n**0.5
    assert F.cosine_similarity(circular_unbind(circular_bind(role, filler), other), filler, dim=-1).abs().max() < 0.2


def test_unitary_roles_invert_exactly_and_encode_offsets():
    n = 32
    phases = torch.rand(n // 2 + 1, generator=torch.Generator().manual_seed(2)) * 6.28
    roles = unitary_role_powers(phases, torch.arange(6))
    torch.testing.assert_close(roles.norm(dim=-1), torch.ones(6))
    filler = torch.randn(n)
    torch.testing.assert_close(circular_unbind(circular_bind(roles[4], filler), roles[4]), filler, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(circular_bind(approximate_inverse(roles[1]), roles[4]), roles[3], atol=1e-5, rtol=1e-4)
