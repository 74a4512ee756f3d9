"""CWS on BIND/RECALL: which training contract learns recall, and does K grade with difficulty?

For each variant (k_max, live_steps, ...) this trains the CWS with fixed K (halting off in
training, as the seeds do), then evaluates with per-token halting on at several tolerances:
recall accuracy, mean K on recall vs easy tokens, per-label statistics. One JSON file per run,
rewritten after every variant so a timed-out run still leaves its results.

    python benchmarks/cws_bind_recall.py --out results/ --steps 1500 \
        --variant model.k_max=24,model.live_steps=1 --variant model.name=transformer
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from parallax.checkpoint import load_run
from parallax.config import RunConfig
from parallax.eval.kdof import kdof_report
from parallax.eval.records import collect_records
from parallax.models import count_parameters
from parallax.train import train
from parallax.train.metrics_log import read_metrics


def evaluate(run, tolerances: list[float], batches: int, batch_size: int, device: str) -> list[dict]:
    cfg = run.model.config
    points = []
    settings = [(False, None)] + ([(True, t) for t in tolerances] if hasattr(cfg, "halt_tol") else [])
    for halting, tol in settings:
        if hasattr(cfg, "halting"):
            cfg.halting = halting
        if tol is not None:
            cfg.halt_tol = tol
        records = collect_records(
            run.model, run.source, batches=batches, batch_size=batch_size, device=device,
            autocast_dtype=torch.bfloat16 if device == "cuda" else None,
        )
        report = kdof_report(records)
        points.append({
            "halting": halting, "halt_tol": tol, "mean_k": report["mean_k"],
            "accuracy": report["accuracy"], "hard_vs_easy": report["hard_vs_easy"],
            "per_label": report["per_label"], "spearman_k_loss": report["spearman_k_loss"],
        })
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variant", action="append", required=True, help="comma-separated SECTION.KEY=VALUE, e.g. model.k_max=24,model.slots=[2,2,1]")
    p.add_argument("--set", nargs="*", default=[], help="overrides for every variant (section.key=value)")
    p.add_argument("--tolerances", type=float, nargs="*", default=[0.01, 0.02, 0.05, 0.1, 0.2])
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--task", default="bind_recall")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "batch": args.batch, "runs": []}
    out_json = args.out / "cws_bind_recall.json"
    args.out.mkdir(parents=True, exist_ok=True)
    for i, variant in enumerate(args.variant):
        items = [item for item in re.split(r",(?![^\[]*\])", variant) if item]  # commas in [..] stay
        names = [item.split("=", 1)[1] for item in items if item.startswith("model.name=")]
        model = {"name": names[-1] if names else "cws"}
        if model["name"] == "cws":
            model["halting"] = False  # fixed K in training; halting is switched on to evaluate
        overrides = list(args.set) + [item for item in items if not item.startswith("model.name=")]
        cfg = RunConfig.from_dict({
            "model": model,
            "data": {"name": args.task},
            "train": {"steps": args.steps, "batch_size": args.batch, "eval_every": args.steps,
                      "save_every": args.steps, "progress": False, "log_every": 50},
        }, overrides)
        run_dir = args.out / f"run{i}"
        start = time.perf_counter()
        summary = train(cfg, run_dir)
        seconds = time.perf_counter() - start
        run = load_run(run_dir, device=device)
        tokens = args.steps * args.batch * run.source.seq_len
        entry = {"variant": variant, "overrides": overrides, "parameters": count_parameters(run.model),
                 "train_seconds": seconds, "train_tokens_per_s": tokens / seconds,
                 "final": summary,
                 "train_loss": [(r["step"], round(r["train_loss"], 4)) for r in read_metrics(run_dir)
                                if "train_loss" in r and r["step"] % 150 == 0], "eval": evaluate(run, args.tolerances, args.eval_batches, 256, device)}
        results["runs"].append(entry)
        out_json.write_text(json.dumps(results, indent=1, default=str))
        fixed = entry["eval"][0]
        print(f"[{variant}] {seconds:.0f}s params={entry['parameters']} acc={fixed['accuracy']:.3f} "
              f"per label={ {k: round(v['accuracy'], 3) for k, v in fixed['per_label'].items()} }", flush=True)
        for pt in entry["eval"][1:]:
            he = pt["hard_vs_easy"]
            print(f"    tol={pt['halt_tol']}: acc={pt['accuracy']:.3f} mean_k={pt['mean_k']:.2f} "
                  f"hard_k={he['hard_mean_k']} easy_k={he['easy_mean_k']} "
                  f"recall_acc={ {k: round(v['accuracy'], 3) for k, v in pt['per_label'].items() if k.startswith('recall')} }",
                  flush=True)


if __name__ == "__main__":
    main()
