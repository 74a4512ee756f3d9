"""Several processes: process groups, DDP / FSDP2 wrapping, rank-0 checkpoints, relaunching.

The trainer stays the same on one process and on many; everything that depends on the process
layout lives here and is applied to the model from outside:

* ``launch`` reads the layout torchrun leaves in the environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``), opens the process group (nccl on CUDA, gloo on CPU) and closes it again.
* ``wrap_model`` applies DistributedDataParallel or FSDP2 (``fully_shard``) and
  ``gradient_sync`` skips the all-reduce on gradient-accumulation micro-steps.
* Data: every rank draws the same global batch of ``world_size x batch_size`` rows from the
  seeded generator of the step and keeps its own slice (``rank_rows``), so 2 ranks x batch b
  train on exactly the examples of 1 rank x batch 2b.
* Evaluation: every rank scores its share of the validation batches and the per-token records
  are gathered (``gather_records``), so all ranks compute the metrics of one process.
* Checkpoints always hold the full, unsharded model and an ordinary single-process optimizer
  state, written by rank 0, so they load on any number of processes and on CPU.

Model-internal randomness (dropout, EAM masking, the recurrent model's sampled depth) draws
from torch's global RNG, seeded identically on every rank: all ranks of a step sample the same
depth, so none waits on a deeper one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallax.data.batch import Batch
from parallax.errors import ConfigError, ParallaxError
from parallax.eval.records import TokenRecords
from parallax.models.moe import MixtureOfExperts
from parallax.train.runtime import (
    Runtime,
    resolve_device,
    resolve_precision,
    single_process_runtime,
)


def launched_world_size() -> int:
    """How many processes torchrun started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a plain process; readable before and after ``launch``."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def launch(device: str, precision: str, parallel: str) -> Iterator[Runtime]:
    """The run's ``Runtime``; under torchrun with several processes, inside a process group.

    On one process ``parallel`` is ignored, so a run started on several GPUs resumes on one.
    An exception leaving a rank names that rank, since torchrun interleaves every rank's output.
    """
    world = launched_world_size()
    if world == 1:
        yield single_process_runtime(device, precision)
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    runtime = Runtime(dev, resolve_precision(precision, dev), rank, world, "ddp" if parallel == "none" else parallel)
    try:
        yield runtime
    except ParallaxError as exc:
        exc.args = (f"rank {rank}: {exc}",)
        raise
    except BaseException as exc:
        print(f"parallax: rank {rank} of {world} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise
    finally:
        dist.destroy_process_group()


def from_rank0(value: Any, runtime: Runtime) -> Any:
    """Rank 0's ``value`` on every rank (e.g. a run directory named after the clock)."""
    if runtime.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    """The module to train: ``model`` itself, its DDP wrapper, or ``model`` sharded in place.

    FSDP2 shards each of the model's ``shard_units()`` (layers that run once per forward, e.g.
    the transformer's blocks) as its own group, gathered just before the layer runs and freed
    after it, and the rest of the model as one root group, gathered once per forward and
    backward and never inside a model's own loops, whose trip count differs between ranks (CWS
    halting, the recurrent depth). A forward leaves the root's weights gathered (FSDP2's
    default for a root module, made explicit). Routed MoE experts can go unused on a rank,
    which DDP must be told about and FSDP2 cannot reduce; every other model uses all its
    parameters in each step.
    """
    if runtime.parallel == "none":
        return model
    routed = any(isinstance(m, MixtureOfExperts) for m in model.modules())
    if runtime.parallel == "fsdp":
        if routed:
            raise ConfigError(
                "train.parallel=fsdp cannot train routed MoE experts (a rank whose tokens skip an "
                "expert has no gradient to reduce for it); use train.parallel=ddp"
            )
        from torch.distributed.fsdp import fully_shard

        for unit in getattr(model, "shard_units", list)():
            fully_shard(unit)
        return fully_shard(model, reshard_after_forward=False)
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # gradient_as_bucket_view: gradients live in DDP's communication buckets, not in a second copy
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=routed, gradient_as_bucket_view=True
    )


def gradient_sync(train_model: nn.Module, runtime: Runtime, enabled: bool):
    """A context in which backward all-reduces gradients only if ``enabled`` (the last micro-step)."""
    if enabled or runtime.parallel == "none":
        return nullcontext()
    if runtime.parallel == "ddp":
        return train_model.no_sync()
    return _fsdp_sync_off(train_model)


