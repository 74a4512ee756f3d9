"""The fused read's kernel against the PyTorch absorbed read it replaces, at the benchmark's size.

One no-grad workspace read of the matched CWS (d 512, 8 heads, 6 slots) for every token of a
training batch (32 x 512), in bf16: first the error of both against an fp32 reference, then the
time of the absorbed read (four einsums and the update), of ``fused_read`` (two weight products
and the kernel, at the module's launch shape), and of the kernel alone for a few chunk widths
and warp counts, with the kernel's bytes over its time against the copy bandwidth measured in
the same run. Last, at decoding's sizes (1 and 64 tokens), the wall time of a call, host
included (what eager decoding pays per iteration): the absorbed read, ``fused_read`` with the
token-clocked slots in a tensor of their own, and with all slots in one.

    python benchmarks/fused_read.py out.json       # CUDA only
"""

import json
import math
import sys
import time

import torch
from triton.testing import do_bench

from parallax.bench.throughput import environment, measure_ceilings
from parallax.ops import fused_read as fr

N, HEADS, HEAD_DIM, SLOTS, DIM = 32 * 512, 8, 64, 6, 512
FIXED = 2  # of the SLOTS, the token-clocked ones (the SSM's), a tensor of their own as in the model
DECAY, BASE = 0.9, 2.0


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(out: str) -> None:
    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(N, HEADS, HEAD_DIM, **bf16)
    fixed, slots = torch.randn(N, FIXED, DIM, **bf16), torch.randn(N, SLOTS - FIXED, DIM, **bf16)
    cum = torch.rand(N, HEADS, SLOTS, device="cuda") + 0.5
    w_k, w_v = (torch.randn(HEADS, HEAD_DIM, DIM, **bf16) / math.sqrt(DIM) for _ in range(2))
    args = (q, slots, cum, w_k, w_v, DECAY, BASE, fixed)
    exact = fr.absorbed_read_reference(*(x.double() if torch.is_tensor(x) else x for x in args))
    device = torch.device("cuda")
    report = {**environment(device, torch.bfloat16),
              "shape": dict(tokens=N, heads=HEADS, head_dim=HEAD_DIM, slots=SLOTS, dim=DIM)}
    for name, read in (("absorbed", fr.absorbed_read_reference), ("fused", fr.fused_read)):
        got = read(*args)
        report[name] = {"errors_raw_cum_read": [relative_error(a, b) for a, b in zip(got, exact)],
                        "ms": do_bench(lambda read=read: read(*args), warmup=50, rep=300)}
    report["fused_vs_absorbed"] = report["fused"]["ms"] / report["absorbed"]["ms"]

    q_slot = torch.einsum("nhe,hed->nhd", q, w_k)
    raw, new_cum, mixed = torch.empty_like(cum), torch.empty_like(cum), torch.empty_like(q_slot)
    moved = sum(x.numel() * x.element_size() for x in (q_slot, fixed, slots, cum, raw, new_cum, mixed))
    report["copy_gbs"] = measure_ceilings(device, torch.bfloat16)["copy_gbps"]
    report["kernel"] = []
    for block_d in (64, 128, 256, 512):
        for warps in (1, 2, 4):
            def launch(block_d=block_d, warps=warps):
                fr._token_read_kernel[(N,)](
                    q_slot, fixed, slots, cum, raw, new_cum, mixed, *q_slot.stride()[:2], *mixed.stride()[:2],
                    DECAY=DECAY, SCALE=1 / math.sqrt(HEAD_DIM), INV_LN_BASE=1 / math.log(BASE), HEADS=HEADS, HEADS_P2=HEADS,
                    FIXED=FIXED, SLOTS=SLOTS, SLOTS_P2=8,
                    DIM=DIM, BLOCK_D=block_d, num_warps=warps)
            ms = do_bench(launch, warmup=50, rep=300)
            row = dict(block_d=block_d, warps=warps, ms=ms, gbs=moved / ms / 1e6)
            row["of_copy"] = row["gbs"] / report["copy_gbs"]
            report["kernel"].append(row)
            print(row, flush=True)
    report["fastest"] = min(report["kernel"], key=lambda row: row["ms"])
    projected_read(report, args, exact)
    report["decode_call_us"] = decode_call_times(q, fixed, slots, cum, w_k, w_v)
    print(json.dumps({k: v for k, v in report.items() if k not in ("kernel", "projected_kernel")}, indent=1))
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


