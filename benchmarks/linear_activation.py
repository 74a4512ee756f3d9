"""The fused linear + activation kernel against cuBLAS + the compiler's pointwise kernel.

At the benchmark CWS's sizes (16384 tokens, d 512, bf16): the SIREN prior's sine layers
(512 -> 512, bias, omega 30) and the MLP probe's hidden layer (512 -> 1024, SiLU). First the
error of the kernel and of the bf16 PyTorch layer against an fp32 reference, then the time
of: the product alone (cuBLAS, ``F.linear``), the layer as
the model runs it compiled (product + pointwise kernel, ``torch.compile``), and the kernel at a
few tile shapes, the first being ``LAUNCH``.

    python benchmarks/linear_activation.py out.json      # CUDA only
"""

import json
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from parallax.bench.throughput import environment
from parallax.ops import linear_activation as la

N = 32 * 512
LAYERS = [  # name, in, out, bias, scale, activation
    ("siren_sine", 512, 512, True, 30.0, "sin"),
    ("mlp_silu", 512, 1024, False, 1.0, "silu"),
]
TILES = [la.LAUNCH] + [
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 4, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 128, 8, 2), (256, 128, 64, 8, 3),
    ]
]


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(out: str) -> None:
    torch.manual_seed(0)
    report = {**environment(torch.device("cuda"), torch.bfloat16), "tokens": N, "layers": {}}
    for name, d_in, d_out, has_bias, scale, activation in LAYERS:
        bf16 = dict(device="cuda", dtype=torch.bfloat16)
        x = torch.randn(N, d_in, **bf16)
        weight = (torch.rand(d_out, d_in, **bf16) * 2 - 1) * ((6 / d_in) ** 0.5 / scale if scale != 1 else d_in ** -0.5)
        bias = torch.rand(d_out, **bf16) * 0.1 if has_bias else None
        exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double()) * scale
        exact = torch.sin(exact) if activation == "sin" else F.silu(exact)

        def pytorch_layer(x):
            z = F.linear(x, weight, bias)
            return torch.sin(scale * z) if activation == "sin" else F.silu(z)

        compiled = torch.compile(pytorch_layer)
        fused = lambda x, tile=None: la.linear_activation(x, weight, bias, scale, activation, launch=tile)  # noqa: E731
        row = dict(
            error_pytorch_bf16=relative_error(pytorch_layer(x), exact),
            error_compiled_bf16=relative_error(compiled(x), exact),
            error_fused=relative_error(fused(x), exact),
            cublas_product_us=1e3 * do_bench_cudagraph(lambda: F.linear(x, weight, bias), rep=200),
            compiled_layer_us=1e3 * do_bench_cudagraph(lambda: compiled(x), rep=200),
            tiles=[],
        )
        for tile in TILES:
            try:
                us = 1e3 * do_bench_cudagraph(lambda: fused(x, tile), rep=200)
                error = relative_error(fused(x, tile), exact)
            except Exception as e:  # a tile shape that does not fit the device: record why
                us, error = None, f"{type(e).__name__}: {str(e)[:120]}"
            row["tiles"].append(dict(tile, us=us, error=error))
        best = min((t for t in row["tiles"] if t["us"]), key=lambda t: t["us"])
        row["best_tile"], row["fused_vs_compiled"] = best, best["us"] / row["compiled_layer_us"]
        report["layers"][name] = row
        print(name, {k: v for k, v in row.items() if k != "tiles"}, flush=True)
        for t in row["tiles"]:
            print("  ", t, flush=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
