"""The chunked selective scan against its sequential reference: outputs, states, gradients."""

import pytest
import torch
import torch.nn.functional as F

from parallax.ops.ssm_scan import selective_scan, selective_scan_chunked, selective_scan_ref


pytestmark = pytest.mark.usefixtures("one_thread")


def random_inputs(batch=2, length=23, channels=5, n_state=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, channels, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(batch, length, channels, generator=g, dtype=dtype))
    A = -torch.rand(channels, n_state, generator=g, dtype=dtype) * 4 - 0.1
    B = torch.randn(batch, length, n_state, generator=g, dtype=dtype)
    C = torch.randn(batch, length, n_state, generator=g, dtype=dtype)
    D = torch.randn(channels, generator=g, dtype=dtype)
    state = torch.randn(batch, channels, n_state, generator=g, dtype=dtype)
    return [u, delta, A, B, C, D, state]


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference_forward_and_state(chunk_size, with_state):
    u, delta, A, B, C, D, state = random_inputs()
    state = state if with_state else None
    y_ref, s_ref = selective_scan_ref(u, delta, A, B, C, D, state)
    y, s = selective_scan_chunked(u, delta, A, B, C, D, state, chunk_size)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_chunked_matches_reference_gradients():
    inputs = random_inputs(length=19)
    grads = []
    for scan in (selective_scan_ref, lambda *a: selective_scan_chunked(*a, chunk_size=4)):
        leaves = [x.clone().requires_grad_() for x in inputs]
        y, s = scan(*leaves)
        g = torch.Generator().manual_seed(1)
        (y * torch.randn(y.shape, generator=g)).sum().backward(retain_graph=True)
        (s * torch.randn(s.shape, generator=g)).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for name, g_ref, g_fast in zip(["u", "delta", "A", "B", "C", "D", "state"], *grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")


def test_scan_continues_from_a_split_sequence():
    """Scanning [0, 10) then [10, T) from the carried state equals one scan of [0, T)."""
    u, delta, A, B, C, D, _ = random_inputs(length=21)
    y_full, s_full = selective_scan(u, delta, A, B, C, D)
    y1, s1 = selective_scan(u[:, :10], delta[:, :10], A, B[:, :10], C[:, :10], D)
    y2, s2 = selective_scan(u[:, 10:], delta[:, 10:], A, B[:, 10:], C[:, 10:], D, s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s_full, rtol=1e-5, atol=1e-5)


def test_fast_decay_does_not_overflow():
    u, delta, A, B, C, D, state = random_inputs(length=40)
    y, s = selective_scan_chunked(u, delta * 50, A * 10, B, C, D, state, chunk_size=16)
    y_ref, s_ref = selective_scan_ref(u, delta * 50, A * 10, B, C, D, state)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
