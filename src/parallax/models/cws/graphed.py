"""No-grad workspace steps replayed from CUDA graphs (``CWSConfig.cuda_graph``).

An eager step launches a few hundred small kernels and a compiled one still dozens, each
paying the host's launch time; at d 512 that, not the GPU, bounds the loop (BENCHMARKS.md).
A captured step is one launch. Every no-grad iteration of ``settle`` can use one:

* halting off (all k_max iterations in evaluation, the first k_max - live_steps in
  training): the same shapes every iteration, so one graph serves all of them (two under
  autocast: iteration 1 takes the fp32 h_0, the others bf16 states); also in incremental
  decoding when the pool has no attention probe (then every token has the same shapes);
* halting on, compact loop: the working set shrinks, so its size is padded to one of a few
  dozen buckets (``bucket``) and each bucket has its graph. Halting then saves GPU work
  without paying hundreds of launches for every iteration of a small set.

A graph of one step, replayed per iteration, keeps memory independent of K (a capture of
the whole halting-off loop peaked higher with every iteration captured: 297 / 337 / 376 MiB
at K = 8 / 24 / 48 in one training step, H200). The halting monitor observes each replay's
raw logits eagerly, as in the plain loops.

What a replay reads must live at fixed addresses: the state and token context are copied
into buffers owned by the graph (the context once per new context), and the weights are
read where they are, so a graph is keyed by the addresses of the weights and buffers as well
as by every shape, dtype and precision setting (an optimizer's in-place update keeps the
addresses; ``model.to(...)`` or a RoPE table grown for a longer sequence makes new graphs).
Autocast's weight-cast cache is off inside, so every replay casts the current weights (a
cached cast would be a tensor of the capture's step). A workspace's graphs share one memory
pool: their outputs are only valid until the next replay of any of them, and are used at
once. Each graph also keeps its own copy of the inputs: the state and the token context at
its size, so the buckets of one grid hold a few times one full-grid context in all (and each a
copy of the probe's per-sequence keys and values, which are small). Not used while
``torch.compile`` traces the model (``mode="reduce-overhead"`` then gives the whole forward
CUDA graphs), nor in incremental decoding with an attention probe, whose keys grow by one
position per token and would need a graph per length.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from parallax.models.cws.pool import ExpertPool, TokenContext

GRAPHS_PER_WORKSPACE = 64  # the compact loop visits one working-set size per shrink
WARMUP_RUNS = 3  # on a side stream before capture: compilation, cuBLAS workspaces, allocator
BUCKET_STEPS = (1.0, 1.25, 1.5, 1.75)  # working-set sizes: 2^e times one of these
SMALLEST_BUCKET = 64


class _Graphs:
    """A workspace's captured steps, oldest first, sharing one memory pool and the side stream
    their warm-up runs on."""

    def __init__(self):
        self.memory = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream()
        self.steps: OrderedDict = OrderedDict()


_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def usable(h: Tensor, context: TokenContext) -> bool:
    """Whether this settle call can replay graphs: CUDA, not under torch.compile, and a
    context without a cache prefix (keys of as many positions as there are tokens)."""
    if not h.is_cuda or torch.compiler.is_compiling():
        return False
    return context.probe_kv is None or context.probe_kv[0].shape[2] == h.shape[1]


def bucket(n: int) -> int:
    """The size a working set of ``n`` tokens is padded to: the next 2^e x ``BUCKET_STEPS``
    (at least ``SMALLEST_BUCKET``), so at most a fifth of a set is padding and one grid
    needs a few dozen graphs at most."""
    if n <= SMALLEST_BUCKET:
        return SMALLEST_BUCKET
    base = 2 ** (n.bit_length() - 1)
    return next(size for f in (*BUCKET_STEPS, 2.0) if (size := math.ceil(base * f)) >= n)


def graphed_step(step: Callable, workspace, pool: ExpertPool, step_name: str) -> Callable:
    """``step`` replayed from CUDA graphs, one captured per set of input shapes and dtypes.

    The returned outputs are the graph's own buffers: the next call of any of this
    workspace's graphs overwrites them, so use them (or copy them) at once. ``step_name``
    tells eager and compiled steps apart (both are capturable).
    """
    graphs = _graphs.get(workspace)
    if graphs is None:
        graphs = _graphs[workspace] = _Graphs()
    # what stays fixed through one settle call, looked up once per call rather than per step:
    # the addresses of parameters and buffers (RoPE tables are replaced when a longer sequence
    # comes) and the precision settings
    fixed = (
        step_name, workspace.config.read,
        tuple(t.data_ptr() for m in (workspace, pool) for t in (*m.parameters(), *m.buffers())),
        torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
        torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
    )

    def call(h: Tensor, cum: Tensor, _pool: ExpertPool, context: TokenContext):
        tensors = [h, cum, *_context_tensors(context)]
        key = (fixed, context.grid, tuple(context.fixed), context.grounding is None,
               tuple((t.shape, t.dtype, t.device) for t in tensors))
        captured = graphs.steps.get(key)
        if captured is None:
            captured = graphs.steps[key] = _CapturedStep(step, pool, context, h, cum, graphs)
            while len(graphs.steps) > GRAPHS_PER_WORKSPACE:
                graphs.steps.popitem(last=False)
        graphs.steps.move_to_end(key)
        return captured.run(h, cum, context)

    return call


def _context_tensors(context: TokenContext) -> list[Tensor]:
    out = [context.observation, *context.fixed.values(), *(context.probe_kv or ())]
    return out + [x for x in (context.grounding, context.rows) if x is not None]


class _CapturedStep:
    """One captured workspace step, reading its input buffers and writing its outputs."""

    def __init__(self, step, pool, context, h, cum, graphs: _Graphs):
        self.h, self.cum = h.clone(), cum.clone()
        self.context = TokenContext(
            observation=context.observation.clone(),
            grounding=None if context.grounding is None else context.grounding.clone(),
            fixed={name: x.clone() for name, x in context.fixed.items()},
            probe_kv=None if context.probe_kv is None else tuple(x.clone() for x in context.probe_kv),
            rows=None if context.rows is None else context.rows.clone(),
            grid=context.grid,
        )
        self.source = weakref.ref(context)  # the context now in the buffers
        dtype = torch.get_autocast_dtype("cuda")
        enabled = torch.is_autocast_enabled("cuda")

        def run():
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                return step(self.h, self.cum, pool, self.context)

        graphs.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(graphs.side):
            for _ in range(WARMUP_RUNS):
                run()
        torch.cuda.current_stream().wait_stream(graphs.side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=graphs.memory):
            self.outputs = run()

    def run(self, h: Tensor, cum: Tensor, context: TokenContext) -> tuple[Tensor, Tensor, Tensor]:
        if self.source() is not context:  # a new context: copied once, then reused every iteration
            for buffer, x in zip(_context_tensors(self.context), _context_tensors(context)):
                buffer.copy_(x)
            self.source = weakref.ref(context)
        self.h.copy_(h)
        self.cum.copy_(cum)
        self.graph.replay()
        return self.outputs
