"""Evaluate a run directory: task metrics, text metrics and, where the model reports per-token
compute, the K-DOF analysis with its plots. ``parallax eval`` is a thin layer over this."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from parallax.checkpoint import load_run
from parallax.eval.records import collect_records, summarize
from parallax.train.runtime import resolve_device, resolve_precision


def evaluate_run(
    run_dir: str | Path,
    *,
    overrides: list[str] = (),
    batches: int = 8,
    batch_size: int | None = None,
    device: str = "auto",
    plots_dir: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    dev = resolve_device(device)
    run = load_run(run_dir, device=dev, overrides=list(overrides))
    batch_size = batch_size or run.config.train.batch_size
    autocast = resolve_precision(run.config.train.precision, dev)
    records = collect_records(
        run.model, run.source, batches=batches, batch_size=batch_size, device=dev, seed=seed, autocast_dtype=autocast
    )
    metrics = summarize(records)
    bytes_per_token = getattr(run.source, "bytes_per_token", None)
    if bytes_per_token is not None:
        metrics["perplexity"] = math.exp(metrics["loss"])
        metrics["bits_per_byte"] = metrics["loss"] / math.log(2) / bytes_per_token("val")
    results: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "step": run.step,
        "model": run.config.model_name,
        "data": run.config.data_name,
        "metrics": metrics,
    }
    if "k_used" in records.token_diagnostics:
        from parallax.eval.kdof import compute_quality_curve, kdof_report

        kdof = kdof_report(records)
        curve = []
        if hasattr(run.model.config, "k_max"):
            k_max = run.model.config.k_max
            values = sorted({max(1, k_max // 4), max(1, k_max // 2), k_max, 2 * k_max})
            curve = compute_quality_curve(
                run.model, run.source, k_max_values=values, batches=batches,
                batch_size=batch_size, device=dev, seed=seed,
            )
        kdof["compute_quality"] = curve
        results["kdof"] = kdof
        if plots_dir is not None:
            from parallax.eval.plots import save_kdof_plots

            results["plots"] = [str(p) for p in save_kdof_plots(records, curve, plots_dir)]
    elif plots_dir is not None:
        from parallax.eval.plots import save_training_curves

        results["plots"] = [str(p) for p in save_training_curves(Path(run_dir) / "metrics.jsonl", plots_dir)]
    return results
