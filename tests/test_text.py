"""Text pipeline contracts: tokenizer, document splitting, shards, metadata, the text source."""

import json

import numpy as np
import pytest
import torch

from parallax.cli.main import main
from parallax.data import build_data
from parallax.data.batch import batch_generator
from parallax.data.prepare import Corpus, prepare_corpus, read_text_files, split_documents
from parallax.data.text import TextConfig
from parallax.data.tokenizer import END_OF_TEXT, Tokenizer
from parallax.errors import ParallaxError

WORDS = "the cat dog sat ran on a mat hill big small red blue happy sad tree sun moon".split()


def stories(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        sentences = [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))).capitalize() + "." for _ in range(3)]
        docs.append(f"Story {i}. " + " ".join(sentences) + ("\n\n“Yes!” said Ünal 😀" if i % 7 == 0 else ""))
    return docs


def write_eot_file(path, docs):
    path.write_text("".join(f"{d}\n{END_OF_TEXT}\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    src = write_eot_file(root / "stories.txt", stories(60))
    out = root / "data"
    meta, skipped = prepare_corpus(read_text_files([src]), out, vocab_size=300, val_fraction=0.2, progress=False)
    assert not skipped
    return src, out, meta


def test_tokenizer_round_trips_any_text():
    tok = Tokenizer.train(stories(20), 280)
    assert tok.vocab_size == 280 and tok.decode([tok.eot_id]) == END_OF_TEXT
    for text in ["Once upon a time", "  tabs\tand\n\nnewlines ", "naïve café — 😀 日本語", "never seen: ꙮ"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert max(ids) < tok.vocab_size


def test_tokenizer_training_is_deterministic_and_reloads(tmp_path):
    a, b = Tokenizer.train(stories(20), 300), Tokenizer.train(stories(20), 300)
    assert a.to_json() == b.to_json()
    a.save(tmp_path / "tok.json")
    c = Tokenizer.load(tmp_path / "tok.json")
    assert c.encode("the big red sun") == a.encode("the big red sun") and c.eot_id == a.eot_id


def test_both_document_separators_give_the_same_documents():
    docs = ["First story.\nIt has two lines.", "Second story.", "Third."]
    with_eot = "".join(f"{d}\n{END_OF_TEXT}\n" for d in docs)
    with_blank = "\n\n".join(docs) + "\n"
    assert split_documents(with_eot) == docs
    assert split_documents(with_blank) == ["First story.\nIt has two lines.", "Second story.", "Third."]
    # a blank line inside an <|endoftext|>-separated document does not split it
    assert split_documents(f"A\n\nB\n{END_OF_TEXT}\nC\n{END_OF_TEXT}\n") == ["A\n\nB", "C"]


def test_shards_hold_exactly_the_tokenized_documents(prepared):
    src, out, meta = prepared
    tok = Tokenizer.load(out / "tokenizer.json")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size == 300
    val_docs = []
    for split in ("train", "val"):
        shard = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        assert len(shard) == meta["splits"][split]["tokens"]
        docs = tok.decode(shard.tolist()).split(END_OF_TEXT)
        assert docs[-1] == ""  # every document ends with end-of-text
        docs = docs[:-1]
        assert meta["splits"][split]["documents"] == len(docs)
        assert meta["splits"][split]["bytes"] == sum(len(d.encode()) for d in docs)
        expected = np.concatenate([tok.encode(d) + [tok.eot_id] for d in docs])
        np.testing.assert_array_equal(shard, expected)
        val_docs += docs if split == "val" else []
    # train and val partition the input; validation got its share
    all_docs = split_documents(src.read_text())
    assert len(val_docs) == 12 and set(val_docs) < set(all_docs)
    assert meta["splits"]["train"]["documents"] + len(val_docs) == len(all_docs)


def test_large_vocabulary_uses_uint32(tmp_path):
    tok = Tokenizer.train(stories(10), 300)
    tok.hf.add_tokens([f"<extra{i}>" for i in range(2**16)])
    tok.save(tmp_path / "big.json")
    docs = stories(10)
    meta, _ = prepare_corpus(Corpus(docs, [{"name": "x", "sha256": "0"}]), tmp_path / "d",
                             tokenizer_path=tmp_path / "big.json", val_fraction=0.3, progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 300 + 2**16
    shard = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint32)
    assert tok.decode(shard.tolist()).count(END_OF_TEXT) == meta["splits"]["train"]["documents"] == 7


def test_rerun_is_idempotent_and_skips(prepared, tmp_path):
    src, out, meta = prepared
    again, skipped = prepare_corpus(read_text_files([src]), out, vocab_size=300, val_fraction=0.2, progress=False)
    assert skipped and again == meta
    # a fresh directory gets byte-identical files
    fresh, skipped = prepare_corpus(read_text_files([src]), tmp_path / "d2", vocab_size=300, val_fraction=0.2, progress=False)
    assert not skipped
    for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "d2" / name).read_bytes() == (out / name).read_bytes()
    # another option is not skipped
    _, skipped = prepare_corpus(read_text_files([src]), tmp_path / "d2", vocab_size=290, val_fraction=0.2, progress=False)
    assert not skipped and json.loads((tmp_path / "d2" / "meta.json").read_text())["vocab_size"] == 290


def test_prepare_text_cli_prints_a_summary(tmp_path, capsys):
    src = tmp_path / "blank.txt"
    src.write_text("\n\n".join(stories(30)))
    assert main(["prepare-text", "--input", str(src), "--out", str(tmp_path / "d"), "--vocab-size", "300", "--no-progress"]) == 0
    assert "written" in capsys.readouterr().out
    assert main(["prepare-text", "--input", str(src), "--out", str(tmp_path / "d"), "--vocab-size", "300", "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["prepare-text", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "e")]) == 1
    assert "does not exist" in capsys.readouterr().err


def text_source(path, seq_len=16):
    return build_data(TextConfig(path=str(path), seq_len=seq_len))


def test_text_source_batches_are_windows_of_the_shards(prepared):
    _, out, meta = prepared
    source = text_source(out)
    assert source.vocab_size == 300 and source.tokenizer.eot_id == meta["eot_id"]
    shard = np.fromfile(out / "val.bin", dtype=np.uint16).astype(np.int64)
    batch = source.batch("val", 8, batch_generator(0, "val", 3))
    assert batch.input_ids.shape == batch.targets.shape == batch.loss_mask.shape == (8, 16)
    assert batch.loss_mask.all() and (batch.labels == 0).all()
    torch.testing.assert_close(batch.input_ids[:, 1:], batch.targets[:, :-1])
    for row in batch.input_ids.tolist():  # each row occurs in the shard
        starts = np.flatnonzero(shard[: len(shard) - 16] == row[0])
        assert any((shard[s : s + 16] == row).all() for s in starts)
    same = source.batch("val", 8, batch_generator(0, "val", 3))
    other = source.batch("val", 8, batch_generator(0, "val", 4))
    assert torch.equal(batch.input_ids, same.input_ids) and not torch.equal(batch.input_ids, other.input_ids)
    s = meta["splits"]["train"]
    assert source.bytes_per_token("train") == s["bytes"] / s["tokens"]
    assert "meta sha256" in source.fingerprint()
    assert source.decode(batch.input_ids[0].tolist()) == source.tokenizer.decode(batch.input_ids[0].tolist())


def test_text_source_errors_are_clear(prepared, tmp_path):
    _, out, _ = prepared
    with pytest.raises(ParallaxError, match="does not exist; prepare it"):
        text_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ParallaxError, match="no readable meta.json"):
        text_source(tmp_path / "empty")
    with pytest.raises(ParallaxError, match="too few"):
        text_source(out, seq_len=100_000)
