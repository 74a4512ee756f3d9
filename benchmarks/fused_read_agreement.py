"""In bf16, how many tokens halt at the same K as in fp32, with the fused and the absorbed read.

A small CWS (d 64, 4 heads, 6 slots, k_max 12, untrained) settles 8 x 64 random tokens with
halting on in the compact loop, once in fp32 with the absorbed read (the reference) and in bf16
autocast with each read below; per input: the share of tokens at the reference's K, the mean K
difference, and the states' error on the tokens that agree.

* ``fused``: the Triton kernel (on CUDA; on CPU only with ``TRITON_INTERPRET=1``, whose bf16
  conversion truncates instead of rounding, so its bf16 numbers there are off);
* ``emulated``: the kernel's arithmetic in PyTorch (fp32 inside, rounded where the kernel
  stores), which runs anywhere and reproduced the kernel's eager numbers on an H200;
* ``emulated_raw_fp32``: the same with raw kept in fp32, as the kernel returned it before;
* ``absorbed``: the PyTorch absorbed read.

On CUDA each also runs compiled (``compile_step``); the emulations then with inductor's
``emulate_precision_casts``, without which inductor computes a fused chain of pointwise ops in
fp32 and drops the bf16 roundings the kernel makes when it stores.

    python benchmarks/fused_read_agreement.py out.json [inputs]
"""

import json
import math
import sys

import torch
import torch._inductor.config
import torch.nn.functional as F

from parallax.bench.throughput import environment
from parallax.models import build_model
from parallax.models.cws import CWSConfig
from parallax.models.cws.settle import settle
from parallax.ops import fused_read

VOCAB, BATCH, LENGTH = 24, 8, 64
MODEL = dict(vocab_size=VOCAB, d_model=64, n_heads=4, decoder_heads=2, probe_head_dim=8, mlp_hidden=16,
             siren_hidden=16, ssm_state=4, ssm_chunk=4, k_max=12, decoder_window=4)
HALTING = dict(k_max=12, k_min=1, halting=True, rule="first", tol=0.3, live_steps=0, loop="compact")


def emulated_read(raw_fp32: bool):
    """``fused_read.fused_read`` in PyTorch with the kernel's precision."""

    def read(q, slots, cum, w_k, w_v, decay, base, fixed=None):
        if fixed is not None:  # the kernel reads these slots first, in place
            slots = torch.cat([fixed, slots], dim=1)
        q_slot = torch.einsum("nhe,hed->nhd", q, w_k.to(q.dtype))
        with torch.autocast(q.device.type, enabled=False):
            raw = torch.einsum("nhd,nsd->nhs", q_slot.float(), slots.float()) / math.sqrt(q.shape[-1])
            new_cum = decay * cum.float() + (1.0 - decay) + raw
            weights = (torch.log(1.0 + F.silu(new_cum)) / math.log(base)).to(q_slot.dtype).float()
            mixed = torch.einsum("nhs,nsd->nhd", weights, slots.float()).to(q_slot.dtype)
        read = torch.einsum("nhd,hed->nhe", mixed, w_v.to(q.dtype))
        return raw.to(cum.dtype if raw_fp32 else q.dtype), new_cum.to(cum.dtype), read

    return read


def settled(read: str, ids: torch.Tensor, bf16: bool, compile_step: bool):
    torch.manual_seed(0)
    model = build_model(CWSConfig(**MODEL, read=read)).eval().to(ids.device)
    with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        context = model.pool.token_clocked(model.embed(ids), None)
        return settle(model.workspace, model.pool, context, compile_step=compile_step, **HALTING)


def main(out: str, inputs: int = 4) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernel_read, usable = fused_read.fused_read, fused_read.usable
    variants = {"emulated": emulated_read(raw_fp32=False), "emulated_raw_fp32": emulated_read(raw_fp32=True),
                "absorbed": None}
    if usable(torch.empty(0, device=device)):
        variants = {"fused": kernel_read, **variants}
    report = {**environment(device, torch.bfloat16), "model": MODEL, "halting": HALTING, "rows": []}
    emulate_casts = torch._inductor.config.emulate_precision_casts
    try:
        measure(out, inputs, device, variants, report, kernel_read, usable)
    finally:  # the read and inductor as they were
        fused_read.fused_read, fused_read.usable = kernel_read, usable
        torch._inductor.config.emulate_precision_casts = emulate_casts


def measure(out: str, inputs: int, device, variants: dict, report: dict, kernel_read, usable) -> None:
    """The rows of ``report``, written to ``out`` after each; ``variants`` maps a name to a read
    to put in place of ``fused_read.fused_read`` (None: the absorbed read)."""
    for seed in range(inputs):
        ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(seed)).to(device)
        exact = settled("absorbed", ids, bf16=False, compile_step=False)
        for compile_step in (False, True) if device.type == "cuda" else (False,):
            row = {"input": seed, "compile_step": compile_step}
            for name, read in variants.items():
                torch._dynamo.reset()
                fused_read.fused_read, fused_read.usable = read or kernel_read, (lambda x: True) if read else usable
                torch._inductor.config.emulate_precision_casts = name.startswith("emulated")
                result = settled("absorbed" if read is None else "fused", ids, bf16=True, compile_step=compile_step)
                same = result.k_used == exact.k_used
                error = (result.h[same].float() - exact.h[same]).norm() / exact.h[same].norm()
                row[name] = {"same_k": same.float().mean().item(), "error": error.item(),
                             "mean_k_difference": (result.k_used - exact.k_used).float().mean().item()}
            print(json.dumps(row), flush=True)
            report["rows"].append(row)
            with open(out, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:3]))
