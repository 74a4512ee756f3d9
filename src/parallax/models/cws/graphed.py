"""No-grad workspace iterations replayed from CUDA graphs (``CWSConfig.cuda_graph``).

An eager step launches a few hundred small kernels and a compiled one still dozens, each
paying the host's launch time; at d 512 that, not the GPU, bounds the loop (BENCHMARKS.md).
A captured step is one launch. Every no-grad iteration of ``settle`` can use one:

* halting off (all k_max iterations in evaluation, the first k_max - live_steps in
  training): the same shapes every iteration, so one graph of the step serves all of them
  (two under autocast: iteration 1 takes the fp32 h_0, the others bf16 states); also in
  incremental decoding, where every token has the same shapes. The halting monitor observes
  each replay's raw logits eagerly; nothing waits for it, so its launches overlap the GPU's
  work.
* halting on, compact loop (``GraphedIterations``): the whole iteration is captured, the
  step with the monitor, the masks and the active count, since the loop reads that count
  every iteration and would otherwise wait on dozens of launches per iteration. The working
  set shrinks, so its size is padded to one of a few dozen buckets (``bucket``) and each
  bucket has its capture; each shrink from one capture's set to another's is captured too
  (``_CapturedShrink``). Halting then saves GPU work without paying the launches of every
  iteration of a small set.

A graph of one iteration, replayed per iteration, keeps memory independent of K (a capture
of the whole halting-off loop peaked higher with every iteration captured: 297 / 337 / 376
MiB at K = 8 / 24 / 48 in one training step, H200).

What a replay reads must live at fixed addresses: the state and token context are copied
into buffers owned by the graph (the context once per new context; a working set's rows
are gathered straight into them), the halting monitor is one per grid and settings, reset
for each call (``halt_monitor``), and the weights are
read where they are, so a graph is keyed by the addresses of the weights and buffers as well
as by every shape, dtype and precision setting (an optimizer's in-place update keeps the
addresses; ``model.to(...)`` or a RoPE table grown for a longer sequence makes new graphs).
Under autocast, the Linear weights an iteration reads are cast once per settle call into
tensors of their own, which the graphs read (``cast_weights.py``), not at every replay; the
rest of autocast runs inside as it would outside, with its weight-cast cache off (a cached
cast would be a tensor of the capture's step). A workspace's graphs share one memory
pool: their outputs are only valid until the next replay of any of them, and are used at
once. Each graph of an iteration also keeps its own copy of the inputs: the state and the
token context at its size, so the buckets of one grid hold a few times one full-grid context in
all; the probe's per-sequence keys and values (and position), and the workspace's stacked input
weight (``Workspace.prepare``), are the grid capture's, which
a working set's captures read where they are. Not used while
``torch.compile`` traces the model (``mode="reduce-overhead"`` then gives the whole forward
CUDA graphs). In incremental decoding with ``cuda_graph`` the attention probe's keys are the
cache's whole buffers with a mask (``AttentionProbe``), so one graph serves every token.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from parallax.models.cast_weights import CastWeights, cast_weights_for, tensor_addresses
from parallax.models.cws.compact import Iterations, shrunk_rows
from parallax.models.cws.halting import HaltMonitor
from parallax.models.cws.pool import ExpertPool, TokenContext
from parallax.models.graph_step import uncached_autocast

GRAPHS_PER_WORKSPACE = 128  # the compact loop visits one working-set size, and one shrink, per shrink
MONITORS_PER_WORKSPACE = 8  # grids and halting settings whose compact-loop captures stay ready
WARMUP_RUNS = 3  # on a side stream before capture: compilation, cuBLAS workspaces, allocator
BUCKET_STEPS = (1.0, 1.25, 1.5, 1.75)  # working-set sizes: 2^e times one of these
# below this many tokens an iteration costs its kernels' launch latency, not its work, so
# shrinking the set further only adds shrinks (H200: BENCHMARKS.md)
SMALLEST_BUCKET = 512


class _Graphs:
    """A workspace's captures, oldest first, sharing one memory pool and the side stream
    their warm-up runs on, and the halting monitors whose buffers the compact loop's
    captures read."""

    def __init__(self):
        self.memory = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream()
        self.steps: OrderedDict = OrderedDict()
        self.monitors: dict = {}
        self.casts: dict = {}

    def get(self, key):
        """The capture under ``key`` (now the newest), or None."""
        captured = self.steps.get(key)
        if captured is not None:
            self.steps.move_to_end(key)
        return captured

    def holds(self, captured) -> bool:
        """Whether ``captured`` is still among the kept captures (not evicted)."""
        return any(captured is other for other in self.steps.values())

    def keep(self, key, capture: Callable):
        """The capture under ``key``, made by ``capture()`` if there is none; the oldest go
        beyond ``GRAPHS_PER_WORKSPACE``, and with each the shrinks that read its buffers (which
        would otherwise keep it alive, uncounted)."""
        captured = self.get(key)
        if captured is None:
            captured = self.steps[key] = capture()
            while len(self.steps) > GRAPHS_PER_WORKSPACE:
                _, evicted = self.steps.popitem(last=False)
                for other in [k for k, v in self.steps.items() if evicted in getattr(v, "captures", ())]:
                    del self.steps[other]
        return captured

    def capture(self, run: Callable, restore: Callable[[], None] = lambda: None):
        """A CUDA graph of ``run()`` and its outputs, after warm-up runs on the side stream
        (``restore()`` undoes what each changed in place, so each runs from the same state)."""
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            for _ in range(WARMUP_RUNS):
                run()
                restore()
        torch.cuda.current_stream().wait_stream(self.side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory):
            outputs = run()
        return graph, outputs


_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _graphs_of(workspace) -> _Graphs:
    graphs = _graphs.get(workspace)
    if graphs is None:
        graphs = _graphs[workspace] = _Graphs()
    return graphs


def usable(h: Tensor, context: TokenContext) -> bool:
    """Whether this settle call can replay graphs: CUDA, not under torch.compile, and a
    context of static shapes (no attention-probe keys that grow by a cache prefix)."""
    if not h.is_cuda or torch.compiler.is_compiling():
        return False
    probe = context.probe_kv
    return probe is None or context.probe_start is not None or probe[0].shape[2] == h.shape[1]


def bucket(n: int) -> int:
    """The size a working set of ``n`` tokens is padded to: the next 2^e x ``BUCKET_STEPS``
    (at least ``SMALLEST_BUCKET``), so at most a fifth of a set is padding and one grid
    needs a few dozen graphs at most."""
    if n <= SMALLEST_BUCKET:
        return SMALLEST_BUCKET
    base = 2 ** (n.bit_length() - 1)
    return next(size for f in (*BUCKET_STEPS, 2.0) if (size := math.ceil(base * f)) >= n)


def halt_monitor(workspace, batch: int, length: int, **settings) -> HaltMonitor:
    """A reset ``HaltMonitor`` that stays at the same addresses from call to call, so the
    compact loop's captures, which read and write it, can be replayed by the next call (the
    last ``MONITORS_PER_WORKSPACE`` used; a capture keeps its own alive)."""
    monitors = _graphs_of(workspace).monitors
    key = (batch, length, *sorted(settings.items()))
    monitor = monitors.pop(key, None)
    if monitor is None:
        monitor = HaltMonitor(batch, length, **settings)
    else:
        monitor.reset()
    monitors[key] = monitor  # the newest last
    while len(monitors) > MONITORS_PER_WORKSPACE:
        monitors.pop(next(iter(monitors)))
    return monitor


def _cast_weights(graphs: _Graphs, workspace, pool: ExpertPool) -> CastWeights | None:
    """The iterated Linear weights cast for this call's replays, under autocast (else None)."""
    device_type = next(workspace.parameters()).device.type
    return cast_weights_for([workspace, *pool.h_clocked_experts()], device_type, graphs.casts)


