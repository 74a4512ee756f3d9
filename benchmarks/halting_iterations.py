"""Where the compact loop's time goes, iteration by iteration: CUDA events around each replay.

Runs ``bench halting``'s model and tokens (compiled, CUDA graphs), halting off and the compact
loop at one tolerance, and records per iteration (and per shrink of the working set) the set's
size, the GPU time of its replay and the time since the previous one ended (the GPU waiting
for the host). Events add a little host time per iteration, so the totals run above the
uninstrumented ones of ``parallax bench halting``; compare within a run. Then each captured
iteration is replayed 40 times back to back, with no host in between: its GPU time alone.

    python benchmarks/halting_iterations.py out.json [tol] [MODEL.KEY=VALUE ...]   # CUDA only
"""

import json
import sys
import time

import torch

from parallax.bench.halting import graphed_loops
from parallax.models.cws import graphed

marks: list[tuple[str, int, torch.cuda.Event, torch.cuda.Event]] = []


def _timed(run, kind: str, size):
    def timed(self, *args):
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record()
        result = run(self, *args)
        after.record()
        marks.append((kind, size(self, args), before, after))
        return result

    return timed


def _set_size(capture, args) -> int:
    states = capture.states[0] if hasattr(capture, "states") else capture.h
    return states.shape[:2].numel()


def back_to_back_us(replays: int = 40) -> dict[int, float]:
    """Each captured compact-loop iteration's GPU time per replay, replayed back to back (its
    iteration number held at 3, so the halting trace is never indexed past k_max)."""
    times = {}
    for graphs in graphed._graphs.values():
        for capture in graphs.steps.values():
            if not isinstance(capture, graphed._CapturedIteration):
                continue
            for _ in range(3):
                capture.k.fill_(3)
                capture.graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                capture.k.fill_(3)
                capture.graph.replay()
            end.record()
            end.synchronize()
            times[capture.states[0].shape[:2].numel()] = 1e3 * start.elapsed_time(end) / replays
    return times


def main(out: str, tol: float = 0.5, *overrides: str) -> None:
    graphed._CapturedIteration.run = _timed(graphed._CapturedIteration.run, "iteration", _set_size)
    graphed._CapturedStep.run = _timed(graphed._CapturedStep.run, "iteration", _set_size)
    graphed.GraphedIterations.shrink = _timed(graphed.GraphedIterations.shrink, "shrink", lambda _, args: args[3])
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
            for kind, size, before, after in marks:
                iterations.append(dict(kind=kind, size=size, before_ms=previous.elapsed_time(before),
                                       replay_ms=before.elapsed_time(after)))
                previous = after
            runs.append(dict(total_ms=start.elapsed_time(end), after_ms=previous.elapsed_time(end),
                             iterations=iterations))
        report[name] = {"runs": runs}
        median = sorted(runs, key=lambda r: r["total_ms"])[len(runs) // 2]
        print(f"{name}: {median['total_ms']:.2f} ms")
        for it in median["iterations"]:
            print(f"  {it['kind']:9} {it['size']:6}  before {1e3 * it['before_ms']:7.1f} us  "
                  f"replay {1e3 * it['replay_ms']:7.1f} us")
    report["back_to_back_us"] = back_to_back_us()
    print("back to back, us per replay:", {n: round(us, 1) for n, us in report["back_to_back_us"].items()})
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], *map(float, sys.argv[2:3]), *sys.argv[3:])
