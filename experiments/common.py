"""What the depth experiments share: flags, training through the shared trainer, scoring, output.

Each experiment trains with ``parallax.train.train`` into ``OUT/runs/<name>``, reloads the
newest checkpoint with ``parallax.checkpoint.load_run``, scores it with the shared per-token
records (``collect_records`` + ``summarize``: exactly what ``parallax eval`` reports), and writes
``results.json`` and PNG plots into ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from parallax.checkpoint import latest_checkpoint, load_run  # noqa: E402
from parallax.config import RunConfig  # noqa: E402
from parallax.errors import ParallaxError  # noqa: E402
from parallax.eval.records import collect_records, summarize  # noqa: E402
from parallax.models import count_parameters  # noqa: E402
from parallax.train import train  # noqa: E402


def parser(description: str, steps: int) -> argparse.ArgumentParser:
    """Flags every experiment takes; defaults are a tiny CPU run, flags scale it up on a GPU."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, required=True, help="directory for results.json, plots and runs/")
    p.add_argument("--steps", type=int, default=steps, help="training steps per model")
    p.add_argument("--batch", type=int, default=32, help="training batch size")
    p.add_argument("--dim", type=int, default=64, help="model width")
    p.add_argument("--eval-batches", type=int, default=4, help="batches scored per evaluation point")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA) | fp32 | bf16")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every run, e.g. train.lr=1e-3")
    return p


def train_run(args: argparse.Namespace, name: str, spec: dict[str, Any]):
    """Train ``spec`` (a config dict) with the experiment's flags; return (summary, LoadedRun).

    A run directory left by an earlier invocation is reused when its newest checkpoint is at
    ``--steps`` (so plots can be redone without retraining); otherwise the trainer refuses it.
    """
    spec = {**spec, "train": {
        "steps": args.steps, "batch_size": args.batch, "device": args.device, "precision": args.precision,
        "eval_every": args.steps, "save_every": args.steps, "eval_batches": args.eval_batches,
        "progress": False, **spec.get("train", {}),
    }}
    cfg = RunConfig.from_dict(spec, args.overrides)
    run_dir = args.out / "runs" / name
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    if latest_checkpoint(run_dir) is not None:
        run = load_run(run_dir, device=device)
        if run.step == args.steps:
            print(f"reusing {run_dir} (step {run.step})")
            return {"parameters": count_parameters(run.model)}, run
    summary = train(cfg, run_dir)
    return summary, load_run(run_dir, device=device)


def run_main(main: Callable[[], None]) -> None:
    """Run an experiment's ``main``; a user-fixable error is one line on stderr, exit code 1."""
    try:
        main()
    except ParallaxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


def score(run, source, split: str, args: argparse.Namespace) -> dict[str, Any]:
    """Shared metrics of ``run.model`` on ``split`` of ``source``, plus mean run diagnostics."""
    device = next(run.model.parameters()).device
    records = collect_records(
        run.model, source, batches=args.eval_batches, batch_size=args.batch, device=device,
        seed=run.config.train.seed, split=split,
    )
    metrics = summarize(records)
    for key, value in records.run_diagnostics.items():
        metrics[key] = value.tolist()
    return metrics


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
