"""Turn raw text into a data directory: a tokenizer, token shards and their metadata.

Layout of ``DATA_DIR``::

    tokenizer.json   the byte-level BPE (trained on the train split, or the one given)
    train.bin        token ids of the train documents, each followed by <|endoftext|>
    val.bin          likewise for the validation documents
    meta.json        vocabulary size, dtype, token and byte counts, input hashes

Shards are flat arrays readable with ``np.memmap``: uint16 when every id fits, else
uint32. ``bytes`` counts the UTF-8 bytes of the documents' text (separators excluded), so
bits per byte = loss per token in nats * tokens / bytes / ln 2.

Everything is a pure function of the input bytes and the options: documents are assigned
to validation by the rank of their sha256, never by a random generator, and files are
written whole and renamed into place. Re-running with the same inputs rewrites the same
bytes, or skips the work when ``meta.json`` already records the same request.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from parallax.data.tokenizer import END_OF_TEXT, Tokenizer
from parallax.errors import ParallaxError

FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
ENCODE_CHUNK = 1024  # documents per encode_batch call (one progress update each)

_EOT_LINE = re.compile(r"^[ \t]*" + re.escape(END_OF_TEXT) + r"[ \t]*$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


@dataclass
class Corpus:
    """Documents to prepare and a description of where they came from (for ``meta.json``)."""

    documents: list[str]
    sources: list[dict[str, Any]]  # each has at least "name" and "sha256"


def split_documents(text: str) -> list[str]:
    """Split on ``<|endoftext|>`` lines when the text has any, else on blank lines.

    Surrounding whitespace is stripped and empty documents dropped, so both TinyStories
    layouts (separator lines, or a blank line between stories) give the same documents.
    """
    text = text.replace("\r\n", "\n")
    parts = _EOT_LINE.split(text) if _EOT_LINE.search(text) else _BLANK_LINES.split(text)
    return [p.strip() for p in parts if p.strip()]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_text_files(paths: Iterable[str | Path]) -> Corpus:
    documents: list[str] = []
    sources = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ParallaxError(f"input file {str(path)!r} {'is a directory' if path.is_dir() else 'does not exist'}")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParallaxError(f"input file {str(path)!r} is not UTF-8 text (byte {exc.start})") from None
        documents += split_documents(text)
        sources.append({"name": str(path), "sha256": sha256_bytes(data)})
    return Corpus(documents, sources)


def read_hf_dataset(name: str, split: str, text_field: str) -> Corpus:
    """Documents from a Hugging Face dataset already in the local cache (one per record)."""
    # datasets reads these at import; offline mode keeps it from reaching the network.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise ParallaxError("--hf-dataset needs the `datasets` package; install it with `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for a missing cache entry
        raise ParallaxError(
            f"Hugging Face dataset {name!r} (split {split!r}) is not available offline: {type(exc).__name__}"
        ) from None
    if text_field not in ds.column_names:
        raise ParallaxError(
            f"dataset {name!r} has no field {text_field!r}; its fields are: {', '.join(ds.column_names)}"
        )
    documents = [t.strip() for t in ds[text_field] if t and t.strip()]
    digest = sha256_bytes("\0".join(documents).encode("utf-8"))
    return Corpus(documents, [{"name": f"hf:{name}:{split}:{text_field}", "sha256": digest}])


def assign_splits(documents: list[str], val_fraction: float) -> dict[str, list[str]]:
    """Validation = the ``round(val_fraction * n)`` documents (at least 1) of smallest sha256.

    The choice depends only on each document's text, so it is stable under re-runs, and
    duplicate documents always land in the same split. Original order is kept in each split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ParallaxError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if len(documents) < 2:
        raise ParallaxError(f"the input holds {len(documents)} document(s); at least 2 are needed to split train/val")
    n_val = min(len(documents) - 1, max(1, round(val_fraction * len(documents))))
    keys = [hashlib.sha256(d.encode("utf-8")).digest() for d in documents]
    val = set(sorted(range(len(documents)), key=lambda i: (keys[i], i))[:n_val])
    return {
        "train": [d for i, d in enumerate(documents) if i not in val],
        "val": [d for i, d in enumerate(documents) if i in val],
    }


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(
    path: Path, documents: list[str], tokenizer: Tokenizer, dtype: np.dtype, progress: bool
) -> dict[str, Any]:
    """Encode ``documents`` (each followed by end-of-text) into ``path``; return its stats."""
    counts = {"documents": len(documents), "tokens": 0, "bytes": 0}

    def write(f) -> None:
        bar = tqdm(total=len(documents), desc=f"encode {path.stem}", unit="doc", disable=not progress)
        for start in range(0, len(documents), ENCODE_CHUNK):
            chunk = documents[start : start + ENCODE_CHUNK]
            for doc, ids in zip(chunk, tokenizer.encode_batch(chunk)):
                ids.append(tokenizer.eot_id)
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                counts["tokens"] += len(ids)
                counts["bytes"] += len(doc.encode("utf-8"))
            bar.update(len(chunk))
        bar.close()

    _write_atomic(path, write)
    return {"file": path.name, **counts, "sha256": _sha256_file(path)}


