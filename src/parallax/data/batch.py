"""What every data source yields, and the interface the trainer reads it through."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Batch:
    """One batch of next-token prediction examples, all (B, T).

    ``loss_mask`` marks the positions that are scored; ``labels`` holds a per-token difficulty
    label, an index into the source's ``label_names`` (used by the K-DOF analysis).
    """

    input_ids: Tensor
    targets: Tensor
    loss_mask: Tensor
    labels: Tensor

    def to(self, device) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


class DataSource:
    """A source of batches. Subclasses set ``vocab_size``, ``seq_len`` and ``label_names``.

    ``batch`` draws all its randomness from ``generator`` so the trainer controls determinism:
    it seeds one generator per (seed, split, step), which makes a resumed run see exactly the
    data an uninterrupted one would; several processes each keep their slice of that batch.
    """

    vocab_size: int
    seq_len: int
    label_names: tuple[str, ...] = ("token",)

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Human-readable text for token ids (tasks print symbols, text sources detokenize)."""
        return " ".join(str(i) for i in ids)

    def fingerprint(self) -> str:
        """A short string identifying the data, recorded in the run directory."""
        return type(self).__name__


_SPLITS = {"train": 0, "val": 1, "test": 2}


def batch_generator(seed: int, split: str, step: int) -> torch.Generator:
    """The generator for one batch: a pure function of (seed, split, step).

    Batches therefore never depend on how many came before, so resuming at step s
    reproduces exactly the data of an uninterrupted run.
    """
    mixed = (seed * 1_000_003 + _SPLITS[split] * 7_919) * 2_147_483_647 + step
    return torch.Generator().manual_seed(mixed % (2**63 - 1))