def _fixed_key(workspace, pool: ExpertPool, step_name: str, casts: CastWeights | None) -> tuple:
    """What stays fixed through one settle call, looked up once per call rather than per
    step: the addresses of parameters, buffers (RoPE tables are replaced when a longer
    sequence comes) and weight casts, and the settings that choose kernels: precision and
    reduced-precision reductions, deterministic algorithms (also cuDNN's) and the attention
    backends allowed and their order (a graph replays the kernels it captured whatever the
    settings say now)."""
    return (
        step_name, workspace.config.read,
        tensor_addresses((workspace, pool)),
        None if casts is None else casts.addresses(),
        torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
        torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, _attention_backends(),
    )


def _attention_backends() -> tuple:
    """Which scaled-dot-product attention backends are allowed, and in which order they are
    tried (``sdpa_kernel`` sets both)."""
    cuda = torch.backends.cuda
    return (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
            cuda.cudnn_sdp_enabled(), tuple(torch._C._get_sdp_priority_order()))


def _context_key(context: TokenContext, tensors: list[Tensor]) -> tuple:
    return (context.grid, tuple(context.fixed), context.grounding is None, context.fixed_kv is None,
            context.input_weight is None,
            tuple((t.shape, t.dtype, t.device) for t in tensors))


def graphed_step(step: Callable, workspace, pool: ExpertPool, step_name: str) -> Callable:
    """``step`` replayed from CUDA graphs, one captured per set of input shapes and dtypes.

    The returned outputs are the graph's own buffers: the next call of any of this
    workspace's graphs overwrites them, so use them (or copy them) at once. ``step_name``
    tells eager and compiled steps apart (both are capturable).
    """
    graphs = _graphs_of(workspace)
    casts = _cast_weights(graphs, workspace, pool)
    fixed = _fixed_key(workspace, pool, step_name, casts)
    this_call = object()  # a capture copies the context in once per settle call

    def call(h: Tensor, cum: Tensor, _pool: ExpertPool, context: TokenContext):
        key = (fixed, _context_key(context, [h, cum, *_context_tensors(context)]))
        captured = graphs.keep(key, lambda: _CapturedStep(step, pool, context, h, cum, graphs, casts))
        return captured.run(h, cum, context, this_call)

    return call


