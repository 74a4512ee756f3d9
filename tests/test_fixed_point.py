"""Fixed-point solvers: residual falls, Anderson agrees with plain iteration, IFT gradient is exact."""

import torch

from parallax.ops.fixed_point import anderson, implicit_gradient, iterate


def contraction(dim: int = 12, lipschitz: float = 0.9, seed: int = 0, scale: float = 1.0):
    """``f(z) = tanh(W z + x)`` with ||W||_2 = lipschitz, a contraction; all float64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    w = lipschitz * w / torch.linalg.matrix_norm(w, ord=2)
    x = scale * torch.randn(3, dim, generator=g, dtype=torch.float64)
    return w, x


def test_plain_iteration_residual_falls():
    w, x = contraction()
    _, res = iterate(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x), 40)
    assert res.shape == (40,)
    assert res[-1] < 1e-2 * res[1]
    assert (res[1:] <= res[:-1] + 1e-12).all()


def test_anderson_reaches_the_fixed_point_of_plain_iteration_faster():
    w, x = contraction(lipschitz=0.98)
    f = lambda z: torch.tanh(z @ w.T + x)  # noqa: E731
    z_plain, _ = iterate(f, torch.zeros_like(x), 3000)
    z_aa, res_aa = anderson(f, torch.zeros_like(x), 20, memory=5)
    _, res_plain = iterate(f, torch.zeros_like(x), 12)
    torch.testing.assert_close(z_aa, z_plain, atol=1e-7, rtol=1e-6)
    assert res_aa[11] < 1e-2 * res_plain[11]


def test_ift_gradient_matches_finite_differences():
    w, x = contraction(dim=6, lipschitz=0.8, seed=3)
    c = torch.randn_like(x)

    def loss_at(x_in: torch.Tensor, ift: bool) -> torch.Tensor:
        f = lambda z: torch.tanh(z @ w.T + x_in)  # noqa: E731
        with torch.no_grad():
            z_star, _ = iterate(f, torch.zeros_like(x_in), 200)
        z = implicit_gradient(f, z_star, adjoint_steps=200) if ift else z_star
        return (c * z).sum()

    xg = x.clone().requires_grad_()
    loss_at(xg, ift=True).backward()
    eps = 1e-6
    numeric = torch.zeros_like(x)
    for idx in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=x.dtype)
        e[idx] = eps
        e = e.view_as(x)
        numeric.view(-1)[idx] = (loss_at(x + e, False) - loss_at(x - e, False)) / (2 * eps)
    torch.testing.assert_close(xg.grad, numeric, atol=1e-6, rtol=1e-5)
    # The one-step (Jacobian-free) gradient differs: the test can tell them apart.
    xj = x.clone().requires_grad_()
    f = lambda z: torch.tanh(z @ w.T + xj)  # noqa: E731
    with torch.no_grad():
        z_star, _ = iterate(f, torch.zeros_like(x), 200)
    (c * f(z_star)).sum().backward()
    assert (xj.grad - numeric).abs().max() > 1e-3
