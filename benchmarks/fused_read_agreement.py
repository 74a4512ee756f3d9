"""In bf16, how many tokens halt at the same K as in fp32, with the fused and the absorbed read.

A small CWS (d 64, 4 heads, 6 slots, k_max 12, untrained) settles 8 x 64 random tokens with
halting on in the compact loop, once in fp32 with the absorbed read (the reference) and in bf16
autocast with each read; per input: the share of tokens at the reference's K, the mean K
difference, and the states' error on the tokens that agree. ``fused_raw_bf16`` is the fused
read with its raw logits rounded to bf16 before the halting monitor sees them, as the absorbed
read's are. On CUDA the loop also runs compiled (``compile_step``); on CPU, set
``TRITON_INTERPRET=1`` so the kernel runs at all (Triton's interpreter, eager only).

    python benchmarks/fused_read_agreement.py out.json [inputs]
"""

import json
import sys

import torch

from parallax.bench.throughput import environment
from parallax.models import build_model
from parallax.models.cws import CWSConfig
from parallax.models.cws.settle import settle
from parallax.ops import fused_read

VOCAB, BATCH, LENGTH = 24, 8, 64
MODEL = dict(vocab_size=VOCAB, d_model=64, n_heads=4, decoder_heads=2, probe_head_dim=8, mlp_hidden=16,
             siren_hidden=16, ssm_state=4, ssm_chunk=4, k_max=12, decoder_window=4)
HALTING = dict(k_max=12, k_min=1, halting=True, rule="first", tol=0.3, live_steps=0, loop="compact")


def settled(read: str, ids: torch.Tensor, bf16: bool, compile_step: bool):
    torch.manual_seed(0)
    model = build_model(CWSConfig(**MODEL, read=read)).eval().to(ids.device)
    with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        context = model.pool.token_clocked(model.embed(ids), 0, None)
        return settle(model.workspace, model.pool, context, compile_step=compile_step, **HALTING)


def raw_rounded_to_bf16(kernel_read):
    def read(*args):
        raw, cum, mixed = kernel_read(*args)
        return raw.to(torch.bfloat16).float(), cum, mixed

    return read


def main(out: str, inputs: int = 4) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not fused_read.usable(torch.empty(0, device=device)):
        raise SystemExit("the fused read cannot run here: needs CUDA and triton, or TRITON_INTERPRET=1 on CPU")
    kernel_read = fused_read.fused_read
    report = {**environment(device, torch.bfloat16), "model": MODEL, "halting": HALTING, "rows": []}
    for seed in range(inputs):
        ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(seed)).to(device)
        exact = settled("absorbed", ids, bf16=False, compile_step=False)
        for compile_step in (False, True) if device.type == "cuda" else (False,):
            row = {"input": seed, "compile_step": compile_step}
            for name, read in (("fused", "fused"), ("absorbed", "absorbed"), ("fused_raw_bf16", "fused")):
                torch._dynamo.reset()
                fused_read.fused_read = raw_rounded_to_bf16(kernel_read) if name == "fused_raw_bf16" else kernel_read
                result = settled(read, ids, bf16=True, compile_step=compile_step)
                same = result.k_used == exact.k_used
                error = (result.h[same].float() - exact.h[same]).norm() / exact.h[same].norm()
                row[name] = {"same_k": same.float().mean().item(), "error": error.item(),
                             "mean_k_difference": (result.k_used - exact.k_used).float().mean().item()}
            fused_read.fused_read = kernel_read
            print(json.dumps(row), flush=True)
            report["rows"].append(row)
            with open(out, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:3]))
