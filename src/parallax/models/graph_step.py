"""Whether a model call is one step of a CUDA graph: its capture, or the eager warm-up that
runs the same code first (``generation.GraphedStep``).

Inside one nothing may read a device value on the host or choose its work by one, since a
replay re-runs the captured kernels and none of the Python: the CWS runs its masked halting
loop to k_max (no early exit, no compact working set, no graphs of its own nested inside),
and a mixture of experts runs every expert on every token (its dense twin, the same values)
instead of dispatching the routed tokens. A capture started elsewhere counts too, except
while torch.compile traces (which cannot ask).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_state = threading.local()  # per thread: another thread's training keeps its fast paths


@contextlib.contextmanager
def graph_step() -> Iterator[None]:
    """Run the model calls inside (in this thread) as steps of a CUDA graph."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def in_graph_step() -> bool:
    """Inside ``graph_step()`` in this thread, or a CUDA stream capture outside torch.compile."""
    if getattr(_state, "depth", 0):
        return True
    return not torch.compiler.is_compiling() and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def uncached_autocast(kind: str) -> torch.autocast:
    """Autocast as the caller set it, without its weight-cast cache: a cast cached during a
    capture would be a tensor of the capture (freed after it), not the weights at each replay."""
    return torch.autocast(
        kind, dtype=torch.get_autocast_dtype(kind), enabled=torch.is_autocast_enabled(kind), cache_enabled=False
    )
