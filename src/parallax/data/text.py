"""The "text" data source: random windows of the token shards written by ``prepare-text``.

Shards are opened with ``np.memmap``, so a corpus larger than memory costs nothing to open.
Each batch row is a window of ``seq_len + 1`` consecutive tokens starting at an offset
drawn from the given ``torch.Generator``; the input is the first ``seq_len`` tokens and the
target the last ``seq_len``. Every token is scored and has the single label ``"token"``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from parallax.config import DataConfig
from parallax.data.batch import Batch, DataSource
from parallax.data.prepare import META_FILE, SPLITS, read_meta
from parallax.data.tokenizer import Tokenizer
from parallax.errors import ParallaxError
from parallax.registry import DATA


@dataclass
class TextConfig(DataConfig):
    path: str = "data/tinystories"  # a directory written by `parallax prepare-text`
    seq_len: int = 256

    def validate(self) -> None:
        if self.seq_len < 1:
            raise ValueError("seq_len must be at least 1")
        if not self.path:
            raise ValueError("path must name a directory written by `parallax prepare-text`")


@DATA.register("text", TextConfig, "tokenized text prepared by `parallax prepare-text`")
class TextSource(DataSource):
    """Windows of a prepared corpus. ``tokenizer`` is the corpus's ``Tokenizer``."""

    label_names = ("token",)

    def __init__(self, cfg: TextConfig):
        self.cfg = cfg
        self.seq_len = cfg.seq_len
        root = Path(cfg.path)
        hint = f"prepare it with `parallax prepare-text --input FILE.txt --out {cfg.path}`"
        if not root.is_dir():
            raise ParallaxError(f"text data directory {cfg.path!r} does not exist; {hint}")
        self.meta = read_meta(root)
        if self.meta is None:
            raise ParallaxError(f"{cfg.path!r} has no readable {META_FILE}; {hint}")
        self._meta_sha256 = hashlib.sha256((root / META_FILE).read_bytes()).hexdigest()
        try:
            self.tokenizer = Tokenizer.load(root / self.meta["tokenizer"])
            self.vocab_size = int(self.meta["vocab_size"])
            dtype = np.dtype(self.meta["dtype"])
            self.shards = {s: self._open(root, self.meta["splits"][s], dtype, hint) for s in SPLITS}
        except (KeyError, TypeError):
            raise ParallaxError(f"{str(root / META_FILE)!r} is not a prepare-text metadata file; {hint}") from None
        if self.tokenizer.vocab_size != self.vocab_size:
            raise ParallaxError(
                f"the tokenizer in {cfg.path!r} has {self.tokenizer.vocab_size} ids but {META_FILE} "
                f"records {self.vocab_size}; {hint}"
            )

    def _open(self, root: Path, split_meta: dict, dtype: np.dtype, hint: str) -> np.ndarray:
        path = root / split_meta["file"]
        tokens = int(split_meta["tokens"])
        if not path.is_file() or path.stat().st_size != tokens * dtype.itemsize:
            raise ParallaxError(f"shard {str(path)!r} is missing or not the size {META_FILE} records; {hint}")
        if tokens <= self.seq_len:
            raise ParallaxError(
                f"shard {str(path)!r} holds {tokens} tokens, too few for windows of seq_len={self.seq_len} + 1"
            )
        return np.memmap(path, dtype=dtype, mode="r", shape=(tokens,))

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        if split not in self.shards:
            raise ParallaxError(f"text data has the splits {', '.join(SPLITS)}, not {split!r}")
        shard = self.shards[split]
        starts = torch.randint(0, len(shard) - self.seq_len, (batch_size,), generator=generator)
        windows = np.stack([shard[s : s + self.seq_len + 1] for s in starts.tolist()]).astype(np.int64)
        tokens = torch.from_numpy(windows)  # (B, seq_len + 1)
        ones = torch.ones(batch_size, self.seq_len, dtype=torch.bool)
        return Batch(tokens[:, :-1], tokens[:, 1:], ones, torch.zeros(batch_size, self.seq_len, dtype=torch.long))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token in ``split``: bits/byte = nats/token / ln 2 / this."""
        stats = self.meta["splits"][split]
        return stats["bytes"] / stats["tokens"]

    def fingerprint(self) -> str:
        return f"text({self.cfg.path}, meta sha256 {self._meta_sha256[:16]}, seq_len={self.seq_len})"
