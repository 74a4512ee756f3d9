"""Training memory as a function of test-time depth K.

The claim under test (CWS overview, section 04): with K - live_steps iterations under
no_grad, a training step's memory does not grow with K. Two measures of one training step
(forward + backward on one batch):

* ``saved_bytes``: bytes autograd saves for backward, counted with saved-tensor hooks. It
  is exact, device-independent, and what the no-grad contract is about.
* ``peak_bytes``: ``torch.cuda.max_memory_allocated`` over the step (CUDA only), which also
  counts parameters, gradients and transient buffers.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Callable

import torch
from torch import Tensor

from parallax.config import RunConfig
from parallax.errors import ConfigError


def saved_tensor_bytes(loss_fn: Callable[[], Tensor]) -> int:
    """Run ``loss_fn`` (returns a scalar loss), backpropagate, return bytes saved for backward."""
    total = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    loss.backward()
    return total


def training_memory(
    cfg: RunConfig, depths: list[int], *, depth_key: str = "k_max", device: str = "cpu"
) -> list[dict]:
    """One row per depth: ``{depth_key: K, "saved_bytes": int, "peak_bytes": int | None}``.

    The model and batch come from ``cfg`` (vocabulary and sequence length from its data
    source, batch size from ``cfg.train``); ``depth_key`` names the config field set to each K
    on the built model before its step.
    """
    from parallax.data import build_data
    from parallax.data.batch import batch_generator
    from parallax.models import build_model

    if not any(f.name == depth_key for f in dataclasses.fields(cfg.model)):
        raise ConfigError(f"model {cfg.model_name!r} has no config key {depth_key!r} to vary")
    if typing.get_type_hints(type(cfg.model))[depth_key] is not int:
        raise ConfigError(f"{depth_key} is not a depth (an int) of model {cfg.model_name!r}")
    source = build_data(cfg.data)
    model_cfg = dataclasses.replace(
        cfg.model,
        vocab_size=cfg.model.vocab_size or source.vocab_size,
        max_seq_len=cfg.model.max_seq_len or source.seq_len,
    )
    torch.manual_seed(cfg.train.seed)
    model = build_model(model_cfg).to(device).train()
    generator = batch_generator(cfg.train.seed, "train", 0)
    batch = source.batch("train", cfg.train.batch_size, generator).to(device)
    cuda = torch.device(device).type == "cuda"
    rows = []
    for depth in depths:
        setattr(model.config, depth_key, depth)
        validate = getattr(model.config, "validate", None)
        if validate is not None:
            try:
                validate()
            except ValueError as exc:
                raise ConfigError(f"{depth_key}={depth} gives an invalid model config: {exc}") from None
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        saved = saved_tensor_bytes(
            lambda: model(batch.input_ids, targets=batch.targets, loss_mask=batch.loss_mask).loss
        )
        peak = None
        if cuda:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        rows.append({depth_key: depth, "saved_bytes": saved, "peak_bytes": peak})
    return rows
