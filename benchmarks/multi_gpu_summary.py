"""Summarise benchmarks/multi_gpu.sh: tokens/s, peak memory and the loss curve of every run.

Tokens/s is the median over the logged windows after the first two (they hold the warm-up).
No window holds an evaluation or a checkpoint only because multi_gpu.sh evaluates and saves
at the last step alone; with other settings the median would mix them in. A run whose
.train.json is empty (it crashed or was killed) is reported as failed and left out.

    python benchmarks/multi_gpu_summary.py OUT_DIR --json OUT_DIR/summary.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from parallax.train.metrics_log import read_metrics


def summarise(run_dir: Path) -> dict:
    summary = json.loads(run_dir.with_suffix(".train.json").read_text())
    train_rows = [r for r in read_metrics(run_dir) if "train_tokens_per_s" in r]
    return {
        "tokens_per_s": statistics.median(r["train_tokens_per_s"] for r in train_rows[2:]),
        "peak_memory_gib": (summary.get("peak_memory_bytes") or 0) / 2**30,
        "parameters": summary["parameters"],
        "train_loss": {r["step"]: r["train_loss"] for r in train_rows},
        "val_loss": summary["eval"].get("loss"),
    }


def collect(out: Path) -> tuple[dict[str, dict], list[str]]:
    """Every run under ``out`` (``MODEL/RUN.train.json`` beside ``MODEL/RUN/``): the summaries
    of the finished ones, and the names of those whose .train.json is empty."""
    runs, failed = {}, []
    for train_json in sorted(out.glob("*/*.train.json")):
        run_dir = train_json.with_name(train_json.name.removesuffix(".train.json"))
        name = f"{run_dir.parent.name}/{run_dir.name}"
        if train_json.read_text().strip():
            runs[name] = summarise(run_dir)
        else:
            failed.append(name)
    return runs, failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--json", type=Path, help="write the summary here")
    args = p.parse_args()
    runs, failed = collect(args.out)
    for name in failed:
        print(f"{name:30s} failed: its .train.json is empty")
    for name, r in runs.items():
        last = max(r["train_loss"])
        print(f"{name:30s} {r['tokens_per_s']:>12,.0f} tok/s   peak {r['peak_memory_gib']:5.2f} GiB   "
              f"train loss at {last}: {r['train_loss'][last]:.4f}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
