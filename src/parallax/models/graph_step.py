"""Whether a model call is one step of a CUDA graph: its capture, or the eager warm-up that
runs the same code first (``generation.GraphedStep``).

Inside one nothing may read a device value on the host or choose its work by one, since a
replay re-runs the captured kernels and none of the Python: the CWS runs its masked halting
loop to k_max (no early exit, no compact working set, no graphs of its own nested inside),
and a mixture of experts runs every expert on every token (its dense twin, the same values)
instead of dispatching the routed tokens. A capture started elsewhere counts too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_graph_steps = 0  # graph_step() contexts entered and not left (a plain global: torch.compile reads it)


@contextlib.contextmanager
def graph_step() -> Iterator[None]:
    """Run the model calls inside as steps of a CUDA graph."""
    global _graph_steps
    _graph_steps += 1
    try:
        yield
    finally:
        _graph_steps -= 1


def in_graph_step() -> bool:
    if _graph_steps:
        return True
    return not torch.compiler.is_compiling() and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
