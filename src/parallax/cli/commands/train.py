"""Train a model.

With no --config, --model or --task, trains the default job: the Central Workspace (cws) on
a small BIND/RECALL, about a minute on 2 CPU cores (key=value overrides still apply).
Settings resolve in order: built-in defaults, a TOML preset (--config) or the default job,
the shortcuts below, then key=value overrides, e.g.

    parallax train --model transformer --task sort train.steps=400 model.d_model=64
    parallax train --config configs/cws-mamba.toml --out runs/cws
    parallax train --resume runs/cws train.steps=2000
    parallax train --nproc 2 --model transformer --task sort    # data parallel, 2 processes
    torchrun --nproc-per-node 2 -m parallax train train.parallel=fsdp

Run `parallax models -v` and `parallax tasks -v` for every model.* and data.* key.
"""

from __future__ import annotations

import time
from pathlib import Path

HELP = "train a model (default: cws on bind_recall)"


def add_arguments(parser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.d_model=256 train.steps=500")
    parser.add_argument("--config", metavar="FILE", help="TOML preset (see configs/)")
    parser.add_argument("--model", help="architecture; shortcut for model.name=...")
    parser.add_argument("--task", help="task or data source; shortcut for data.name=...")
    parser.add_argument("--steps", type=int, help="shortcut for train.steps=...")
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/MODEL-TASK-TIMESTAMP)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    parser.add_argument("--device", help="shortcut for train.device=... (auto, cpu, cuda, cuda:N)")
    parser.add_argument("--json", action="store_true", help="print the final summary as JSON on stdout")
    parser.add_argument("--nproc", type=int, metavar="N", help="train data-parallel in N processes (relaunches itself under torchrun)")


def run(args) -> int:
    import json

    from parallax.checkpoint import latest_checkpoint, read_meta
    from parallax.config import DEFAULT_JOB, RunConfig, load_toml
    from parallax.errors import ConfigError
    from parallax.train import resume_config, train
    from parallax.train.distributed import is_main_process, relaunch

    shortcuts = [f"model.name={args.model}"] if args.model else []
    shortcuts += [f"data.name={args.task}"] if args.task else []
    shortcuts += [f"train.steps={args.steps}"] if args.steps is not None else []
    shortcuts += [f"train.device={args.device}"] if args.device else []
    overrides = shortcuts + list(args.overrides)
    if args.resume:
        if args.config or args.model or args.task or args.out:
            raise ConfigError("--resume continues a saved run; it takes only train.* overrides, not --config/--model/--task/--out")
        cfg = resume_config(args.resume, overrides)
        out = Path(args.resume)
        ckpt = latest_checkpoint(out)  # none: train says so
        step = read_meta(ckpt)["step"] if ckpt is not None else 0
        if step >= cfg.train.steps:
            raise ConfigError(f"the run is at step {step} already; give a larger train.steps to continue it")
    else:
        names_given = any(o.startswith(("model.name=", "data.name=")) for o in overrides)
        if args.config:
            raw = load_toml(args.config)
        else:
            raw = {} if args.model or args.task or names_given else DEFAULT_JOB
        cfg = RunConfig.from_dict(raw, overrides)
        out = Path(args.out or f"runs/{cfg.model_name}-{cfg.data_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.nproc is not None:
        return relaunch(args.nproc, relaunch_argv(args, out))
    summary = train(cfg, out, resume=bool(args.resume))
    if not is_main_process():
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 0


def relaunch_argv(args, out: Path) -> list[str]:
    """This command line without --nproc, with the run directory fixed so every rank shares it."""
    argv = ["train", *args.overrides]
    for flag in ("config", "model", "task", "steps", "device"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    argv += ["--resume", str(out)] if args.resume else ["--out", str(out)]
    return argv + (["--json"] if args.json else [])


def print_summary(summary: dict) -> None:
    ev = summary["eval"]
    print(f"run directory   {summary['run_dir']}")
    print(f"steps           {summary['step']}  ({summary['seconds']:.0f} s, {summary['tokens_per_s']:,.0f} tokens/s)")
    print(f"parameters      {summary['parameters']:,}")
    if summary.get("peak_memory_bytes") is not None:
        print(f"peak memory     {summary['peak_memory_bytes'] / 2**30:.2f} GiB (this process)")
    if ev:
        print(f"val loss        {ev['loss']:.4f}")
        print(f"token accuracy  {ev['token_accuracy']:.3f}   sequence accuracy {ev['sequence_accuracy']:.3f}")
        if "mean_k" in ev:
            print(f"mean K          {ev['mean_k']:.2f}")
        for name, stats in ev.get("per_label", {}).items():
            k = f"   mean K {stats['mean_k']:5.2f}" if "mean_k" in stats else ""
            print(f"  {name:<16} accuracy {stats['accuracy']:.3f}   loss {stats['loss']:.3f}{k}   ({stats['tokens']} tokens)")
