"""Benchmarks, one sub-action each.

  memory   training-step memory at several depths K: bytes saved for backward (any device)
           and peak allocated memory (CUDA). The model comes from --config and --set, as
           for ``parallax train``.

Example:
  parallax bench memory --model cws --k 8 24 48 --device cuda --json memory.json
"""

from __future__ import annotations

import json
from pathlib import Path

HELP = "measure the models (memory per depth K, ...)"


def add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    memory = actions.add_parser("memory", help="training memory at each depth K")
    memory.add_argument("--model", default=None, help="model name (default: the config's, else cws)")
    memory.add_argument("--config", default=None, help="TOML run config to start from")
    memory.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, e.g. --set model.d_model=256 (repeatable)")
    memory.add_argument("--k", type=int, nargs="+", default=[8, 24, 48], help="depths to measure")
    memory.add_argument("--depth-key", default="k_max", help="model config field that holds the depth")
    memory.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    memory.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    memory.set_defaults(action_handler=run_memory)


def run(args) -> int:
    return args.action_handler(args)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_memory(args) -> int:
    from parallax.bench.memory import training_memory
    from parallax.config import build_run_config, load_toml
    from parallax.errors import ConfigError

    if any(k < 1 for k in args.k):
        raise ConfigError("every --k must be >= 1")
    raw = load_toml(args.config) if args.config else {}
    overrides = list(args.overrides)
    if args.model:
        overrides.insert(0, f"model.name={args.model}")
    cfg = build_run_config(raw, overrides)
    device = _device(args.device)
    rows = training_memory(cfg, list(args.k), depth_key=args.depth_key, device=device)
    print(f"{cfg.model_name} on {device}, batch {cfg.train.batch_size}")
    print(f"{args.depth_key:>8}  {'saved for backward':>20}  {'peak allocated':>16}")
    for row in rows:
        peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.1f} MiB"
        print(f"{row[args.depth_key]:>8}  {row['saved_bytes'] / 2**20:>16.2f} MiB  {peak:>16}")
    if args.json:
        report = {"model": cfg.model_name, "device": device, "config": cfg.to_dict(), "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
