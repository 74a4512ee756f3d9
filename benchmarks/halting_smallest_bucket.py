"""How small should the compact loop's working set get under CUDA graphs?

Below some size an iteration costs its kernels' launch latency rather than its work, and a
shrink costs host time of its own, so ``graphed.SMALLEST_BUCKET`` stops the set there. This
times the no-grad settle loop (compact, compiled, CUDA graphs; ``bench halting``'s model and
tokens) for several smallest buckets, against halting off in the same run.

    python benchmarks/halting_smallest_bucket.py out.json [tol]      # CUDA only
"""

import json
import sys
import time

import torch

from parallax.bench.halting import model_and_tokens, settle_call
from parallax.bench.throughput import ThroughputConfig
from parallax.models.cws import graphed
from parallax.models.cws.compact import planned_set_sizes

SMALLEST = (64, 256, 512, 1024, 2048)


def median_ms(call, runs: int = 15):
    for _ in range(3):
        result = call()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[runs // 2], result


def main(out: str, tol: float = 0.5) -> None:
    model, ids = model_and_tokens(ThroughputConfig(), torch.device("cuda"))
    cfg = model.config
    report = {"device": torch.cuda.get_device_name(), "tol": tol}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        context = model.pool.token_clocked(model.embed(ids), None)
        knobs = dict(compile_step=True, cuda_graph=True)
        report["off_ms"], _ = median_ms(settle_call(model, context, halting=False, tol=0.0, loop="reference", **knobs))
        for smallest in SMALLEST:
            graphed.SMALLEST_BUCKET = smallest
            ms, result = median_ms(settle_call(model, context, halting=True, tol=tol, loop="compact", **knobs))
            sizes = planned_set_sizes(result.k_used, cfg.k_max, graphed.bucket)
            report[smallest] = dict(ms=ms, vs_off=ms / report["off_ms"], sizes=sizes,
                                    work=sum(sizes) / (cfg.k_max * result.k_used.numel()))
            print(smallest, f"{ms:.2f} ms", f"{ms / report['off_ms']:.3f} of halting off", sizes, flush=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], *map(float, sys.argv[2:3]))
