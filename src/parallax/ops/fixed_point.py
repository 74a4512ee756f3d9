"""Fixed-point solvers for ``z = f(z)`` and the implicit-function-theorem (IFT) gradient.

* :func:`iterate` — plain Picard iteration ``z <- f(z)``; the reference every solver must agree with.
* :func:`anderson` — Anderson acceleration (type II, as in Bai et al.'s DEQ tutorial): each new
  iterate mixes the last ``memory`` evaluations with the weights that minimise the residual
  of their combination, so it needs far fewer evaluations of ``f`` than plain iteration.
* :func:`implicit_gradient` — exact equilibrium gradients without backpropagating through
  the solver: the backward pass solves the adjoint fixed point ``g = J_f(z*)^T g + dL/dz*``.

Each solver evaluates ``f`` exactly ``steps`` times and returns ``(z, residuals)`` where
``residuals`` (steps,) holds ``||f(z_k) - z_k|| / ||f(z_k)||`` for each evaluation, i.e. how far
from equilibrium the state was. Solvers do not touch the grad mode: callers wrap them in
``torch.no_grad()`` when the solve must not be differentiated. ``z`` may have any shape whose
first dimension is the batch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Map = Callable[[Tensor], Tensor]
Solver = Callable[[Map, Tensor, int], tuple[Tensor, Tensor]]

_EPS = 1e-8


def relative_residual(new: Tensor, old: Tensor) -> Tensor:
    """``||new - old|| / ||new||`` over the whole tensor, in at least fp32 (a 0-dim tensor)."""
    dtype = torch.promote_types(new.dtype, torch.float32)
    new, old = new.detach().to(dtype), old.detach().to(dtype)
    return (new - old).norm() / (new.norm() + _EPS)


def iterate(f: Map, z0: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Plain fixed-point iteration: ``steps`` applications of ``f`` starting from ``z0``."""
    z, residuals = z0, []
    for _ in range(steps):
        new = f(z)
        residuals.append(relative_residual(new, z))
        z = new
    return z, torch.stack(residuals) if residuals else z0.new_zeros(0)


def anderson(
    f: Map, z0: Tensor, steps: int, memory: int = 5, ridge: float = 1e-4, mixing: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Anderson-accelerated fixed-point iteration, per batch element.

    Keeps the last ``memory`` iterates ``X`` and their images ``F = f(X)``; the next iterate is
    ``mixing * F @ a + (1 - mixing) * X @ a`` with weights ``a`` (summing to one) minimising
    ``||(F - X) a||^2 + ridge * scale * ||a||^2`` (``scale``: the mean squared residual, so
    the regulariser is relative). The bookkeeping runs in at least fp32 on flattened states.
    """
    if steps < 1:
        return z0, z0.new_zeros(0)
    shape, b = z0.shape, z0.shape[0]
    work = torch.promote_types(z0.dtype, torch.float32)

    def g(flat: Tensor) -> Tensor:
        return f(flat.view(shape).to(z0.dtype)).reshape(b, -1).to(work)

    x0 = z0.reshape(b, -1).to(work)
    xs, fs = [x0], [g(x0)]
    residuals = [relative_residual(fs[0], xs[0])]
    for _ in range(steps - 1):
        X, F = torch.stack(xs, 1), torch.stack(fs, 1)  # (B, m, N)
        G = F - X
        m = G.shape[1]
        gram = G @ G.transpose(1, 2)
        scale = gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(_EPS)[:, None, None]
        gram = gram + ridge * scale * torch.eye(m, device=G.device, dtype=work)
        # Solve the bordered system [[0, 1^T], [1, gram]] [mu, a] = [1, 0] for weights a.
        system = torch.zeros(b, m + 1, m + 1, device=G.device, dtype=work)
        system[:, 0, 1:] = system[:, 1:, 0] = 1.0
        system[:, 1:, 1:] = gram
        rhs = torch.zeros(b, m + 1, 1, device=G.device, dtype=work)
        rhs[:, 0] = 1.0
        alpha = torch.linalg.solve(system, rhs)[:, 1:, 0].unsqueeze(1)  # (B, 1, m)
        x = (mixing * (alpha @ F) + (1 - mixing) * (alpha @ X)).squeeze(1)
        fx = g(x)
        residuals.append(relative_residual(fx, x))
        xs, fs = (xs + [x])[-memory:], (fs + [fx])[-memory:]
    return fs[-1].view(shape).to(z0.dtype), torch.stack(residuals)


def implicit_gradient(f: Map, z_star: Tensor, adjoint_steps: int, solver: Solver = iterate) -> Tensor:
    """Re-attach an equilibrium ``z* = f(z*)`` to the graph with its exact (IFT) gradient.

    Returns ``z = f(z*)`` (one differentiable step, so the gradient reaches the parameters
    and inputs of ``f``). A hook replaces the incoming gradient ``v = dL/dz`` by the solution
    ``g`` of the adjoint fixed point ``g = J_f(z*)^T g + v``, solved with ``solver`` for
    ``adjoint_steps`` evaluations; then ``dL/dθ = g^T ∂f/∂θ = v^T (I - J_f)^{-1} ∂f/∂θ``, the
    implicit-function-theorem gradient. Memory is that of two applications of ``f``.
    """
    z = f(z_star.detach())
    if not z.requires_grad:
        return z
    z_in = z.detach().requires_grad_()
    f_in = f(z_in)

    def adjoint_solve(v: Tensor) -> Tensor:
        def adjoint_map(g: Tensor) -> Tensor:
            return torch.autograd.grad(f_in, z_in, g, retain_graph=True)[0] + v

        g, _ = solver(adjoint_map, v, adjoint_steps)
        return g

    z.register_hook(adjoint_solve)
    return z
