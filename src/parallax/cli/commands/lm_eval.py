"""Evaluate a run with EleutherAI's lm-evaluation-harness.

The run's newest checkpoint is wrapped as a Hugging Face model (as `parallax export` writes
it) and handed to the harness's HFLM with the run's tokenizer. Any harness task works;
--include-path adds a folder of your own task YAMLs:

  parallax lm-eval runs/ts --tasks hellaswag,arc_easy --limit 200 --device cuda
  parallax lm-eval runs/ts model.k_max=16 --tasks lambada_openai --output k16.json
  parallax lm-eval runs/sort --tasks my_task --include-path tasks/ --batch-size 8

Loglikelihood and multiple-choice tasks batch freely (the harness pads on the right).
Generation tasks pad on the left, which these mask-free models cannot read: run them with
--batch-size 1. The model's context is the run's max_seq_len; longer inputs are cut on the
left by the harness. Needs the extra: pip install 'parallax[eval]'.
"""

from __future__ import annotations

import json
from pathlib import Path

HELP = "evaluate a run on lm-evaluation-harness tasks"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `parallax train`")
    parser.add_argument("overrides", nargs="*", metavar="model.KEY=VALUE", help="test-time config overrides")
    parser.add_argument("--tasks", required=True, help="comma-separated harness task names")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    parser.add_argument("--limit", type=float, help="examples per task (a fraction if < 1)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--include-path", metavar="DIR", help="a folder of extra task YAMLs")
    parser.add_argument("--output", metavar="JSON", help="write the harness results here")
    parser.add_argument("--seed", type=int, default=0)


def evaluate(args) -> dict:
    """The harness's results dict for ``args`` (the parsed command line)."""
    from parallax.errors import ParallaxError
    from parallax.hf import require
    from parallax.hf.export import build_hf_model
    from parallax.train.runtime import resolve_device

    require("lm_eval", "eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = build_hf_model(args.run_dir, args.overrides, str(resolve_device(args.device)))
    if tokenizer is None:
        raise ParallaxError(f"run {args.run_dir!r} has no tokenizer (see `parallax export --help`); the harness needs text")
    # the harness starts an empty context with BOS, else EOS; a task tokenizer may have neither
    prefix = None if tokenizer.bos_token_id is not None or tokenizer.eos_token_id is not None else 0
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, prefix_token_id=prefix)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=args.include_path)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise ParallaxError(f"unknown lm-eval task {missing[0]!r}; `lm-eval ls tasks` lists them (add --include-path for your own)")
    return simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=manager,
        random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
        fewshot_random_seed=args.seed, log_samples=False,
    )


def run(args) -> int:
    results = evaluate(args)
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=str))
        print(f"results  {args.output}")
    return 0