class GraphedIterations(Iterations):
    """The compact loop's iterations, each replayed whole from a CUDA graph: the step, the
    halting monitor, the masks and the active count (``compact.iterate``), one capture per
    working-set size. The host then launches one graph per iteration and reads the count,
    instead of launching the monitor's and masks' few dozen kernels itself. A shrink is one
    replay too (``_CapturedShrink``) once it has been seen: at small sets its dozen gathers
    and copies, launched one by one, took the host longer than the iteration before it took
    the GPU.

    A capture iterates its own buffers in place: ``load`` copies a new working set's states
    (and its rows and context) in and hands the buffers back to the loop. The monitor must
    stay at the same addresses from call to call (``halt_monitor``); the iteration number
    is a device tensor that each replay increments, filled by the host only where a replay
    does not follow the same capture's previous iteration.
    """

    def __init__(self, workspace, pool: ExpertPool, monitor: HaltMonitor, compiled: bool):
        super().__init__(workspace, pool, monitor, compiled)
        self.graphs = _graphs_of(workspace)
        self.casts = _cast_weights(self.graphs, workspace, pool)
        self.fixed = (
            *_fixed_key(workspace, pool, f"{'compiled' if compiled else 'eager'} iteration", self.casts),
            tuple(x.data_ptr() for x in monitor.tensors()), monitor.rule, monitor.tol, monitor.k_min,
        )
        self.current: _CapturedIteration | None = None
        self.grid: _CapturedIteration | None = None  # the whole grid's capture, whose states are the grid's

    def load(self, states, rows, context):
        size = None if rows is None else rows.numel()  # with the grid's shapes, the set's
        key = (self.fixed, size, _context_key(context, [*states, *_context_tensors(context)]))
        self.current = self.graphs.keep(
            key, lambda: _CapturedIteration(self, *Iterations.load(self, states, rows, context), rows, key)
        )
        if rows is None:
            self.grid = self.current
        return self.current.load(states, rows, context), self.current.context

    def shrink(self, full, states, rows, size, context):
        """As ``Iterations.shrink``, from the grid capture's buffers (its states are the grid's
        ``full``, its context the grid's, so ``context`` is not read): the first time from one
        set to the next eagerly, which captures the new set's iteration, and then the shrink
        itself for later calls."""
        # by the captures themselves (kept alive by the shrink's capture): a key equal to an
        # evicted one's may come back as a new capture with buffers of its own
        key = ("shrink", id(self.current), id(self.grid), size)
        shrink = self.graphs.get(key)
        if shrink is None:
            source, grid = self.current, self.grid
            full, states, rows, _ = super().shrink(full, states, rows, size, grid.context)
            if all(self.graphs.holds(c) for c in (source, self.current, grid)):  # none evicted meanwhile
                self.graphs.keep(key, lambda: _CapturedShrink(self, source, self.current, grid, size))
        else:
            shrink.graph.replay()
            self.graphs.get(shrink.target.key)  # in use: the newest
            self.current = shrink.target
            full, states, rows = shrink.full, shrink.target.states, shrink.target.rows
        return full, states, rows, self.current.context

    def __call__(self, k, states, rows, context):
        return self.current.run(k)