@contextmanager
def _fsdp_sync_off(train_model) -> Iterator[None]:
    train_model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        train_model.set_requires_gradient_sync(True)


def rank_rows(batch: Batch, runtime: Runtime) -> Batch:
    """This rank's rows of a global batch of ``world_size x b`` rows: rows [rank*b, (rank+1)*b)."""
    if runtime.world_size == 1:
        return batch
    b = batch.input_ids.shape[0] // runtime.world_size
    rows = slice(runtime.rank * b, (runtime.rank + 1) * b)
    return Batch(**{f.name: getattr(batch, f.name)[rows] for f in fields(batch)})


@contextmanager
def unsharded(model: nn.Module, runtime: Runtime) -> Iterator[None]:
    """Under FSDP2, the full weights on every rank for the duration: forwards inside gather
    nothing, so ranks can run different numbers of them (uneven shares of the evaluation)."""
    if runtime.parallel != "fsdp":
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    try:
        for group in groups:
            group.set_reshard_after_forward(False, recurse=False)
            group.unshard()
        yield
    finally:
        for group in groups:
            group.reshard()
            group.set_reshard_after_forward(group is not model, recurse=False)


def gather_records(share: TokenRecords | None, batches: int, runtime: Runtime) -> TokenRecords:
    """The records of all ``batches`` on every rank, from each rank's share (None: it had none).

    Tokens are put back in the order of their sequences, as one process collects them, so the
    metrics sum them in the same order; run diagnostics, means over a rank's batches, are
    weighted by its number of batches.
    """
    if runtime.world_size == 1:
        return share
    shares = [None] * runtime.world_size
    dist.all_gather_object(shares, share)
    counts = [len(range(rank, batches, runtime.world_size)) for rank in range(runtime.world_size)]
    counts, shares = zip(*[(n, s) for n, s in zip(counts, shares) if s is not None])
    order = torch.argsort(torch.cat([s.sequence for s in shares]), stable=True)

    def merged(values: Iterable[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(values))[order]

    first = shares[0]
    per_token = ("label", "loss", "correct", "sequence", "position")
    return TokenRecords(
        **{name: merged(getattr(s, name) for s in shares) for name in per_token},
        label_names=first.label_names,
        token_diagnostics={k: merged(s.token_diagnostics[k] for s in shares) for k in first.token_diagnostics},
        run_diagnostics={
            k: sum(n * s.run_diagnostics[k] for n, s in zip(counts, shares)) / batches for k in first.run_diagnostics
        },
    )


def mean_over_ranks(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The mean of a scalar over ranks, so every rank logs and checks the same loss."""
    if runtime.world_size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / runtime.world_size


# -- checkpoints: always the full model and a single-process optimizer state ---------------


def checkpoint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime, cpu_model: Callable[[], nn.Module]
) -> tuple[nn.Module | None, dict | None]:
    """(module holding the full weights, single-process optimizer state) on rank 0, else Nones.

    Collective under FSDP2: every rank must call it. The sharded weights are gathered into
    ``cpu_model()``, an unsharded CPU copy, because checkpoint files are written from a module.
    """
    if runtime.parallel != "fsdp":
        return (model, optimizer.state_dict()) if runtime.is_main else (None, None)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if not runtime.is_main:
        return None, None
    copy = cpu_model()
    copy.load_state_dict(weights)
    return copy, _keyed_by_index(optim)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, runtime: Runtime) -> None:
    """Load a single-process optimizer state, sharding it when the model is under FSDP2."""
    if runtime.parallel != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    keyed = {
        "state": {order[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, keyed, options=StateDictOptions(full_state_dict=True))


def _keyed_by_index(state: dict) -> dict:
    """torch.distributed.checkpoint keys optimizer state by parameter name; ``torch.optim`` by index."""
    order = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[name]: s for name, s in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


# -- `parallax train --nproc N` ---------------------------------------------------------------


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``parallax ARGV`` in ``nproc`` processes under torchrun; its exit code."""
    import subprocess

    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if launched_world_size() > 1:
        raise ConfigError("--nproc starts torchrun itself; do not combine it with torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "parallax", *argv]
    return subprocess.call(cmd)
