"""MQAR: multi-query associative recall in the layout of Zoology (Arora et al. 2023).

The standard benchmark for in-context recall, kept close to ``zoology/data/associative_recall.py``
(``_mqar``) so results compare with the literature. A sequence of ``seq_len + 1`` tokens is

    k_1 v_1 k_2 v_2 .. k_P v_P | x x k_3 v_3 x x x k_1 v_1 x ..

``P`` key-value pairs, then a query region in which every key appears once, at an even offset
``2g`` whose gap ``g`` follows Zoology's power law (``power_a`` near 0 favours short gaps,
1 is uniform), and everything else is noise drawn from the whole vocabulary. Keys are ids
``1 .. V/2 - 1`` (distinct within a sequence), values ``V/2 .. V - 1`` (distinct too).

One deliberate difference: Zoology scores the value at a query key but leaves noise in the
input after it; here the value itself follows its query key, so ``targets`` is the input
shifted by one like every other source, and models that read the whole sequence (or generate
it) see a consistent stream. The scored positions and their answers are Zoology's.

Labels: ``context`` (targets inside the key-value prefix), ``noise`` (the query region's
noise), ``recall`` (a query key's value: the only scored tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallax.config import DataConfig
from parallax.data.batch import Batch, DataSource
from parallax.registry import DATA

CONTEXT, NOISE, RECALL = range(3)


@dataclass
class MQARConfig(DataConfig):
    seq_len: int = 64  # input tokens per example (even)
    num_kv_pairs: int = 4
    vocab_size: int = 8192
    power_a: float = 0.01  # power law over query gaps; 1.0 is uniform

    def validate(self) -> None:
        if self.seq_len % 2:
            raise ValueError("seq_len must be even")
        if self.num_kv_pairs < 1 or 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError("num_kv_pairs must be >= 1 and at most seq_len / 4")
        if self.vocab_size <= self.seq_len or self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError("vocab_size must exceed seq_len and leave a key and a value per pair")
        if not 0 < self.power_a <= 1:
            raise ValueError("power_a must be in (0, 1]")


@DATA.register("mqar", MQARConfig, "multi-query associative recall (Zoology layout)")
class MQARTask(DataSource):
    label_names = ("context", "noise", "recall")

    def __init__(self, cfg: MQARConfig):
        cfg.validate()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.seq_len = cfg.seq_len
        self.first_value = cfg.vocab_size // 2
        space = (cfg.seq_len - 2 * cfg.num_kv_pairs) // 2
        gaps = torch.arange(1, space + 1, dtype=torch.float64)
        self.gap_weights = (cfg.power_a * gaps ** (cfg.power_a - 1)).float()  # (space,)

    def chance_accuracy(self) -> dict[str, float]:
        """``recall_uniform`` guesses any value id; ``recall_live`` one of the P values shown."""
        return {
            "recall_uniform": 1.0 / (self.vocab_size - self.first_value),
            "recall_live": 1.0 / self.cfg.num_kv_pairs,
        }

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        b, p, t = batch_size, self.cfg.num_kv_pairs, self.cfg.seq_len
        context = 2 * p
        keys = torch.rand(b, self.first_value - 1, generator=generator).argsort(1)[:, :p] + 1  # (B, P)
        values = torch.rand(b, self.vocab_size - self.first_value, generator=generator).argsort(1)[:, :p]
        values = values + self.first_value
        gaps = torch.multinomial(self.gap_weights.expand(b, -1), p, replacement=False, generator=generator)
        seq = torch.randint(0, self.vocab_size, (b, t + 1), generator=generator)  # noise everywhere
        seq[:, 0:context:2], seq[:, 1:context:2] = keys, values
        query_at = context + 2 * gaps  # (B, P) positions of the query keys
        seq.scatter_(1, query_at, keys)
        seq.scatter_(1, query_at + 1, values)
        labels = torch.full((b, t), NOISE, dtype=torch.long)
        labels[:, : context - 1] = CONTEXT
        labels.scatter_(1, query_at, RECALL)  # the target at a query key is its value
        return Batch(seq[:, :-1], seq[:, 1:], labels == RECALL, labels)

    def fingerprint(self) -> str:
        c = self.cfg
        return f"MQAR(seq_len={c.seq_len}, kv_pairs={c.num_kv_pairs}, vocab={c.vocab_size}, power_a={c.power_a})"
