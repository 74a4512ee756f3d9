"""Evaluate a trained run on fixed validation batches.

Prints loss and accuracy (overall, whole-sequence, and per difficulty label); for text,
perplexity and bits per byte; for models that report per-token compute (cws, recurrent),
the K-DOF analysis: K per label, the hard/easy K ratio, the Spearman correlation of K with
loss, and a compute-quality curve, with PNG plots written next to the run.

    parallax eval runs/cws
    parallax eval runs/cws --json > metrics.json
    parallax eval runs/cws model.k_max=48          # a test-time knob changed for this eval
    parallax eval runs/cws --report report.html    # one self-contained page: metrics, plots, per-token K
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from parallax.cli.commands import only_sections, positive_int

HELP = "evaluate a run: metrics, K-DOF analysis and plots"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="test-time overrides, e.g. model.k_max=48")
    parser.add_argument("--batches", type=positive_int, default=8, help="validation batches (default 8)")
    parser.add_argument("--batch-size", type=positive_int, help="default: the run's train.batch_size")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--json", action="store_true", help="print all results as JSON on stdout")
    parser.add_argument("--plots", metavar="DIR", help="where to write PNG plots (default RUN_DIR/eval)")
    parser.add_argument("--no-plots", action="store_true", help="skip the plots")
    parser.add_argument("--report", metavar="HTML", help="also write a self-contained HTML report (metrics, plots, "
                        "and for models that report K a per-token compute explorer)")


def run(args) -> int:
    from parallax.eval.evaluate import evaluate_run

    only_sections(args.overrides, ("model", "data"), "eval")  # a train.* one would be ignored
    results = evaluate_run(
        args.run_dir,
        overrides=list(args.overrides),
        batches=args.batches,
        batch_size=args.batch_size,
        device=args.device,
        plots_dir=None if args.no_plots else Path(args.plots) if args.plots else Path(args.run_dir) / "eval",
    )
    if args.json:
        print(json.dumps(results, indent=2, default=_jsonable))
    else:
        print_results(results)
    if args.report:
        from parallax.eval.report import write_report

        path = write_report(args.report, results, run_dir=args.run_dir, overrides=list(args.overrides),
                            device=args.device)
        print(f"report  {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def print_results(results: dict) -> None:
    m = results["metrics"]
    print(f"run {results['run_dir']}  (step {results['step']}, {results['model']} on {results['data']})")
    print(f"loss {m['loss']:.4f}   token accuracy {m['token_accuracy']:.3f}   sequence accuracy {m['sequence_accuracy']:.3f}   ({m['tokens']} tokens)")
    if "perplexity" in m:
        print(f"perplexity {m['perplexity']:.2f}   bits per byte {m['bits_per_byte']:.4f}")
    for name, stats in m.get("per_label", {}).items():
        print(f"  {name:<16} accuracy {stats['accuracy']:.3f}   loss {stats['loss']:.3f}   ({stats['tokens']} tokens)")
    kdof = results.get("kdof")
    if kdof:
        print(format_kdof(kdof))
    for path in results.get("plots", []):
        print(f"plot  {path}")


def format_kdof(kdof: dict) -> str:
    lines = ["K-DOF"]
    for name, stats in kdof.get("per_label", {}).items():
        lines.append(f"  {name:<16} mean K {stats['mean_k']:6.2f}   median K {stats['median_k']:5.1f}   accuracy {stats['accuracy']:.3f}")
    ratio = kdof.get("hard_vs_easy") or {}
    if ratio.get("ratio") is not None:
        lines.append(f"  hard/easy K  {ratio['hard_mean_k']:.2f} / {ratio['easy_mean_k']:.2f} = {ratio['ratio']:.2f}"
                     f"   ({', '.join(ratio['hard_labels'])} vs {', '.join(ratio['easy_labels'])})")
    if kdof.get("spearman_k_loss") is not None:
        lines.append(f"  Spearman(K, loss) {kdof['spearman_k_loss']:+.3f}")
    bins = [b for b in kdof.get("k_by_surprisal", []) if b["mean_k"] is not None]
    if bins:
        lines.append("  mean K by surprisal decile (low to high): "
                     + " ".join(f"{b['mean_k']:.1f}" for b in bins))
    for point in kdof.get("compute_quality", []):
        knob = "k_max" if "k_max" in point else "tol"
        lines.append(f"  {knob}={point[knob]:<8} mean K {point['mean_k']:6.2f}   accuracy {point['accuracy']:.3f}   loss {point['loss']:.3f}")
    return "\n".join(lines)
