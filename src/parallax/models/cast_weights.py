"""Linear weights cast to autocast's dtype once, for CUDA graphs to read at every replay.

Under autocast every ``F.linear`` (and every matrix product of a Linear's weight) casts its
fp32 weight and bias to the autocast dtype. Eager code can cache those casts (autocast's
weight-cast cache); a captured step cannot (a cached cast would be a tensor of the capture,
see ``graph_step.uncached_autocast``), so each replay would cast every weight again: about 15
small kernels per CWS iteration (some 20 us of a 150 us iteration on a small working set,
H200: BENCHMARKS.md), and in a decoding step at batch 1, which reads each weight once, four
times the weights' bf16 bytes (the cast's fp32 read and bf16 write, then the bf16 read).

``CastWeights`` keeps the casts in tensors of its own instead: captures read them in place of
the weights (``swapped``), and ``refresh`` casts the weights as they are now (after an
optimizer step, say) before the next replays: the CWS's iteration graphs once per settle call
(``cws/graphed.py``), a decoding step's graph once per generation (``generation.GraphedStep``).
The values are autocast's own: the same weights rounded the same way. Covered: every
``nn.Linear``, whose weights autocast always casts, and the plain parameters a module names in
its ``matmul_weights`` (the attention probe's per-slot output projection, read by an einsum,
which autocast also casts).

``swapped`` changes the layers themselves, for every thread: while a capture runs (its
warm-up and the capture, on first use of a shape), the model must not run elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

KEPT = 2  # sets of casts kept ready per workspace (a capture holds on to its own)


class CastWeights:
    """The weights and biases of the ``nn.Linear`` layers in ``modules`` (and the parameters
    named by a module's ``matmul_weights``) that autocast would cast to ``dtype``, as ``dtype``
    parameters of their own (no gradient)."""

    def __init__(self, modules: Iterable[nn.Module], dtype: torch.dtype):
        layers = {id(m): m for module in modules for m in module.modules()}
        self.sources = [
            (layer, name, p) for layer in layers.values() for name, p in layer.named_parameters(recurse=False)
            if (isinstance(layer, nn.Linear) or name in getattr(layer, "matmul_weights", ()))
            and p.is_floating_point() and p.dtype != dtype
        ]
        self.casts = [nn.Parameter(p.detach().to(dtype), requires_grad=False) for _, _, p in self.sources]

    def addresses(self) -> tuple[int, ...]:
        """Where the casts live: what a capture that reads them depends on."""
        return tuple(c.data_ptr() for c in self.casts)

    @torch.no_grad()
    def refresh(self) -> None:
        """Cast the weights as they are now (one foreach copy, queued on the current stream)."""
        if self.casts:
            torch._foreach_copy_(self.casts, [p for _, _, p in self.sources])

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside, the layers hold the casts in place of their weights (for a capture to read)."""
        for (layer, name, _), cast in zip(self.sources, self.casts):
            layer._parameters[name] = cast
        try:
            yield
        finally:
            for layer, name, p in self.sources:
                layer._parameters[name] = p


def autocast_weights(modules: list[nn.Module], device_type: str) -> CastWeights | None:
    """``CastWeights`` of ``modules`` for the autocast now in force on ``device_type``, or None
    without autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return CastWeights(modules, torch.get_autocast_dtype(device_type))


def cast_weights_for(modules: list[nn.Module], device_type: str, cache: dict) -> CastWeights | None:
    """The refreshed ``CastWeights`` of ``modules`` under the autocast now in force on
    ``device_type``, or None without autocast. ``cache`` keeps the last ``KEPT``, by autocast
    dtype and the weights' addresses (``model.to(...)`` makes new weights), so the casts stay at
    the same addresses from call to call for the captures that read them."""
    if not torch.is_autocast_enabled(device_type):
        return None
    key = (torch.get_autocast_dtype(device_type), tensor_addresses(modules))
    casts = cache.pop(key, None) or autocast_weights(modules, device_type)
    cache[key] = casts  # the newest last
    while len(cache) > KEPT:
        cache.pop(next(iter(cache)))
    casts.refresh()
    return casts


def tensor_addresses(modules: Iterable[nn.Module]) -> tuple[int, ...]:
    """The addresses of every parameter and buffer of ``modules`` and their submodules, read
    from the modules' own dicts: what a CUDA graph that reads them depends on, looked up at
    every graphed call. ``parameters()`` and ``buffers()`` take 2-3x the host time (generators
    and a memo set per module), a large part of a settle call's start."""
    addresses, stack = [], list(modules)
    while stack:
        module = stack.pop()
        addresses += [t.data_ptr() for t in module._parameters.values() if t is not None]
        addresses += [t.data_ptr() for t in module._buffers.values() if t is not None]
        stack += [m for m in module._modules.values() if m is not None]
    return tuple(addresses)
