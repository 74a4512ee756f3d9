"""A thin wrapper over a Hugging Face ``tokenizers`` byte-level BPE.

Byte-level BPE never meets an unknown character and decodes back to the exact input bytes,
which is what lets evaluation convert a loss per token into bits per byte of the original
text. Documents are separated by one special end-of-text token, ``<|endoftext|>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from parallax.errors import ParallaxError

END_OF_TEXT = "<|endoftext|>"


class Tokenizer:
    """Text <-> token ids. ``vocab_size`` counts every id, the special token included."""

    def __init__(self, hf: HFTokenizer):
        eot = hf.token_to_id(END_OF_TEXT)
        if eot is None:
            raise ParallaxError(f"the tokenizer has no {END_OF_TEXT} token to separate documents")
        self.hf = hf
        self.eot_id: int = eot
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Learn a byte-level BPE of ``vocab_size`` ids (256 bytes + merges + end-of-text)."""
        if vocab_size < 257:
            raise ParallaxError(f"vocab size must be at least 257 (256 bytes and {END_OF_TEXT}), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(documents, trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise ParallaxError(f"tokenizer file {str(path)!r} does not exist")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise ParallaxError(f"{str(path)!r} is not a valid tokenizer.json ({exc})") from None
        return cls(hf)

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    def to_json(self) -> str:
        """The tokenizer.json text; identical for identical tokenizers."""
        return self.hf.to_str()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; the end-of-text token is shown as ``<|endoftext|>``."""
        return self.hf.decode(list(ids), skip_special_tokens=False)
