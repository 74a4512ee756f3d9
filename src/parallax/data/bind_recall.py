"""BIND/RECALL: bind keys to values, then recall them, with per-token difficulty labels.

This is the task on which the CWS seeds report K-DOF (more iterations on hard recall tokens
than on easy ones), so every scored token carries a label saying how hard it is.

Layout. A sequence is ``BOS`` followed by events of three tokens:

* bind    ``k v ;``   key ``k`` now holds value ``v``
* recall  ``? k v``   ``?`` opens a query of key ``k``; ``v`` is its latest value
* filler  ``f f ;``   a value symbol repeated: a distractor whose second copy is predictable

A recall names the key with the same token that bound it, so answering is one lookup: find
the earlier ``k``, read the value after it (the layout of associative-recall benchmarks such
as MQAR). An earlier layout with a separate query symbol per key also had to learn the
pairing of the two symbols, and no model learned its recall in a few thousand steps.

Events come in a write phase (``n_bindings`` first bindings of distinct keys and
``n_rebinds`` re-bindings of already bound keys to a new value, each after its key's first
binding), then ``gap`` filler events, then a read phase of ``n_queries`` recalls of distinct
bound keys. ``n_fillers`` further fillers are scattered at random over the whole sequence.
Because the first token of an event says what kind it is, every token but the event openers,
the queried keys and the bound values is predictable.

Labels of the target at each position (``label_names``):

* ``unpredictable`` event openers, queried keys and bound values (random; not scored)
* ``structural``    the ``;`` closing binds and fillers (fixed by the period; scored)
* ``easy``          the copy in a filler (scored)
* ``recall_rebound`` recall of a key bound more than once (the latest value wins; scored)
* ``recall_far``    recall of a key bound once, more than ``far_distance`` tokens back
* ``recall_near``   recall of a key bound once, at most ``far_distance`` tokens back

The distance of a recall is the number of tokens from the bound value to the recalled one.
Sequence length is fixed by the config: ``3 * events`` input tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from parallax.config import DataConfig
from parallax.data.batch import Batch, DataSource
from parallax.registry import DATA

BOS, SEP, QUERY = 0, 1, 2
FIRST_KEY = 3

UNPREDICTABLE, STRUCTURAL, EASY, RECALL_NEAR, RECALL_FAR, RECALL_REBOUND = range(6)
LABEL_NAMES = ("unpredictable", "structural", "easy", "recall_near", "recall_far", "recall_rebound")


@dataclass
class BindRecallConfig(DataConfig):
    n_keys: int = 16  # distinct key symbols
    n_values: int = 16  # distinct value symbols (also used as filler symbols)
    n_bindings: int = 8  # live bindings: distinct keys bound per sequence
    n_rebinds: int = 2  # extra bindings that overwrite an already bound key
    n_queries: int = 6  # recalls, each of a distinct bound key
    n_fillers: int = 4  # distractor events scattered over the sequence
    gap: int = 1  # filler events between the last binding and the first recall
    far_distance: int = 33  # recalls further back than this many tokens are "far" (about half)

    def validate(self) -> None:
        if not 1 <= self.n_bindings <= self.n_keys:
            raise ValueError("n_bindings must be between 1 and n_keys")
        if self.n_values < max(2, self.n_bindings):
            raise ValueError("n_values must be >= 2 and >= n_bindings (bound values are distinct)")
        if not 1 <= self.n_queries <= self.n_bindings:
            raise ValueError("n_queries must be between 1 and n_bindings (each recalls a distinct key)")
        if min(self.n_rebinds, self.n_fillers, self.gap) < 0:
            raise ValueError("n_rebinds, n_fillers and gap must be >= 0")
        if self.far_distance < 1:
            raise ValueError("far_distance must be >= 1")

    @property
    def events(self) -> int:
        return self.n_bindings + self.n_rebinds + self.n_fillers + self.gap + self.n_queries


@DATA.register("bind_recall", BindRecallConfig, "bind keys to values, recall them later (graded labels)")
class BindRecallTask(DataSource):
    """Token ids: ``BOS``, ``SEP`` (``;``), ``QUERY`` (``?``), keys, then values."""

    label_names = LABEL_NAMES

    def __init__(self, cfg: BindRecallConfig):
        cfg.validate()
        self.cfg = cfg
        self.first_value = FIRST_KEY + cfg.n_keys
        self.vocab_size = self.first_value + cfg.n_values
        self.seq_len = 3 * cfg.events

    def chance_accuracy(self) -> dict[str, float]:
        """Accuracy of guessers that know the grammar but not the bindings, per label.

        ``recall_uniform`` guesses any value symbol; ``recall_live`` guesses among the
        ``n_bindings`` values bound in the sequence (first bindings use distinct values).
        Structural and easy tokens follow from the grammar alone, so their chance is 1.
        """
        return {
            "structural": 1.0,
            "easy": 1.0,
            "recall_uniform": 1.0 / self.cfg.n_values,
            "recall_live": 1.0 / self.cfg.n_bindings,
        }

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
        rows = [self._sequence(rng) for _ in range(batch_size)]
        tokens = torch.tensor([r[0] for r in rows], dtype=torch.long)  # (B, T + 1)
        labels = torch.tensor([r[1] for r in rows], dtype=torch.long)  # (B, T)
        mask = labels != UNPREDICTABLE
        return Batch(tokens[:, :-1], tokens[:, 1:], mask, labels)

    def _events(self, rng: random.Random) -> list[tuple[str, int, int]]:
        """One sequence as ``(kind, symbol, value)`` events, kind in bind/recall/filler."""
        cfg = self.cfg
        keys = rng.sample(range(cfg.n_keys), cfg.n_bindings)
        order = list(keys)  # keys in the order they are written
        for _ in range(cfg.n_rebinds):
            key = rng.choice(keys)
            order.insert(rng.randint(order.index(key) + 1, len(order)), key)
        first_values = iter(rng.sample(range(cfg.n_values), cfg.n_bindings))
        current: dict[int, int] = {}
        events = []
        for key in order:
            if key in current:  # a re-binding always changes the value
                current[key] = rng.choice([v for v in range(cfg.n_values) if v != current[key]])
            else:
                current[key] = next(first_values)
            events.append(("bind", key, current[key]))

        def filler() -> tuple[str, int, int]:
            return ("filler", -1, rng.randrange(cfg.n_values))

        events += [filler() for _ in range(cfg.gap)]
        events += [("recall", k, current[k]) for k in rng.sample(keys, cfg.n_queries)]
        for _ in range(cfg.n_fillers):
            events.insert(rng.randint(0, len(events)), filler())
        return events

    def _sequence(self, rng: random.Random) -> tuple[list[int], list[int]]:
        """Token ids (T + 1) and the label of each target (T) for one sequence."""
        tokens, labels = [BOS], []
        bound_at: dict[int, int] = {}  # key -> position of its latest bound value
        times_bound: dict[int, int] = {}
        for kind, key, value in self._events(rng):
            value_id = self.first_value + value
            if kind == "bind":
                tokens += [FIRST_KEY + key, value_id, SEP]
                labels += [UNPREDICTABLE, UNPREDICTABLE, STRUCTURAL]
                bound_at[key] = len(tokens) - 2
                times_bound[key] = times_bound.get(key, 0) + 1
            elif kind == "recall":
                tokens += [QUERY, FIRST_KEY + key, value_id]
                distance = len(tokens) - 1 - bound_at[key]
                if times_bound[key] > 1:
                    grade = RECALL_REBOUND
                else:
                    grade = RECALL_FAR if distance > self.cfg.far_distance else RECALL_NEAR
                labels += [UNPREDICTABLE, UNPREDICTABLE, grade]
            else:
                tokens += [value_id, value_id, SEP]
                labels += [UNPREDICTABLE, EASY, STRUCTURAL]
        return tokens, labels

    def decode(self, ids: list[int]) -> str:
        def name(i: int) -> str:
            if i == BOS:
                return "<s>"
            if i == SEP:
                return ";"
            if i == QUERY:
                return "?"
            if i < self.first_value:
                return f"k{i - FIRST_KEY}"
            return f"v{i - self.first_value}"

        return " ".join(name(i) for i in ids)

    def fingerprint(self) -> str:
        c = self.cfg
        return (
            f"BindRecall(keys={c.n_keys}, values={c.n_values}, bindings={c.n_bindings}, "
            f"rebinds={c.n_rebinds}, queries={c.n_queries}, fillers={c.n_fillers}, gap={c.gap}, "
            f"far={c.far_distance})"
        )
