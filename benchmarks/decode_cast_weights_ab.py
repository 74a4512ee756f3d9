"""Graphed decoding under bf16 autocast with the weights cast once per generation (as
``generate`` does) and cast at every replay (``GraphedStep`` without casts), alternated in one
process, two rounds, for the throughput benchmark's matched transformer and CWS::

    PYTHONPATH=src python benchmarks/decode_cast_weights_ab.py out.json   # CUDA only
"""

import json
import sys
import time

import torch

import parallax.generation as generation
from parallax.bench.throughput import ThroughputConfig, matched_configs, measure_inference, resolve
from parallax.models import build_model
from parallax.models.cast_weights import autocast_weights


def main(out: str) -> None:
    config = ThroughputConfig(gen_cuda_graph=True, gen_repeats=3)
    device, dtype = resolve(config)
    configs = matched_configs(config)
    rows = []
    for name in ("transformer", "cws"):
        torch.manual_seed(0)
        model = build_model(configs[name]).to(device)
        for round_ in range(2):
            for casts in (True, False):
                generation.autocast_weights = autocast_weights if casts else (lambda *args: None)
                for batch in (1, 64):
                    result = measure_inference(model, config, device, dtype, batch)
                    rows.append(dict(model=name, casts=casts, round=round_, **result))
                    print(name, "once" if casts else "every replay", batch, f"{result['tokens_per_s']:.0f} tokens/s")
        del model
    generation.autocast_weights = autocast_weights
    with open(out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=rows), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
