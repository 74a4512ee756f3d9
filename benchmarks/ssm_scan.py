"""The Triton selective scan against the chunked PyTorch scan, at the CWS benchmark's size.

The SSM expert's scan of a training batch (32 x 512 tokens, 512 channels, N 16; u, delta, B
and C in bf16 as autocast leaves them, A and D in fp32): first the error of both scans
against an fp64 chunked scan (outputs and every input's gradient), then the time of forward
+ backward and of the forward alone, for the Triton scan, the chunked scan eager and the
chunked scan compiled, with each one's peak memory above its inputs.

    python benchmarks/ssm_scan.py out.json           # CUDA only
    python benchmarks/ssm_scan.py out.json --sweep   # and the Triton scan's launch shapes:
        # forward_ms at each forward shape, forward_backward_ms at each backward shape
"""

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from parallax.bench.throughput import environment
from parallax.ops.ssm_scan import selective_scan_chunked, selective_scan_triton, triton_scan

BATCH, LENGTH, CHANNELS, N_STATE = 32, 512, 512, 16


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main(out: str, sweep: bool) -> None:
    torch.manual_seed(0)
    cuda = dict(device="cuda")
    u = torch.randn(BATCH, LENGTH, CHANNELS, **cuda)
    delta = F.softplus(torch.randn(BATCH, LENGTH, CHANNELS, **cuda) - 2)
    A = -torch.exp(torch.log(torch.arange(1, N_STATE + 1.0, **cuda)).expand(CHANNELS, -1))
    B, C = torch.randn(BATCH, LENGTH, N_STATE, **cuda), torch.randn(BATCH, LENGTH, N_STATE, **cuda)
    D = torch.ones(CHANNELS, **cuda)
    low = [x.to(torch.bfloat16) for x in (u, delta)] + [A] + [x.to(torch.bfloat16) for x in (B, C)] + [D]
    grad_y = torch.randn(BATCH, LENGTH, CHANNELS, **cuda)

    def chunked(*a):
        return selective_scan_chunked(*a, chunk_size=16)

    def forward_backward(scan, inputs):
        leaves = [x.detach().requires_grad_() for x in inputs]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=inputs[0].dtype == torch.bfloat16):
            y, _ = scan(*leaves)  # as in the model: the chunked scan's products need autocast
        y.backward(grad_y.to(y.dtype))
        return [y] + [x.grad for x in leaves]

    exact = forward_backward(chunked, [x.double() for x in low])
    compiled = torch.compile(chunked)
    scans = {"triton": selective_scan_triton, "chunked": chunked, "chunked_compiled": compiled}
    report = {**environment(torch.device("cuda"), torch.bfloat16),
              "shape": dict(batch=BATCH, length=LENGTH, channels=CHANNELS, n_state=N_STATE)}
    for name, scan in scans.items():
        got = forward_backward(scan, low)
        entry = {"errors_y_then_grads": [relative_error(g, e) for g, e in zip(got, exact)]}
        if scan is selective_scan_triton:
            entry["launch_shape"] = launch_shape()
        entry["forward_backward_ms"] = do_bench(lambda: forward_backward(scan, low), warmup=5, rep=200)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            entry["forward_ms"] = do_bench(lambda: scan(*low), warmup=5, rep=200)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward(scan, low)
        entry["peak_mib_above_inputs"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        report[name] = entry
        print(name, json.dumps(entry), flush=True)
    for name in ("chunked", "chunked_compiled"):
        report[f"triton_vs_{name}"] = {
            key: report["triton"][key] / report[name][key] for key in ("forward_backward_ms", "forward_ms")}
    print(json.dumps({k: v for k, v in report.items() if k.startswith("triton_vs")}))
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    if sweep:
        report["launch_shapes"] = launch_shapes(lambda: forward_backward(selective_scan_triton, low), low)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


def launch_shape() -> dict:
    """The Triton scan's launch shapes as they are now (module globals the sweep changes)."""
    return dict(chunk=triton_scan.CHUNK, block_d=triton_scan.BLOCK_D, num_warps=triton_scan.NUM_WARPS,
                backward_block_d=triton_scan.BACKWARD_BLOCK_D, backward_num_warps=triton_scan.BACKWARD_NUM_WARPS)


SHAPE_GLOBALS = ("CHUNK", "BLOCK_D", "NUM_WARPS", "BACKWARD_BLOCK_D", "BACKWARD_NUM_WARPS")


def launch_shapes(forward_backward, inputs) -> list[dict]:
    """The Triton scan's time at each (tokens per saved state, channels per program, warps):
    the forward alone at each forward shape, and forward + backward at each backward shape
    (the forward then at its default channels and warps)."""
    default = {name: getattr(triton_scan, name) for name in SHAPE_GLOBALS}
    rows = []
    try:
        for chunk, block_d, warps in itertools.product((4, 8), (8, 16, 32), (1, 2, 4)):
            if block_d * 16 < warps * 64:  # fewer than two state elements per thread
                continue
            triton_scan.CHUNK, triton_scan.BLOCK_D, triton_scan.NUM_WARPS = chunk, block_d, warps
            with torch.no_grad():
                forward_ms = do_bench(lambda: selective_scan_triton(*inputs), warmup=5, rep=100)
            triton_scan.BLOCK_D, triton_scan.NUM_WARPS = default["BLOCK_D"], default["NUM_WARPS"]
            triton_scan.BACKWARD_BLOCK_D, triton_scan.BACKWARD_NUM_WARPS = block_d, warps
            row = dict(chunk=chunk, block_d=block_d, num_warps=warps, forward_ms=forward_ms,
                       forward_backward_ms=do_bench(forward_backward, warmup=5, rep=100))
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        for name, value in default.items():
            setattr(triton_scan, name, value)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--sweep", action="store_true", help="also time the Triton scan's launch shapes")
    args = parser.parse_args()
    main(args.out, args.sweep)