def _context_tensors(context: TokenContext) -> list[Tensor]:
    per_token = [context.observation, *context.fixed.values(), context.fixed_kv, context.grounding, context.rows]
    return [x for x in per_token + _per_sequence(context) if x is not None]


def _per_sequence(context: TokenContext) -> list[Tensor]:
    """The context's tensors that a working set shares with the grid (not gathered by rows)."""
    shared = [*(context.probe_kv or ()), context.probe_start, context.input_weight]
    return [x for x in shared if x is not None]


def _clone_context(context: TokenContext, per_sequence: bool = True) -> TokenContext:
    """Buffers for ``context``'s tensors; without ``per_sequence``, its per-sequence ones are shared."""
    copy = (lambda x: x.clone()) if per_sequence else (lambda x: x)
    return TokenContext(
        observation=context.observation.clone(),
        grounding=None if context.grounding is None else context.grounding.clone(),
        fixed={name: x.clone() for name, x in context.fixed.items()},
        fixed_kv=None if context.fixed_kv is None else context.fixed_kv.clone(),
        input_weight=None if context.input_weight is None else copy(context.input_weight),
        probe_kv=None if context.probe_kv is None else tuple(copy(x) for x in context.probe_kv),
        probe_start=None if context.probe_start is None else copy(context.probe_start),
        rows=None if context.rows is None else context.rows.clone(),
        grid=context.grid,
    )


def _autocast_run(fn: Callable, casts: CastWeights | None) -> Callable:
    """``fn`` without gradient under ``uncached_autocast``, reading the weight ``casts`` (its
    warm-up runs and its capture happen inside the settle call that made it, under the
    caller's autocast)."""

    def run():
        with torch.no_grad(), uncached_autocast("cuda"), casts.swapped() if casts else contextlib.nullcontext():
            return fn()

    return run


class _CapturedStep:
    """One captured workspace step, reading its input buffers and writing its outputs."""

    def __init__(self, step, pool, context, h, cum, graphs: _Graphs, casts: CastWeights | None):
        self.h, self.cum = h.clone(), cum.clone()
        self.context = _clone_context(context)
        self.call: object | None = None  # the settle call whose context is in the buffers
        self.casts = casts  # read by the graph: kept alive with it
        run = _autocast_run(lambda: step(self.h, self.cum, pool, self.context), casts)
        self.graph, self.outputs = graphs.capture(run)

    def run(self, h: Tensor, cum: Tensor, context: TokenContext, call: object) -> tuple[Tensor, Tensor, Tensor]:
        """Replay on (h, cum) and ``context``, copied in at the first iteration of each settle
        ``call`` (a context object may be changed and settled again: its identity is no key)."""
        if self.call is not call:
            for buffer, x in zip(_context_tensors(self.context), _context_tensors(context)):
                buffer.copy_(x)
            self.call = call
        self.h.copy_(h)
        self.cum.copy_(cum)
        self.graph.replay()
        return self.outputs


