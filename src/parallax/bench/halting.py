"""Does halting save time? The CWS's no-grad settling loop with halting off and on.

Issue-level claim: with per-token halting and mean K / k_max = m, the no-grad phase should
take at most about (m + 0.15) of its time with halting off. This measures exactly that
phase (``settle`` with no gradient, as in evaluation and generation, and as the no-grad pass
of ``halt_in_training``), after the token-clocked experts, which run once either way:

* halting off: every token runs k_max iterations (eager, and with ``compile_step``; on CUDA
  also each replayed from a CUDA graph, ``cuda_graph``);
* halting on, at each tolerance: the ``reference`` loop (masks; halting skips no work) and
  the ``compact`` loop (only the tokens still running), eager and with ``compile_step``, on
  CUDA also replayed from CUDA graphs, with the mean K reached. "vs off" compares each with
  halting off run the same way (eager or compiled, with or without graphs).

The model is the throughput benchmark's matched CWS (d 512, k_max 24 by default) at its
initial weights, on random tokens: how many iterations each token takes is whatever the
tolerance gives, reported beside each time. "work" is the compact loop's token-iterations
over halting off's (``compact.planned_set_sizes``): what its shrink rule leaves to compute,
so a time above it is overhead, not work. Timing as ``parallax.bench.throughput``.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import torch

from parallax.bench.throughput import (
    ThroughputConfig,
    _autocast,
    environment,
    matched_configs,
    resolve,
    time_calls,
)
from parallax.models.cws import graphed
from parallax.models.cws.compact import planned_set_sizes
from parallax.models.cws.settle import settle

DEFAULT_TOLERANCES = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def settle_call(model, context, *, halting: bool, tol: float, loop: str, compile_step: bool,
                cuda_graph: bool = False):
    """A no-argument call of the no-grad settle loop on ``context`` with these settings."""
    cfg = model.config
    return lambda: settle(
        model.workspace, model.pool, context, k_max=cfg.k_max, k_min=cfg.k_min, halting=halting,
        rule=cfg.halt_rule, tol=tol, live_steps=0, loop=loop, compile_step=compile_step, cuda_graph=cuda_graph,
    )


def _work(k_used, k_max: int, *, halting: bool, loop: str, cuda_graph: bool = False, **_) -> float | None:
    """The compact loop's token-iterations over halting off's (k_max for every token): the work
    its shrink rule leaves, to hold its time against. None for the reference loop."""
    if not halting:
        return 1.0
    if loop != "compact":
        return None
    sizes = planned_set_sizes(k_used, k_max, graphed.bucket if cuda_graph else None)
    return sum(sizes) / (k_max * k_used.numel())


def model_and_tokens(tc: ThroughputConfig, device: torch.device):
    """The matched CWS at its seeded initial weights, in eval mode, and the random tokens it
    settles (the same in every halting measurement, scripts in benchmarks/ included)."""
    from parallax.models import build_model

    cfg = matched_configs(dataclasses.replace(tc, models=("cws",)))["cws"]
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    return model, torch.randint(0, tc.vocab, (tc.batch, tc.seq), device=device, generator=generator)


def graphed_loops(tol: float, overrides: tuple[str, ...] = (), device: str = "cuda"):
    """Yields ("off", call) and ("compact", call): the no-grad loop with halting off and the
    compact loop at ``tol``, compiled with CUDA graphs, each warmed up (3 calls), run under bf16
    autocast (the contexts stay open while the caller times a call) -- what the
    ``benchmarks/halting_*.py`` profiles look into. The model is ``model_and_tokens``'s."""
    model, ids = model_and_tokens(ThroughputConfig(overrides=overrides), torch.device(device))
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        context = model.pool.token_clocked(model.embed(ids), None)
        for name, knobs in {"off": dict(halting=False, tol=0.0, loop="reference"),
                            "compact": dict(halting=True, tol=tol, loop="compact")}.items():
            call = settle_call(model, context, compile_step=True, cuda_graph=True, **knobs)
            for _ in range(3):
                call()
            yield name, call


def run_halting(
    tc: ThroughputConfig, tolerances=DEFAULT_TOLERANCES, compile_step: bool = True, log=print
) -> dict[str, Any]:
    """Rows of (halting, tol, loop, compile_step, ms, mean K, m, time vs halting off)."""
    tc.validate()
    device, dtype = resolve(tc)
    model, ids = model_and_tokens(tc, device)
    cfg = model.config
    rows: list[dict[str, Any]] = []

    def measure(**setting) -> dict[str, Any]:
        call = settle_call(model, context, **setting)
        times = time_calls(call, device, tc.warmup, tc.steps)
        k_used = call().k_used
        mean_k = k_used.float().mean().item()
        row = {"cuda_graph": False, **setting, "ms": statistics.median(times), "ms_all": times, "mean_k": mean_k,
               "m": mean_k / cfg.k_max, "work": _work(k_used, cfg.k_max, **setting)}
        rows.append(row)
        log(f"halting={setting['halting']!s:5} tol={setting['tol']:<5} loop={setting['loop']:9} "
            f"compile_step={setting['compile_step']!s:5} cuda_graph={setting.get('cuda_graph', False)!s:5} "
            f"{row['ms']:8.2f} ms  mean K {mean_k:5.2f}")
        return row

    with torch.no_grad(), _autocast(device, dtype):
        context = model.pool.token_clocked(model.embed(ids), None)
        graphs = (False, True) if device.type == "cuda" else (False,)  # CUDA graphs need CUDA
        for cuda_graph in graphs:
            for compiled in sorted({False, compile_step}):
                measure(halting=False, tol=0.0, loop="reference", compile_step=compiled, cuda_graph=cuda_graph)
        for tol in tolerances:
            for loop in ("reference", "compact"):
                measure(halting=True, tol=tol, loop=loop, compile_step=False)
            if compile_step:
                measure(halting=True, tol=tol, loop="compact", compile_step=True)
            if device.type == "cuda":
                for compiled in sorted({False, compile_step}):
                    measure(halting=True, tol=tol, loop="compact", compile_step=compiled, cuda_graph=True)
    off_rows = {(r["compile_step"], r["cuda_graph"]): r for r in rows if not r["halting"]}
    for row in rows:
        row["time_vs_off"] = row["ms"] / off_rows[row["compile_step"], row["cuda_graph"]]["ms"]
        row["bound"] = row["m"] + 0.15 if row["halting"] else None
    return {"environment": environment(device, dtype), "config": {**dataclasses.asdict(tc), "tolerances": list(tolerances)},
            "k_max": cfg.k_max, "rows": rows}


def format_halting(report: dict[str, Any]) -> str:
    lines = [f"{report['environment']['device']}, k_max {report['k_max']}: no-grad settle time",
             (f"{'halting':>7} {'tol':>5} {'loop':>9} {'compiled':>8} {'graph':>5} {'ms':>9} {'mean K':>7} {'m':>6} "
              f"{'work':>6} {'vs off':>7} {'m+0.15':>7}")]
    for r in report["rows"]:
        bound = "-" if r["bound"] is None else f"{r['bound']:.3f}"
        work = "-" if r["work"] is None else f"{r['work']:.3f}"
        lines.append(f"{r['halting']!s:>7} {r['tol']:>5} {r['loop']:>9} {r['compile_step']!s:>8} "
                     f"{r['cuda_graph']!s:>5} {r['ms']:>9.2f} {r['mean_k']:>7.2f} {r['m']:>6.3f} {work:>6} "
                     f"{r['time_vs_off']:>7.3f} {bound:>7}")
    return "\n".join(lines)
