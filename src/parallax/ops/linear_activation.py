"""A linear layer and its elementwise activation in one Triton kernel, for no-grad iterations.

The CWS's h-clocked experts run ``sin(omega * (x W^T + b))`` (the SIREN prior's two sine
layers) and ``silu(x W^T)`` (the MLP probe's hidden layer) at every iteration. cuBLAS runs the
products but cannot take the activation as an epilogue, so under ``torch.compile`` each is a
product that writes its (N, hidden) output and a pointwise kernel that reads it back and writes
it again: at the benchmark's size (N = 16384 tokens, hidden 512-1024, bf16) 14-17 us per
activation on an H200, most of it the extra round trip through memory. Here the activation is
applied to the fp32 accumulator before the one store.

Forward only (no autograd): iterations with gradient run the PyTorch layers.
``linear_activation`` is the entry point, ``linear_activation_reference`` the same computation
in PyTorch (fp32 accumulation, one rounding at the end). With ``TRITON_INTERPRET=1`` set before
this module is imported, Triton runs the kernel on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the optional extra (pip install parallax[gpu]) is not installed
    triton = None

ACTIVATIONS = ("sin", "silu")
# tile shape, from benchmarks/linear_activation.py on an H200 (N 16384, in 512, out 512-1024, bf16)
LAUNCH = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def linear_activation_reference(x: Tensor, weight: Tensor, bias: Tensor | None, scale: float, activation: str) -> Tensor:
    """``activation(scale * (x @ weight^T + bias))`` accumulated in fp32, rounded once to x's dtype."""
    z = F.linear(x.float(), weight.float(), None if bias is None else bias.float()) * scale
    return _activate(z, activation).to(x.dtype)


def _activate(z: Tensor, activation: str) -> Tensor:
    if activation == "sin":
        return torch.sin(z)
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def usable(x: Tensor) -> bool:
    """Whether the kernel can run on ``x``: Triton present, and a CUDA tensor (or the CPU interpreter)."""
    return triton is not None and (x.is_cuda or INTERPRETED)


def linear_activation(
    x: Tensor, weight: Tensor, bias: Tensor | None, scale: float, activation: str, launch: dict | None = None
) -> Tensor:
    """``linear_activation_reference`` as one kernel: x (..., K), weight (N, K), bias (N,) or None,
    all of x's dtype; returns (..., N) in x's dtype. ``launch`` overrides ``LAUNCH`` (benchmarks)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError(
            f"linear_activation: x (..., K), weight (N, K) and bias (N,) expected, got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}"
        )
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"linear_activation: weight and bias must be x's dtype {x.dtype}")
    out = _linear_activation(x.reshape(-1, x.shape[-1]), weight, bias, float(scale), activation, **(launch or LAUNCH))
    return out.view(*x.shape[:-1], weight.shape[0])


if triton is not None:
    import os

    INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

    @triton.jit
    def _linear_activation_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, M, N, K,  # x (M, K), w (N, K), out (M, N), rows contiguous
        stride_x, stride_w, stride_out,
        SCALE: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # tiles in groups of GROUP_M rows of tiles, so programs running together share weight tiles
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
        pid_n = (pid % (GROUP_M * tiles_n)) // group_m
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * stride_x + kk[None, :], mask=(rm < M)[:, None] & (kk < K)[None, :],
                        other=0.0)
            w = tl.load(w_ptr + rn[None, :] * stride_w + kk[:, None], mask=(rn < N)[None, :] & (kk < K)[:, None],
                        other=0.0)
            acc = tl.dot(x, w, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        acc = acc * SCALE
        if ACTIVATION == "sin":
            acc = tl.sin(acc)
        else:
            acc = acc * tl.sigmoid(acc)
        tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])

    @torch.library.custom_op("parallax::linear_activation", mutates_args=())
    def _linear_activation_op(
        x: Tensor, weight: Tensor, bias: Tensor | None, scale: float, activation: str,
        block_m: int, block_n: int, block_k: int, group_m: int, num_warps: int, num_stages: int,
    ) -> Tensor:
        x, weight = x.contiguous(), weight.contiguous()
        m, k = x.shape
        n = weight.shape[0]
        out = x.new_empty(m, n)
        if m:
            grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
            _linear_activation_kernel[grid](
                x, weight, weight if bias is None else bias.contiguous(), out, m, n, k,
                x.stride(0), weight.stride(0), out.stride(0),
                SCALE=scale, ACTIVATION=activation, HAS_BIAS=bias is not None,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                num_warps=num_warps, num_stages=num_stages,
            )
        return out

    @_linear_activation_op.register_fake
    def _(x, weight, bias, scale, activation, block_m, block_n, block_k, group_m, num_warps, num_stages):
        return x.new_empty(x.shape[0], weight.shape[0])

    def _linear_activation(x, weight, bias, scale, activation, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
                           num_stages) -> Tensor:
        return _linear_activation_op(x, weight, bias, scale, activation, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                                     num_warps, num_stages)
else:
    INTERPRETED = False

    def _linear_activation(*args, **kwargs) -> Tensor:
        raise RuntimeError("linear_activation needs Triton: pip install parallax[gpu]")
