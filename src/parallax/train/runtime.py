"""Device, precision and process layout of a training run.

Single-process runs have ``rank 0`` of ``world_size 1`` and ``parallel "none"``;
``distributed.launch`` fills these from torchrun's environment, so the trainer asks the runtime
instead of branching on how it was started.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallax.errors import ConfigError


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None = full fp32
    rank: int = 0
    world_size: int = 1
    parallel: str = "none"  # none | ddp | fsdp; "none" whenever world_size is 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} asks for CUDA, but no CUDA device is available here; "
            "choose cpu (--device cpu, or train.device=cpu in a config)"
        )
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {name!r}")


def single_process_runtime(device: str, precision: str) -> Runtime:
    dev = resolve_device(device)
    return Runtime(dev, resolve_precision(precision, dev))
