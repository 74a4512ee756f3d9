"""Where the compact loop's time goes, iteration by iteration: CUDA events around each replay.

Runs ``bench halting``'s model and tokens (compiled, CUDA graphs), halting off and the compact
loop at one tolerance, and records per iteration the working-set size, the GPU time of its
replay and the time since the previous replay ended (a shrink's kernels, or the GPU waiting
for the host). Events add a little host time per iteration, so the totals run above the
uninstrumented ones of ``parallax bench halting``; compare within a run.

    python benchmarks/halting_iterations.py out.json [tol] [MODEL.KEY=VALUE ...]   # CUDA only
"""

import json
import sys
import time

import torch

from parallax.bench.halting import graphed_loops
from parallax.models.cws import graphed

marks: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []


def _timed(run):
    def timed(self, *args):
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record()
        result = run(self, *args)
        after.record()
        states = self.states[0] if hasattr(self, "states") else self.h
        marks.append((states.shape[:2].numel(), before, after))
        return result

    return timed


def main(out: str, tol: float = 0.5, *overrides: str) -> None:
    graphed._CapturedIteration.run = _timed(graphed._CapturedIteration.run)
    graphed._CapturedStep.run = _timed(graphed._CapturedStep.run)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tol": tol,
              "overrides": list(overrides), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name, call in graphed_loops(tol, overrides):
        runs = []
        for _ in range(5):
            marks.clear()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            iterations, previous = [], start
            for size, before, after in marks:
                iterations.append(dict(size=size, before_ms=previous.elapsed_time(before),
                                       replay_ms=before.elapsed_time(after)))
                previous = after
            runs.append(dict(total_ms=start.elapsed_time(end), after_ms=previous.elapsed_time(end),
                             iterations=iterations))
        report[name] = {"runs": runs}
        median = sorted(runs, key=lambda r: r["total_ms"])[len(runs) // 2]
        print(f"{name}: {median['total_ms']:.2f} ms")
        for it in median["iterations"]:
            print(f"  {it['size']:6}  before {1e3 * it['before_ms']:7.1f} us  replay {1e3 * it['replay_ms']:7.1f} us")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], *map(float, sys.argv[2:3]), *sys.argv[3:])
