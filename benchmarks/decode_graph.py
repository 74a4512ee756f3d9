"""Incremental decoding, eager against one CUDA graph replay per token, for every cached model.

The throughput benchmark's matched models (d 512, random weights, bf16 autocast) decode
``--tokens`` greedy tokens after a 16-token random prompt at batch 1 and 64, in one process:
first whether the graphed tokens equal the eager ones (the share of new positions where every
row agrees, and the first that differs), then tokens/s of each (median of ``--repeats``
generations after a warm-up; the timed span starts after the tokens decoded before the
replays, as in ``parallax bench throughput --gen-cuda-graph``, whose ``prefill_ms`` then also
holds the second token's eager step and the capture). CWS variants too:
``cws_halting`` (the default halting rule and tolerance at k_max 24, eager through the compact
loop, graphed through the masked loop to k_max, so K per token is also compared),
``cws_compile_step`` (the no-grad iterations through ``torch.compile``, fewer kernels per
iteration inside the graph), ``cws_fused`` (``read=fused``) and ``cws_fused_projected``
(``read=fused_projected``).

    python benchmarks/decode_graph.py out.json [--tokens 64] [--repeats 3] [--models ...]   # CUDA only
"""

import argparse
import dataclasses
import json

import torch

from parallax.bench.throughput import ThroughputConfig, environment, matched_configs, measure_inference, resolve
from parallax.generation import generate_batch
from parallax.models import build_model

MODELS = ("transformer", "swap", "recurrent", "cws")
CWS_VARIANTS = {"cws_halting": dict(halting=True), "cws_compile_step": dict(compile_step=True),
                "cws_fused": dict(read="fused"), "cws_fused_projected": dict(read="fused_projected")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--models", nargs="+", default=[*MODELS, *CWS_VARIANTS], choices=[*MODELS, *CWS_VARIANTS])
    args = parser.parse_args()
    tc = ThroughputConfig(models=MODELS, gen_tokens=args.tokens, gen_repeats=args.repeats,
                          gen_batches=tuple(args.batches))
    device, dtype = resolve(tc)
    configs = matched_configs(tc)
    configs.update({name: dataclasses.replace(configs["cws"], **knobs) for name, knobs in CWS_VARIANTS.items()})
    report = {**environment(device, dtype), "tokens": args.tokens, "rows": []}
    for name in args.models:
        cfg = configs[name]
        torch.manual_seed(0)
        model = build_model(cfg).to(device).eval()
        prompt = torch.randint(0, tc.vocab, (max(args.batches), tc.prompt), device=device)
        with torch.autocast("cuda", dtype=dtype):
            eager = generate_batch(model, prompt, args.tokens, temperature=0)
            graphed = generate_batch(model, prompt, args.tokens, temperature=0, cuda_graph=True)
        same = (graphed.new_ids == eager.new_ids).all(dim=0)  # per new position, every row
        row = {"model": name, "same_tokens": same.float().mean().item(),
               "first_difference": None if same.all() else int((~same).nonzero()[0]),
               "same_k": None if eager.k is None else (graphed.k == eager.k).float().mean().item()}
        for graph in (False, True):
            run = dataclasses.replace(tc, gen_cuda_graph=graph)
            row["graph" if graph else "eager"] = [measure_inference(model, run, device, dtype, b) for b in args.batches]
        for b, e, g in zip(args.batches, row["eager"], row["graph"]):
            row[f"speedup_b{b}"] = g["tokens_per_s"] / e["tokens_per_s"]
        print(name, {k: v for k, v in row.items() if k not in ("eager", "graph")},
              [round(r["tokens_per_s"], 1) for r in row["eager"] + row["graph"]], flush=True)
        report["rows"].append(row)
        json.dump(report, open(args.out, "w"), indent=1)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
