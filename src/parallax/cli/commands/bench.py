"""Benchmarks, one sub-action each.

  memory      training-step memory at several depths K: bytes saved for backward (any device)
              and peak allocated memory (CUDA). The model comes from --config and --set, as
              for ``parallax train``.
  throughput  every model at matched sizes: training tokens/s, achieved TFLOP/s (every
              iteration counted, the no-grad ones too) as a fraction of the device's measured
              matmul ceiling, peak memory, inference tokens/s; the device ceilings first.
  halting     the CWS's no-grad settling loop with halting off and on (reference and compact
              loops, several tolerances): time against the mean K / k_max it reached.

Examples:
  parallax bench memory --model cws --k 8 24 48 --device cuda --json memory.json
  parallax bench throughput --json throughput.json
  parallax bench throughput --models transformer cws --dim 256 --set cws.k_max=48
  parallax bench halting --json halting.json
"""

from __future__ import annotations

import json
from pathlib import Path

from parallax.cli.commands import only_sections, positive_float

HELP = "measure the models (memory per depth K, throughput)"


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

    from parallax.bench.throughput import DEFAULT_MODELS, ThroughputConfig
    from parallax.config import COMPILE_MODES

    d = ThroughputConfig()
    tp = actions.add_parser("throughput", help="training and inference speed of every model, beside the device ceilings")
    tp.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="models to measure, in order")
    tp.add_argument("--dim", type=int, default=d.dim, help="model width of every model")
    tp.add_argument("--seq", type=int, default=d.seq, help="training sequence length (and context)")
    tp.add_argument("--batch", type=int, default=d.batch, help="training batch size")
    tp.add_argument("--vocab", type=int, default=d.vocab, help="vocabulary size of the random tokens")
    tp.add_argument("--warmup", type=int, default=d.warmup,
                    help="untimed training steps after the first (timed alone: it compiles)")
    tp.add_argument("--steps", type=int, default=d.steps, help="timed training steps (median reported)")
    tp.add_argument("--gen-batches", type=int, nargs="+", default=list(d.gen_batches), help="inference batch sizes")
    tp.add_argument("--prompt", type=int, default=d.prompt, help="prompt tokens before generation")
    tp.add_argument("--gen-tokens", type=int, default=d.gen_tokens, help="new tokens per generation")
    tp.add_argument("--gen-repeats", type=int, default=d.gen_repeats, help="timed generations (median reported)")
    tp.add_argument("--gen-cuda-graph", action="store_true",
                    help="decode each token by one CUDA graph replay (models with a cache; CUDA only)")
    tp.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    tp.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                    help="torch.compile mode with --compile (reduce-overhead: CUDA graphs of the step)")
    tp.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp32"],
                    help="auto: bf16 autocast on CUDA, fp32 on CPU")
    tp.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    tp.add_argument("--set", dest="overrides", action="append", default=[], metavar="MODEL.KEY=VALUE",
                    help="change a matched config, e.g. --set cws.k_max=48 (repeatable)")
    tp.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON (after every model)")
    tp.set_defaults(action_handler=run_throughput)

    from parallax.bench.halting import DEFAULT_TOLERANCES

    hp = actions.add_parser("halting", help="CWS no-grad loop time with halting off and on")
    for flag, default, what in (("--dim", d.dim, "model width"), ("--seq", d.seq, "sequence length"),
                                ("--batch", d.batch, "batch size"), ("--vocab", d.vocab, "vocabulary size"),
                                ("--warmup", d.warmup, "untimed calls first"),
                                ("--steps", d.steps, "timed calls (median reported)")):
        hp.add_argument(flag, type=int, default=default, help=what)
    hp.add_argument("--tolerances", type=positive_float, nargs="+", default=list(DEFAULT_TOLERANCES), help="halt_tol values")
    hp.add_argument("--no-compile", action="store_true", help="skip the compiled (compile_step) rows")
    hp.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp32"])
    hp.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    hp.add_argument("--set", dest="overrides", action="append", default=[], metavar="cws.KEY=VALUE",
                    help="change the matched CWS config, e.g. --set cws.k_max=48 (repeatable)")
    hp.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    hp.set_defaults(action_handler=run_halting)


def run(args) -> int:
    return args.action_handler(args)


def run_memory(args) -> int:
    from parallax.bench.memory import training_memory
    from parallax.config import build_run_config, load_toml
    from parallax.errors import ConfigError
    from parallax.train.runtime import resolve_device

    if any(k < 1 for k in args.k):
        raise ConfigError("every --k must be >= 1")
    raw = load_toml(args.config) if args.config else {}
    overrides = list(args.overrides)
    if args.model:
        overrides.insert(0, f"model.name={args.model}")
    cfg = build_run_config(raw, overrides)
    device = str(resolve_device(args.device))
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


def run_throughput(args) -> int:
    from parallax.bench.throughput import ThroughputConfig, format_table
    from parallax.bench.throughput import run_throughput as measure

    only_sections(args.overrides, args.models, "bench throughput")  # another model's would be ignored
    tc = ThroughputConfig(
        models=tuple(args.models), dim=args.dim, seq=args.seq, batch=args.batch, vocab=args.vocab,
        warmup=args.warmup, steps=args.steps, gen_batches=tuple(args.gen_batches), prompt=args.prompt,
        gen_tokens=args.gen_tokens, gen_repeats=args.gen_repeats, gen_cuda_graph=args.gen_cuda_graph,
        compile=args.compile,
        compile_mode=args.compile_mode, precision=args.precision, device=args.device, overrides=tuple(args.overrides),
    )
    report = measure(tc, args.json)
    print(format_table(report))
    return 1 if any("error" in row for row in report["rows"]) else 0


def run_halting(args) -> int:
    from parallax.bench.halting import format_halting
    from parallax.bench.halting import run_halting as measure
    from parallax.bench.throughput import ThroughputConfig

    only_sections(args.overrides, ("cws",), "bench halting")  # it builds the CWS alone
    tc = ThroughputConfig(
        models=("cws",), dim=args.dim, seq=args.seq, batch=args.batch, vocab=args.vocab, warmup=args.warmup,
        steps=args.steps, precision=args.precision, device=args.device, overrides=tuple(args.overrides),
        prompt=1, gen_tokens=1,  # no generation here
    )
    report = measure(tc, tuple(args.tolerances), compile_step=not args.no_compile)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(format_halting(report))
    return 0
