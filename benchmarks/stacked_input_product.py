"""The products of h_eff at one no-grad CWS iteration: four of their own, or one stacked.

Each iteration multiplies the normalised state h_eff by the workspace's W_q and by the first
layer of every h-clocked expert (the attention probe's queries, the MLP probe's up layer, the
SIREN's first layer). With a fused read the workspace stacks those weights once per forward
(``Workspace.prepare``) and runs one product. This times both ways at the throughput
benchmark's size (32 x 512 tokens, d 512, probe 2 x 32, MLP 1024, SIREN 512, bf16) as CUDA
graph replays, so the host is out of the figure, and checks that they agree.

    python benchmarks/stacked_input_product.py out.json       # CUDA only
"""

import json
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from parallax.bench.throughput import environment

TOKENS, DIM = 32 * 512, 512
WIDTHS = {"query": DIM, "probe": 2 * 32, "mlp": 2 * DIM, "siren": DIM}  # the throughput benchmark's CWS


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(out: str) -> None:
    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    h_eff = torch.randn(TOKENS, DIM, **bf16)
    weights = [torch.randn(width, DIM, **bf16) / DIM**0.5 for width in WIDTHS.values()]
    bias = torch.randn(WIDTHS["siren"], **bf16)  # the SIREN's first layer has one; addmm adds it
    stacked = torch.cat(weights)

    def own():
        *rest, siren = weights
        return [F.linear(h_eff, w) for w in rest] + [F.linear(h_eff, siren, bias)]

    def one():
        *rest, siren = F.linear(h_eff, stacked).split(list(WIDTHS.values()), dim=-1)
        return [*rest, siren + bias]  # the model adds the bias inside the sine's kernel

    report = {**environment(torch.device("cuda"), torch.bfloat16), "tokens": TOKENS, "dim": DIM, "widths": WIDTHS}
    report["errors"] = dict(zip(WIDTHS, (relative_error(a, b) for a, b in zip(one(), own()))))
    report["own_us"] = 1e3 * do_bench_cudagraph(own, rep=200)
    report["stacked_us"] = 1e3 * do_bench_cudagraph(lambda: F.linear(h_eff, stacked), rep=200)
    report["each_us"] = {
        name: 1e3 * do_bench_cudagraph(lambda w=w: F.linear(h_eff, w), rep=200) for name, w in zip(WIDTHS, weights)
    }
    report["own_over_stacked"] = report["own_us"] / report["stacked_us"]
    flops = 2 * TOKENS * DIM * sum(WIDTHS.values())
    report["tflops_own"], report["tflops_stacked"] = (flops / (1e6 * report[k]) for k in ("own_us", "stacked_us"))
    print(json.dumps(report, indent=1))
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