class _CapturedIteration:
    """One captured ``compact.iterate`` over buffers of its own: states, rows, context and
    the iteration number; its output is the active count."""

    def __init__(self, iterations: GraphedIterations, states, context, rows, key):
        self.key = key
        self.states = [x.clone() for x in states]
        self.rows = None if rows is None else rows.clone()
        # a working set's per-sequence tensors are the grid capture's (its load copies nothing)
        self.context = _clone_context(context, per_sequence=rows is None)
        self.casts = iterations.casts  # read by the graph: kept alive with it
        self.k = torch.ones((), dtype=torch.long, device=states[0].device)  # 1 for every warm-up: any k_max
        self.next_k: int | None = None  # what ``k`` holds for the next replay, where the host knows it
        function, workspace, pool = iterations.function(rows), iterations.workspace, iterations.pool
        monitor = self.monitor = iterations.monitor  # kept alive with the capture: its addresses are in the key
        saved = [x.clone() for x in monitor.tensors()]

        def restore():  # a warm-up run iterated the monitor in place and counted k on
            for x, before in zip(monitor.tensors(), saved):
                x.copy_(before)
            self.k.fill_(1)

        def run():  # the next iteration's number too, so consecutive replays need no fill_ between
            count = function(workspace, pool, self.context, monitor, self.states, self.rows, self.k)
            self.k.add_(1)
            return count

        self.graph, self.count = iterations.graphs.capture(_autocast_run(run, self.casts), restore)

    def load(self, states, rows, context) -> list[Tensor]:
        """Fill the buffers with the grid's states (``rows`` None) or with the rows ``rows``
        of the (B*T, ...) ``states`` and of the grid's context, gathered straight into them;
        the loop then iterates the returned buffers."""
        if rows is None:
            buffers, sources = [*self.states, *_context_tensors(self.context)], [*states, *_context_tensors(context)]
            for buffer, x in zip(buffers, sources):
                buffer.copy_(x)
            return self.states
        for buffer, x in zip(self.states, states):
            torch.index_select(x, 0, rows, out=buffer[0])
        per_token = [context.observation, context.grounding, context.fixed_kv, *context.fixed.values()]
        into = [self.context.observation, self.context.grounding, self.context.fixed_kv, *self.context.fixed.values()]
        for buffer, x in zip(into, per_token):
            if x is not None:
                torch.index_select(x.flatten(0, 1), 0, rows, out=buffer[0])
        for buffer, x in zip(_per_sequence(self.context), _per_sequence(context)):
            if buffer is not x:  # a set captured with an evicted grid capture's, or another grid's
                buffer.copy_(x)
        self.rows.copy_(rows)
        self.context.rows.copy_(rows)
        return self.states

    def run(self, k: int) -> Tensor:
        if self.next_k != k:
            self.k.fill_(k)
        self.graph.replay()
        self.next_k = k + 1
        return self.count


class _CapturedShrink:
    """One captured shrink from the working set of ``source`` (or the whole grid) to that of
    ``target``: ``compact.shrunk_rows`` on the buffers of the captures (the grid's states and
    context are those of ``grid``, written in by its ``load`` at the start of every call), then
    ``target.load``. Replaying it repeats the eager shrink it was captured after, whose result
    it leaves unchanged (it writes the same values)."""

    def __init__(self, iterations: GraphedIterations, source, target, grid, size: int):
        self.target = target
        self.captures = (source, target, grid)  # whose buffers it reads and writes (``_Graphs.keep``)
        self.full = [x.flatten(0, 1) for x in grid.states]
        monitor = iterations.monitor

        def run():
            _, rows = shrunk_rows(monitor, self.full, source.states, source.rows, size)
            target.load(self.full, rows, grid.context)

        self.graph, _ = iterations.graphs.capture(_autocast_run(run, None))
