"""Halting's time against halting off in one process, for A/B runs of two checkouts.

Times the no-grad settle loop of ``bench halting``'s model and tokens with halting off and with
the compact loop at each tolerance, both compiled with CUDA graphs (the fast path), median of
10 calls after 3 (``time_calls``), and writes each one's time, its ratio to halting off, m
(mean K / k_max) and the work the shrink rule leaves. Lighter than ``parallax bench halting``
(no eager rows), so two checkouts can alternate in paired processes on one machine:

    PYTHONPATH=old/src python benchmarks/halting_ab.py old old1.json 0.2 0.5 1.0   # CUDA only
    PYTHONPATH=src python benchmarks/halting_ab.py new new1.json 0.2 0.5 1.0

``--set cws.KEY=VALUE`` (repeatable) changes the model as ``bench halting --set`` does, e.g.
``--set cws.read=fused_projected``.
"""

import argparse
import json
import statistics
import time

import torch

from parallax.bench.halting import model_and_tokens, settle_call
from parallax.bench.throughput import ThroughputConfig, time_calls
from parallax.models.cws import compact, graphed


def main(label: str, out: str, tolerances: list[float], overrides: tuple[str, ...] = ()) -> None:
    device = torch.device("cuda")
    model, ids = model_and_tokens(ThroughputConfig(overrides=overrides), device)
    k_max = model.config.k_max
    rows = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        context = model.pool.token_clocked(model.embed(ids), None)
        for tol in (None, *tolerances):
            call = settle_call(model, context, halting=tol is not None, tol=tol or 0.0,
                               loop="reference" if tol is None else "compact", compile_step=True, cuda_graph=True)
            times = time_calls(call, device, 3, 10)
            k_used = call().k_used
            sizes = None if tol is None else compact.planned_set_sizes(k_used, k_max, graphed.bucket)
            rows.append(dict(tol=tol, ms=statistics.median(times), ms_all=times, m=k_used.float().mean().item() / k_max,
                             work=1.0 if sizes is None else sum(sizes) / (k_max * k_used.numel()), sizes=sizes))
            rows[-1]["vs_off"] = rows[-1]["ms"] / rows[0]["ms"]
            print(f"{label} tol={tol} {rows[-1]['ms']:.2f} ms vs off {rows[-1]['vs_off']:.3f} m={rows[-1]['m']:.3f} "
                  f"work={rows[-1]['work']:.3f}", flush=True)
    with open(out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, label=label,
                       overrides=list(overrides), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       rows=rows), f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("label")
    parser.add_argument("out")
    parser.add_argument("tolerances", type=float, nargs="+")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="cws.KEY=VALUE")
    args = parser.parse_args()
    main(args.label, args.out, args.tolerances, tuple(args.overrides))
