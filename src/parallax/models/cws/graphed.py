"""The fixed-K no-grad iterations replayed from a CUDA graph (``CWSConfig.cuda_graph``).

With halting off, the no-grad part of ``settle`` (all k_max iterations in evaluation, the
first k_max - live_steps in training) has static shapes and never reads a value back to the
host. One workspace step is captured once and replayed for every iteration: one launch
instead of the step's many small kernels, which is what the eager loop and the compiled step
are bound by at d 512 (see BENCHMARKS.md). The halting monitor observes each replay's raw
logits as in the plain loop (``no_grad_prefix``). A graph of one step, not of the whole loop,
keeps memory independent of K: a capture of all iterations at once peaked higher with every
iteration captured (297 / 337 / 376 MiB at K = 8 / 24 / 48 in one training step, H200).

What a replay reads must live at fixed addresses: the starting state and the token context
are copied into buffers owned by the graph, and the weights are read where they are, so a
graph is keyed by the addresses of the weights as well as by every shape (an optimizer's
in-place update keeps them; ``model.to(...)`` or loading new tensors makes a new graph).
Autocast's weight-cast cache is turned off inside, so every replay casts the current weights
(a cached cast would be a tensor of the capture's step). A few graphs are kept per
workspace, the oldest dropped first.

Not used while ``torch.compile`` traces the model (the whole forward is then one compiled
graph, and ``mode="reduce-overhead"`` gives it CUDA graphs), nor in incremental decoding,
whose probe keys grow by one position per token and would need a graph per length.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from parallax.models.cws.halting import HaltMonitor
from parallax.models.cws.pool import ExpertPool, TokenContext

GRAPHS_PER_WORKSPACE = 4
WARMUP_RUNS = 3  # on a side stream before capture: compilation, cuBLAS workspaces, allocator

_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def usable(h: Tensor, context: TokenContext) -> bool:
    """Whether this settle call can replay a graph: CUDA, not under torch.compile, and a
    context without a cache prefix (keys of as many positions as there are tokens)."""
    if not h.is_cuda or torch.compiler.is_compiling():
        return False
    return context.probe_kv is None or context.probe_kv[0].shape[2] == h.shape[1]


def no_grad_prefix(step: Callable, pool: ExpertPool, context: TokenContext, monitor: HaltMonitor,
                   h: Tensor, cum: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Iterations 1..``iterations`` with halting off, each step launched on its own."""
    for k in range(1, iterations + 1):
        h, cum, raw = step(h, cum, pool, context)
        monitor.observe(k, raw)
    return h, cum


def graphed_prefix(step: Callable, workspace, pool: ExpertPool, context: TokenContext, monitor: HaltMonitor,
                   h: Tensor, cum: Tensor, iterations: int, step_name: str) -> tuple[Tensor, Tensor]:
    """``no_grad_prefix`` with iterations 2.. replayed from a CUDA graph of one step.

    The first iteration runs as it is: under autocast it turns an fp32 h_0 into the bf16 state
    the other iterations take, and the graph is captured for those. ``step_name`` tells eager
    and compiled steps apart in the key (both are capturable).
    """
    h, cum = no_grad_prefix(step, pool, context, monitor, h, cum, 1)
    if iterations == 1:
        return h, cum
    weights = tuple(p.data_ptr() for p in (*workspace.parameters(), *pool.parameters()))
    tensors = [h, cum, *_context_tensors(context)]
    autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    key = (step_name, autocast, weights, workspace.config.read,
           tuple((t.shape, t.dtype, t.device) for t in tensors), tuple(context.fixed), context.grounding is None)
    cache = _graphs.setdefault(workspace, OrderedDict())
    graph = cache.get(key)
    if graph is None:
        graph = _CapturedStep(step, pool, context, h, cum)
        cache[key] = graph
        while len(cache) > GRAPHS_PER_WORKSPACE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return graph.iterate(context, monitor, h, cum, range(2, iterations + 1))


def _context_tensors(context: TokenContext) -> list[Tensor]:
    out = [context.observation, *context.fixed.values(), *(context.probe_kv or ())]
    return out + ([] if context.grounding is None else [context.grounding])


class _CapturedStep:
    """One captured workspace step, reading its input buffers and writing its outputs."""

    def __init__(self, step, pool, context, h, cum):
        self.h, self.cum = h.clone(), cum.clone()
        self.context = TokenContext(
            observation=context.observation.clone(),
            grounding=None if context.grounding is None else context.grounding.clone(),
            fixed={name: x.clone() for name, x in context.fixed.items()},
            probe_kv=None if context.probe_kv is None else tuple(x.clone() for x in context.probe_kv),
        )
        dtype = torch.get_autocast_dtype("cuda")
        enabled = torch.is_autocast_enabled("cuda")

        def run():
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                return step(self.h, self.cum, pool, self.context)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.h_next, self.cum_next, self.raw = run()

    def iterate(self, context, monitor, h, cum, iterations: range):
        """Replay the step for each of ``iterations`` from (h, cum); the monitor observes each."""
        for buffer, x in zip([self.h, self.cum, *_context_tensors(self.context)], [h, cum, *_context_tensors(context)]):
            buffer.copy_(x)
        for k in iterations:
            self.graph.replay()
            monitor.observe(k, self.raw)  # keeps copies, never the buffer itself
            self.h.copy_(self.h_next)
            self.cum.copy_(self.cum_next)
        return self.h.clone(), self.cum.clone()
