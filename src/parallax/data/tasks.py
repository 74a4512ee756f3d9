"""Sequence-to-sequence synthetic tasks framed as next-token prediction: copy, reverse, sort.

Layout of one example (length n):  ``BOS x_1 .. x_n SEP y_1 .. y_n``. The model reads the
sequence shifted by one; only the answer tokens ``y`` are scored. Symbols are ids
``FIRST_SYMBOL .. FIRST_SYMBOL + vocab - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallax.config import DataConfig
from parallax.data.batch import Batch, DataSource
from parallax.registry import DATA

PAD, BOS, SEP = 0, 1, 2
FIRST_SYMBOL = 3


@dataclass
class SequenceTaskConfig(DataConfig):
    length: int = 8  # items per example
    vocab: int = 16  # distinct symbols

    def validate(self) -> None:
        if self.length < 1 or self.vocab < 2:
            raise ValueError("length must be >= 1 and vocab >= 2")


class SequenceTask(DataSource):
    """Base for tasks whose answer is a function of the prompt symbols."""

    label_names = ("prompt", "answer")

    def __init__(self, cfg: SequenceTaskConfig):
        self.cfg = cfg
        self.vocab_size = FIRST_SYMBOL + cfg.vocab
        self.seq_len = 2 * cfg.length + 1

    def answer(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        n = self.cfg.length
        x = torch.randint(0, self.cfg.vocab, (batch_size, n), generator=generator) + FIRST_SYMBOL
        y = self.answer(x)
        bos = torch.full((batch_size, 1), BOS, dtype=torch.long)
        sep = torch.full((batch_size, 1), SEP, dtype=torch.long)
        seq = torch.cat([bos, x, sep, y], dim=1)
        mask = torch.zeros(batch_size, 2 * n + 1, dtype=torch.bool)
        mask[:, n + 1 :] = True  # target n + 1 is y_1: the model has just read SEP
        return Batch(seq[:, :-1], seq[:, 1:], mask, mask.long())

    def decode(self, ids: list[int]) -> str:
        names = {PAD: "_", BOS: "<s>", SEP: "|"}
        return " ".join(names.get(i, str(i - FIRST_SYMBOL)) for i in ids)

    def fingerprint(self) -> str:
        return f"{type(self).__name__}(length={self.cfg.length}, vocab={self.cfg.vocab})"


@dataclass
class CopyConfig(SequenceTaskConfig):
    pass


@dataclass
class ReverseConfig(SequenceTaskConfig):
    pass


@dataclass
class SortConfig(SequenceTaskConfig):
    pass


@DATA.register("copy", CopyConfig, "repeat the prompt")
class CopyTask(SequenceTask):
    def answer(self, x):
        return x.clone()


@DATA.register("reverse", ReverseConfig, "repeat the prompt backwards")
class ReverseTask(SequenceTask):
    def answer(self, x):
        return x.flip(1)


@DATA.register("sort", SortConfig, "sort the prompt's symbols")
class SortTask(SequenceTask):
    def answer(self, x):
        return x.sort(dim=1).values
