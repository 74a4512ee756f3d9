"""Where a compiled training step spends its GPU time: the top kernels of three profiled steps.

The model is `parallax bench throughput`'s matched config (d 512, T 512, batch 32, bf16), after
four untimed steps; the table is torch.profiler's, sorted by each kernel's own device time.

    PYTHONPATH=src python benchmarks/profile_step.py transformer profile.txt
    PYTHONPATH=src python benchmarks/profile_step.py cws profile.txt read=projected
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from parallax.bench.throughput import ThroughputConfig, matched_configs
from parallax.models import build_model

WARMUP_STEPS, PROFILED_STEPS = 4, 3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("out", help="where to write the table")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE changes to the matched config")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA device")
    tc = ThroughputConfig(models=(args.model,), overrides=tuple(f"{args.model}.{kv}" for kv in args.overrides))
    cfg = matched_configs(tc)[args.model]
    torch.manual_seed(0)
    model = build_model(cfg).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model)
    ids = torch.randint(0, tc.vocab, (tc.batch, tc.seq + 1), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=90)
    with open(args.out, "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
