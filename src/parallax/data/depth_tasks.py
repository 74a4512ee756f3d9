"""Depth-dial tasks: the computation an answer needs grows with a size knob.

Both tasks state the size ``n`` in unary (``n`` TICK tokens, padded to the largest size), so an
out-of-distribution size is made of tokens the model has seen, and only the depth of
computation is new. Each answer token's label is its size ``n`` (label 0 is the prompt), so
the per-label metrics grade accuracy (and, for recurrent models, iterations) by required depth.

In-distribution sizes are ``1..max_size``; out-of-distribution sizes are
``max_size+1..ood_size``. The ``train`` and ``val`` splits draw in-distribution sizes and the
``test`` split out-of-distribution ones; ``ood = true`` makes every split draw
out-of-distribution sizes (so ``parallax eval`` can score extrapolation from config alone).

* ``pointer_chase``: a random cyclic permutation ``f`` over ``nodes`` symbols is listed in
  shuffled order, one token per pair ``(a, f(a))`` (``nodes**2`` pair tokens); each query
  ``SEP TICK^k PAD.. x y`` asks for ``y = f^k(x)``: k chained lookups. One token per pair makes
  each hop one content-addressed attention read (a two-token ``a f(a)`` listing needs a
  previous-token head first, and small models sat on the chance plateau for 800+ steps); the
  start ``x`` sits just before the answer so the first lookup reads the current token.
* ``chain_root``: ``nodes`` symbols in ``chains`` chains, each node's parent listed as one pair
  token, roots their own parents; a query ``SEP x y`` asks for the root of x's chain, so the
  size is x's depth. The answer is a fixed point of following parents: more iterations than
  the depth change nothing, which suits a test-time depth dial (see ``ChainRoot``).
* ``automaton``: an elementary cellular automaton (``rule``, default 30: chaotic) on a ring of
  ``width`` binary cells; ``BOS TICK^n PAD.. SEP cells SEP answer`` asks for the cells after n
  steps. Small state errors grow under chaotic dynamics, so a latent state that drifts from the
  true trajectory shows up as errors that grow with n. Keep ``width >= 7`` for rule 30: on
  rings of 6 cells or fewer most trajectories fall into the all-zero state within ~60 steps.
  The step count comes first so that answer cell i sits a fixed ``width + 1`` tokens after input
  cell i whatever ``ood_size`` is (with the ticks in between, a 64-tick pad put the answer ~75
  tokens from its cells and a dim-64 model stayed at 0.50 per cell). With ``indexed`` (default)
  cell i holding bit v is the token ``FIRST_SYMBOL + 2 i + v``, in the input and the answer, so a
  cell's token says which cell it is and attention can gather a whole row by content; with
  ``indexed = false`` the two tokens are plain bits.

``size_decay`` (both tasks) weights the train split's sizes by ``size_decay**(n - smallest)``: a static
curriculum that keeps small sizes common while every size up to ``max_size`` is still trained.
Validation and test sizes stay uniform. It needs no step counter (the trainer hands ``batch``
only a generator), so batches stay a pure function of (seed, split, step) and resume exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from parallax.config import DataConfig
from parallax.data.batch import Batch, DataSource
from parallax.registry import DATA

PAD, BOS, SEP, TICK = 0, 1, 2, 3
FIRST_SYMBOL = 4


def size_range(split: str, max_size: int, ood_size: int, ood: bool) -> tuple[int, int]:
    """Inclusive range of sizes for a split (see the module docstring)."""
    if ood or split == "test":
        return max_size + 1, ood_size
    return 1, max_size


def draw_sizes(split: str, shape: tuple[int, ...], lo: int, hi: int, decay: float, generator: torch.Generator) -> Tensor:
    """Sizes ``lo..hi`` for ``split``: uniform, except that ``train`` weights size n by ``decay**(n - lo)``.

    ``decay < 1`` is a static curriculum: small sizes, whose circuit the larger ones reuse, are
    common, and every size up to ``max_size`` is still trained. It depends only on ``generator``
    (no step), so batches stay a pure function of (seed, split, step).
    """
    if split != "train" or decay == 1.0:
        return torch.randint(lo, hi + 1, shape, generator=generator)
    weights = torch.tensor([decay**i for i in range(hi - lo + 1)], dtype=torch.float64)
    n = torch.multinomial(weights, math.prod(shape), replacement=True, generator=generator)
    return (lo + n).reshape(shape)


def unary(n: Tensor, width: int) -> Tensor:
    """(B,) sizes -> (B, width) ``TICK`` repeated n times, then ``PAD``."""
    return torch.where(torch.arange(width) < n.unsqueeze(1), TICK, PAD)


def to_batch(seq: Tensor, answer: Tensor, size: Tensor) -> Batch:
    """Next-token batch from (B, L) sequences, the (B, L) answer positions and their sizes."""
    mask = answer[:, 1:]
    return Batch(seq[:, :-1], seq[:, 1:], mask, torch.where(mask, size[:, 1:], 0))


def query_batch(seq: Tensor, pairs: int, query_len: int, sizes: Tensor) -> Batch:
    """Batch of (B, L) sequences ``BOS``, ``pairs`` listed pair tokens, then queries of
    ``query_len`` tokens, each ending in its answer; (B, Q) ``sizes`` label the answers."""
    answer = torch.zeros_like(seq, dtype=torch.bool)
    size = torch.zeros_like(seq)
    answer_at = pairs + query_len * torch.arange(1, sizes.shape[1] + 1)
    answer[:, answer_at] = True
    size[:, answer_at] = sizes
    return to_batch(seq, answer, size)


@dataclass
class PointerChaseConfig(DataConfig):
    nodes: int = 12
    queries: int = 4
    max_size: int = 4  # largest in-distribution hop count
    ood_size: int = 8  # largest out-of-distribution hop count
    ood: bool = False
    size_decay: float = 1.0  # train split: hop count k drawn with weight size_decay**(k - smallest); 1 = uniform

    def validate(self) -> None:
        if not 1 <= self.max_size < self.ood_size < self.nodes:
            raise ValueError("need 1 <= max_size < ood_size < nodes (hops stay inside one cycle)")
        if self.queries < 1:
            raise ValueError("queries must be >= 1")
        if self.size_decay <= 0:
            raise ValueError("size_decay must be > 0")


def chase(f: Tensor, x: Tensor, hops: Tensor) -> Tensor:
    """``f^hops(x)`` for (B, m) maps, (B, Q) starts and (B, Q) hop counts."""
    y = x.clone()
    for step in range(int(hops.max()) if hops.numel() else 0):
        y = torch.where(step < hops, f.gather(1, y), y)
    return y


@DATA.register("pointer_chase", PointerChaseConfig, "follow a listed permutation k times (k-hop pointer chasing)")
class PointerChase(DataSource):
    def __init__(self, cfg: PointerChaseConfig):
        self.cfg = cfg
        self.first_pair = FIRST_SYMBOL + cfg.nodes  # pair token of (a, f(a)): first_pair + a * nodes + f(a)
        self.vocab_size = self.first_pair + cfg.nodes * cfg.nodes
        self.query_len = 3 + cfg.ood_size  # SEP TICK^k PAD.. x y
        self.seq_len = cfg.nodes + cfg.queries * self.query_len  # BOS + pairs + queries, minus one
        self.label_names = ("prompt",) + tuple(f"hops={k}" for k in range(1, cfg.ood_size + 1))

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        cfg, b, m, q = self.cfg, batch_size, self.cfg.nodes, self.cfg.queries
        cycle = torch.rand(b, m, generator=generator).argsort(1)
        f = torch.empty_like(cycle).scatter_(1, cycle, cycle.roll(-1, dims=1))  # one m-cycle
        listed = torch.rand(b, m, generator=generator).argsort(1)
        pairs = self.first_pair + listed * m + f.gather(1, listed)
        lo, hi = size_range(split, cfg.max_size, cfg.ood_size, cfg.ood)
        x = torch.randint(0, m, (b, q), generator=generator)
        hops = draw_sizes(split, (b, q), lo, hi, cfg.size_decay, generator)
        y = chase(f, x, hops)
        parts = [torch.full((b, 1), BOS), pairs]
        for i in range(q):
            ticks = unary(hops[:, i], cfg.ood_size)
            parts += [torch.full((b, 1), SEP), ticks, x[:, i : i + 1] + FIRST_SYMBOL, y[:, i : i + 1] + FIRST_SYMBOL]
        return query_batch(torch.cat(parts, 1), m, self.query_len, hops)

    def fingerprint(self) -> str:
        c = self.cfg
        return (f"PointerChase(nodes={c.nodes}, queries={c.queries}, max_size={c.max_size}, ood_size={c.ood_size}, "
                f"ood={c.ood}, size_decay={c.size_decay})")


@dataclass
class ChainRootConfig(DataConfig):
    nodes: int = 16
    chains: int = 2
    queries: int = 4
    max_size: int = 3  # deepest in-distribution query
    ood_size: int = 7  # deepest out-of-distribution query
    ood: bool = False
    size_decay: float = 1.0  # train split: depth d drawn with weight size_decay**(d - smallest); 1 = uniform

    def validate(self) -> None:
        if not 1 <= self.max_size < self.ood_size:
            raise ValueError("need 1 <= max_size < ood_size")
        if self.chains < 2 or self.nodes % self.chains or self.nodes // self.chains < self.ood_size + 1:
            raise ValueError(
                f"need chains >= 2 dividing nodes into chains of at least ood_size + 1 = {self.ood_size + 1} "
                f"nodes (got nodes={self.nodes}, chains={self.chains})"
            )
        if self.queries < 1:
            raise ValueError("queries must be >= 1")
        if self.size_decay <= 0:
            raise ValueError("size_decay must be > 0")


@DATA.register("chain_root", ChainRootConfig, "the root of a node's chain in a listed forest (a fixed point of following)")
class ChainRoot(DataSource):
    """``nodes`` symbols form ``chains`` chains of equal length; each node's parent is listed
    as one pair token ``(a, parent(a))``, and each root is its own parent. A query ``SEP x y``
    asks for the root ``y`` of the chain through ``x``; its size is the depth of ``x``, the
    lookups that following parents needs. Unlike k-hop chasing, the answer is a fixed point of
    following: iterating past the depth changes nothing, so a recurrent model may spend any
    r >= depth and needs no count, and deeper (out-of-distribution) queries need only more
    iterations. With several chains the root cannot be found without following: every chain
    has one."""

    def __init__(self, cfg: ChainRootConfig):
        self.cfg = cfg
        self.first_pair = FIRST_SYMBOL + cfg.nodes  # pair token of (a, parent(a)): first_pair + a * nodes + parent(a)
        self.vocab_size = self.first_pair + cfg.nodes * cfg.nodes
        self.seq_len = cfg.nodes + 3 * cfg.queries  # BOS + pairs + queries, minus one
        self.label_names = ("prompt",) + tuple(f"depth={d}" for d in range(1, cfg.ood_size + 1))

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        cfg, b, m, q = self.cfg, batch_size, self.cfg.nodes, self.cfg.queries
        length = m // cfg.chains
        order = torch.rand(b, m, generator=generator).argsort(1)  # chain j is order[:, j*length:(j+1)*length]
        position = torch.arange(m)
        above = torch.where(position % length == 0, position, position - 1)  # a root is its own parent
        parent = torch.empty_like(order).scatter_(1, order, order[:, above])
        listed = torch.rand(b, m, generator=generator).argsort(1)
        pairs = self.first_pair + listed * m + parent.gather(1, listed)
        lo, hi = size_range(split, cfg.max_size, cfg.ood_size, cfg.ood)
        depth = draw_sizes(split, (b, q), lo, hi, cfg.size_decay, generator)
        chain = torch.randint(0, cfg.chains, (b, q), generator=generator)
        x = order.gather(1, chain * length + depth)
        y = order.gather(1, chain * length)
        parts = [torch.full((b, 1), BOS), pairs]
        for i in range(q):
            parts += [torch.full((b, 1), SEP), x[:, i : i + 1] + FIRST_SYMBOL, y[:, i : i + 1] + FIRST_SYMBOL]
        return query_batch(torch.cat(parts, 1), m, 3, depth)

    def fingerprint(self) -> str:
        c = self.cfg
        return (f"ChainRoot(nodes={c.nodes}, chains={c.chains}, queries={c.queries}, max_size={c.max_size}, "
                f"ood_size={c.ood_size}, ood={c.ood}, size_decay={c.size_decay})")


@dataclass
class AutomatonConfig(DataConfig):
    width: int = 8
    rule: int = 30
    max_size: int = 2  # largest in-distribution number of steps
    ood_size: int = 64  # largest out-of-distribution number of steps (32x by default)
    ood: bool = False
    indexed: bool = True  # one token per (cell, bit) instead of one per bit (see the module docstring)
    size_decay: float = 1.0  # train split: step count n drawn with weight size_decay**(n - smallest); 1 = uniform

    def validate(self) -> None:
        if not 1 <= self.max_size < self.ood_size:
            raise ValueError("need 1 <= max_size < ood_size")
        if not 0 <= self.rule <= 255 or self.width < 3:
            raise ValueError("rule must be 0..255 and width >= 3")
        if self.size_decay <= 0:
            raise ValueError("size_decay must be > 0")


def automaton_step(cells: Tensor, rule: int) -> Tensor:
    """One step of an elementary cellular automaton on a ring: (B, W) bits -> (B, W) bits."""
    code = 4 * cells.roll(1, dims=1) + 2 * cells + cells.roll(-1, dims=1)
    table = torch.tensor([(rule >> i) & 1 for i in range(8)], dtype=cells.dtype)
    return table[code]


@DATA.register("automaton", AutomatonConfig, "state of a chaotic cellular automaton after n steps")
class Automaton(DataSource):
    def __init__(self, cfg: AutomatonConfig):
        self.cfg = cfg
        self.vocab_size = FIRST_SYMBOL + (2 * cfg.width if cfg.indexed else 2)
        self.seq_len = 2 * cfg.width + cfg.ood_size + 2  # BOS cells SEP ticks SEP answer, minus one
        self.label_names = ("prompt",) + tuple(f"steps={n}" for n in range(1, cfg.ood_size + 1))

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        cfg, b, w = self.cfg, batch_size, self.cfg.width
        cells = torch.randint(0, 2, (b, w), generator=generator)
        lo, hi = size_range(split, cfg.max_size, cfg.ood_size, cfg.ood)
        steps = draw_sizes(split, (b,), lo, hi, cfg.size_decay, generator)
        state = cells
        for n in range(hi):
            state = torch.where((n < steps).unsqueeze(1), automaton_step(state, cfg.rule), state)
        sep = torch.full((b, 1), SEP)
        seq = torch.cat([torch.full((b, 1), BOS), unary(steps, cfg.ood_size), sep, self.tokens(cells), sep, self.tokens(state)], 1)
        answer = torch.zeros_like(seq, dtype=torch.bool)
        answer[:, -w:] = True
        return to_batch(seq, answer, steps.unsqueeze(1).expand_as(seq))

    def tokens(self, cells: Tensor) -> Tensor:
        """(B, W) bits -> (B, W) tokens: ``FIRST_SYMBOL + 2 i + bit`` for cell i when indexed."""
        if not self.cfg.indexed:
            return cells + FIRST_SYMBOL
        return FIRST_SYMBOL + 2 * torch.arange(self.cfg.width) + cells

    def decode(self, ids: list[int]) -> str:
        names = {PAD: "_", BOS: "<s>", SEP: "|", TICK: "+"}
        return "".join(names.get(i, ".#"[(i - FIRST_SYMBOL) % 2] if FIRST_SYMBOL <= i < self.vocab_size else "?") for i in ids)

    def fingerprint(self) -> str:
        c = self.cfg
        return (f"Automaton(width={c.width}, rule={c.rule}, max_size={c.max_size}, ood_size={c.ood_size}, ood={c.ood}, "
                f"indexed={c.indexed}, size_decay={c.size_decay})")
