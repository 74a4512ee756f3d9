"""Where the halting loop's time goes on the GPU: wall time against GPU-busy time.

Profiles one no-grad settle call (compiled, CUDA graphs; ``bench halting``'s model and
tokens) with halting off and with the compact loop, and reports the wall time, the time some
kernel was running (the union of kernel intervals), the idle gaps over 10 us with the
kernels around them, and the top kernels. Busy time close to wall time means GPU-bound.

    python benchmarks/halting_timeline.py out.json [tol]      # CUDA only
"""

import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from parallax.bench.halting import graphed_loops
from parallax.models.cws import graphed
from parallax.models.cws.compact import planned_set_sizes

GAP_US = 10


def timeline(prof) -> dict:
    kernels = sorted((e.time_range.start, e.time_range.end, e.name[:50]) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, gaps, current = 0.0, [], None  # current: the running union interval (start, end, last name)
    for start, end, name in kernels:
        if current is not None and start > current[1]:
            busy += current[1] - current[0]
            if start - current[1] > GAP_US:
                gaps.append((round(start - current[1], 1), round(current[1] - kernels[0][0], 1), current[2], name))
            current = None
        if current is None:
            current = [start, end, name]
        elif end > current[1]:
            current[1:] = [end, name]
    if current is not None:
        busy += current[1] - current[0]
    return dict(gpu_busy_ms=busy / 1e3, kernels=len(kernels), idle_gaps_ms=sum(g[0] for g in gaps) / 1e3,
                n_gaps=len(gaps), gaps=sorted(gaps, reverse=True)[:25])


def main(out: str, tol: float = 0.5) -> None:
    report = {"device": torch.cuda.get_device_name(), "tol": tol}
    for name, call in graphed_loops(tol):
        result = call()
        torch.cuda.synchronize()
        walls = []
        for _ in range(10):
            start = time.perf_counter()
            call()
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - start) * 1e3)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        report[name] = dict(
            wall_ms=sorted(walls)[5], mean_k=result.k_used.float().mean().item(), **timeline(prof),
            sizes=planned_set_sizes(result.k_used, result.trace.shape[-1], graphed.bucket) if name == "compact" else None,
            top=prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70),
        )
        print(name, {k: v for k, v in report[name].items() if k not in ("top", "gaps")}, flush=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], *map(float, sys.argv[2:3]))
