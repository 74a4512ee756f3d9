"""Tokenize text into a data directory for the "text" data source.

Documents are separated by `<|endoftext|>` lines (TinyStories) or, when a file has none,
by blank lines. A byte-level BPE is trained on the train split unless --tokenizer gives
one. Running the same command again reuses the directory when nothing changed.

example:
  parallax prepare-text --input ../shared/data/tinystories-train-sample.txt --out data/tinystories
"""

from __future__ import annotations

HELP = "tokenize text files into train/val token shards"


def add_arguments(parser) -> None:
    parser.add_argument("--input", action="append", default=[], metavar="FILE", help="a UTF-8 text file (repeatable)")
    parser.add_argument("--hf-dataset", metavar="NAME", help="a Hugging Face dataset already in the local cache")
    parser.add_argument("--hf-split", default="train", help="split of --hf-dataset (default: train)")
    parser.add_argument("--hf-text-field", default="text", help="text field of --hf-dataset (default: text)")
    parser.add_argument("--out", required=True, metavar="DATA_DIR", help="directory to write")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary to train (default: 8192)")
    parser.add_argument("--tokenizer", metavar="JSON", help="use this tokenizer.json instead of training one")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of documents for validation")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> int:
    from parallax.data.prepare import Corpus, prepare_corpus, read_hf_dataset, read_text_files
    from parallax.errors import ParallaxError

    if not args.input and not args.hf_dataset:
        raise ParallaxError("give at least one --input FILE or --hf-dataset NAME")
    corpus = read_text_files(args.input)
    if args.hf_dataset:
        hf = read_hf_dataset(args.hf_dataset, args.hf_split, args.hf_text_field)
        corpus = Corpus(corpus.documents + hf.documents, corpus.sources + hf.sources)
    meta, skipped = prepare_corpus(
        corpus,
        args.out,
        vocab_size=args.vocab_size,
        tokenizer_path=args.tokenizer,
        val_fraction=args.val_fraction,
        progress=not args.no_progress,
    )
    print(f"{args.out}: {'up to date, nothing to do' if skipped else 'written'}")
    print(f"  vocab {meta['vocab_size']} ({meta['dtype']}), tokenizer {meta['tokenizer']}")
    for name, s in meta["splits"].items():
        print(
            f"  {name:<5} {s['documents']:>9,} documents {s['tokens']:>12,} tokens "
            f"{s['bytes']:>13,} bytes ({s['bytes'] / s['tokens']:.2f} bytes/token)"
        )
    return 0