def projected_read(report: dict, args: tuple, exact: tuple) -> None:
    """The projected read (``read="fused_projected"``): the keys and values of the h-clocked slots
    as one product and the kernel in head space, the token-clocked slots' keys and values computed
    beforehand (once per forward in the model, so outside the timing); then the kernel alone at a
    few warp counts, its bytes over its time against the copy bandwidth."""
    q, slots, cum, w_k, w_v, decay, base, fixed = args
    w_kv = torch.cat([w_k.flatten(0, 1), w_v.flatten(0, 1)])
    fixed_kv = fr.slot_keys_values(fixed, w_kv)
    got = fr.fused_projected_read(q, slots, cum, w_kv, decay, base, fixed_kv)
    report["fused_projected"] = {
        "errors_raw_cum_read": [relative_error(a, b) for a, b in zip(got, exact)],
        "ms": do_bench(lambda: fr.fused_projected_read(q, slots, cum, w_kv, decay, base, fixed_kv), warmup=50, rep=300),
        "keys_values_product_ms": do_bench(lambda: fr.slot_keys_values(slots, w_kv), warmup=50, rep=300),
    }
    report["projected_reference_ms"] = do_bench(lambda: fr.projected_read_reference(*args), warmup=50, rep=300)
    report["fused_projected_vs_fused"] = report["fused_projected"]["ms"] / report["fused"]["ms"]
    kv = fr.slot_keys_values(slots, w_kv)
    raw, new_cum, read = torch.empty_like(cum), torch.empty_like(cum), torch.empty_like(q)
    moved = sum(x.numel() * x.element_size() for x in (q, fixed_kv, kv, cum, raw, new_cum, read))
    report["projected_kernel"] = []
    for warps in (1, 2, 4, 8):
        def launch(warps=warps):
            fr._projected_token_read_kernel[(N,)](
                q, fixed_kv, kv, cum, raw, new_cum, read, DECAY=DECAY, SCALE=1 / math.sqrt(HEAD_DIM),
                INV_LN_BASE=1 / math.log(BASE), HEADS=HEADS, HEADS_P2=HEADS, HEAD_DIM=HEAD_DIM, HEAD_DIM_P2=HEAD_DIM,
                FIXED=FIXED, SLOTS=SLOTS, SLOTS_P2=8, num_warps=warps)
        ms = do_bench(launch, warmup=50, rep=300)
        row = dict(warps=warps, ms=ms, gbs=moved / ms / 1e6)
        row["of_copy"] = row["gbs"] / report["copy_gbs"]
        report["projected_kernel"].append(row)
        print(row, flush=True)


def decode_call_times(q, fixed, slots, cum, w_k, w_v, calls: int = 500) -> list[dict]:
    """Microseconds per call, host included, of the reads at decoding's token counts: a call's
    launches are queued back to back and the device waited for once at the end."""
    rows = []
    for n in (1, 64):
        args = (q[:n], slots[:n], cum[:n], w_k, w_v, DECAY, BASE)
        together = torch.cat([fixed[:n], slots[:n]], dim=1)
        reads = {"absorbed": lambda: fr.absorbed_read_reference(*args, fixed[:n]),
                 "fused_two_groups": lambda: fr.fused_read(*args, fixed=fixed[:n]),
                 "fused_one_group": lambda: fr.fused_read(q[:n], together, *args[2:])}
        row = {"tokens": n}
        for name, read in reads.items():
            for _ in range(20):
                read()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                read()
            torch.cuda.synchronize()
            row[name] = (time.perf_counter() - start) / calls * 1e6
        print(row, flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main(sys.argv[1])