def read_meta(data_dir: str | Path) -> dict[str, Any] | None:
    """``meta.json`` of ``data_dir``, or None when it has none (or an unreadable one)."""
    path = Path(data_dir) / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _is_complete(data_dir: Path, meta: dict[str, Any]) -> bool:
    """Whether every file ``meta`` names exists with the size it records."""
    files = [data_dir / meta["tokenizer"]] + [data_dir / meta["splits"][s]["file"] for s in SPLITS]
    if not all(f.is_file() for f in files):
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    return all((data_dir / meta["splits"][s]["file"]).stat().st_size == meta["splits"][s]["tokens"] * itemsize for s in SPLITS)


def prepare_corpus(
    corpus: Corpus,
    out_dir: str | Path,
    *,
    vocab_size: int = 8192,
    tokenizer_path: str | Path | None = None,
    val_fraction: float = 0.05,
    progress: bool = True,
) -> tuple[dict[str, Any], bool]:
    """Write ``out_dir`` for ``corpus``; returns ``(meta, skipped)``.

    With ``tokenizer_path`` the given tokenizer.json is used (and copied in) and
    ``vocab_size`` is ignored; otherwise a BPE of ``vocab_size`` is trained on the train split.
    """
    out = Path(out_dir)
    given = Tokenizer.load(tokenizer_path) if tokenizer_path is not None else None
    request = {
        "format": FORMAT_VERSION,
        "sources": [s["sha256"] for s in corpus.sources],
        "val_fraction": val_fraction,
        "vocab_size": None if given else vocab_size,
        "tokenizer_sha256": sha256_bytes(given.to_json().encode()) if given else None,
    }
    old = read_meta(out)
    if old is not None and old.get("request") == request and _is_complete(out, old):
        return old, True

    splits = assign_splits(corpus.documents, val_fraction)
    if out.exists() and not out.is_dir():
        raise ParallaxError(f"output {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    # Until the new meta.json lands, the directory must not claim to be complete.
    (out / META_FILE).unlink(missing_ok=True)
    tokenizer = given or Tokenizer.train(splits["train"], vocab_size)
    tokenizer_json = tokenizer.to_json().encode("utf-8")
    _write_atomic(out / TOKENIZER_FILE, lambda f: f.write(tokenizer_json))
    dtype = token_dtype(tokenizer.vocab_size)
    stats = {s: write_shard(out / f"{s}.bin", splits[s], tokenizer, dtype, progress) for s in SPLITS}
    meta = {
        "request": request,
        "sources": corpus.sources,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_source": str(tokenizer_path) if tokenizer_path is not None else None,
        "tokenizer_sha256": sha256_bytes(tokenizer_json),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype.name,
        "splits": stats,
    }
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    _write_atomic(out / META_FILE, lambda f: f.write(text.encode("utf-8")))
    return meta, False

