"""Turn a run directory into a Hugging Face model folder.

The folder holds ``config.json`` (with ``auto_map`` to the remote code),
``generation_config.json``, ``model.safetensors`` (the tied embedding stored once), the
tokenizer, ``modeling_parallax.py`` and ``parallax_source.py``: the source of this parallax
package under a private name, so loading needs neither parallax nor the same version of it.

Tokenizers: a text run ships its byte-level BPE as a ``PreTrainedTokenizerFast`` (end of
text is the EOS and pad token). A synthetic task whose ids all have distinct one-word names
(``source.decode([i])``, e.g. ``<s> k3 = v5``) ships a word-level tokenizer over those names,
so prompts are written as space-separated symbols (``<s>``, where the task has it, is the BOS
token, and id 0 doubles as the pad token); otherwise the folder has no tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tokenize
from pathlib import Path

import parallax
from parallax.checkpoint import load_run, read_run_config
from parallax.errors import ParallaxError
from parallax.generation import context_length
from parallax.hf import require

REMOTE_CODE = "modeling_parallax.py"
BUNDLE = "parallax_source.py"
NOT_BUNDLED = ("cli", "hf")  # subpackages a model never imports


def _modeling():
    require("transformers", "hf")
    from parallax.hf import modeling_parallax

    return modeling_parallax


def check_causal(model_name: str) -> None:
    causal = _modeling().CAUSAL_MODELS
    if model_name not in causal:
        kind = "a masked denoiser decoded by MaskGIT, not a causal LM" if model_name == "eam" else "not causal"
        raise ParallaxError(
            f"the {model_name!r} model is {kind}; Hugging Face export covers {', '.join(causal)}"
        )


def build_tokenizer(source):
    """A ``PreTrainedTokenizerFast`` for the run's data source, or None (see the module doc)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from parallax.data.tokenizer import END_OF_TEXT

    text = getattr(source, "tokenizer", None)
    if text is not None:
        return PreTrainedTokenizerFast(tokenizer_object=text.hf, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)
    names = [source.decode([i]) for i in range(source.vocab_size)]
    if len(set(names)) != len(names) or any(name.split() != [name] for name in names):
        return None
    words = Tokenizer(models.WordLevel(vocab={name: i for i, name in enumerate(names)}))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # any id may pad: batches are padded on the right, after every position that is scored
    bos = {"bos_token": "<s>"} if "<s>" in names else {}
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token=names[0], **bos)


def build_hf_model(run_dir, overrides: list[str] = (), device: str = "cpu"):
    """The run's newest checkpoint as a ``ParallaxForCausalLM`` (eval mode) and its tokenizer."""
    check_causal(read_run_config(run_dir, overrides).model_name)
    modeling = _modeling()
    loaded = load_run(run_dir, "cpu", overrides)
    name, cfg = loaded.config.model_name, loaded.config.model
    tokenizer = build_tokenizer(loaded.source)
    config_class, model_class = modeling.CLASSES[name]
    context = context_length(loaded.model)
    special = {}
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = config_class(
        parallax_model=name,
        parallax_config=dataclasses.asdict(cfg),
        vocab_size=cfg.vocab_size,
        max_position_embeddings=context,
        architectures=[model_class.__name__],
        auto_map={
            "AutoConfig": f"{Path(REMOTE_CODE).stem}.{config_class.__name__}",
            "AutoModelForCausalLM": f"{Path(REMOTE_CODE).stem}.{model_class.__name__}",
        },
        **special,
    )
    model = model_class(config)
    model.model.load_state_dict(loaded.model.state_dict())
    return model.to(device).eval(), tokenizer


def rename_package(text: str, new: str) -> str:
    """``text`` with the name ``parallax`` replaced where it is code (imports, attribute
    access), never inside strings or comments."""
    lines = io.StringIO(text).readlines()
    hits = [
        tok.start
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type == tokenize.NAME and tok.string == "parallax"
    ]
    for row, col in reversed(hits):
        line = lines[row - 1]
        lines[row - 1] = line[:col] + new + line[col + len("parallax") :]
    return "".join(lines)


def bundle_source() -> str:
    """The text of ``parallax_source.py``: every module of this package but the CLI and
    these wrappers, renamed to a private package whose name hashes the source."""
    root = Path(parallax.__file__).parent
    files = {
        p.relative_to(root).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted(root.rglob("*.py"))
        if p.relative_to(root).parts[0] not in NOT_BUNDLED and "__pycache__" not in p.parts
    }
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    name = f"parallax_bundle_{digest}"
    body = "".join(f"    {rel!r}: {rename_package(text, name)!r},\n" for rel, text in files.items())
    return (
        f'"""The parallax {parallax.__version__} source this model was exported with, as package {name}.\n\n'
        f'Written by `parallax export`; {REMOTE_CODE} unpacks and imports it. Do not edit."""\n\n'
        f"NAME = {name!r}\n"
        f"SOURCES = {{\n{body}}}\n"
    )


def export_hf(run_dir, out_dir, overrides: list[str] = ()) -> tuple[Path, bool]:
    """Write the run as a Hugging Face folder; returns it and whether it has a tokenizer."""
    model, tokenizer = build_hf_model(run_dir, overrides)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ParallaxError(f"{str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.use_cache = False
    model.save_pretrained(out)
    shutil.copyfile(Path(__file__).with_name(REMOTE_CODE), out / REMOTE_CODE)
    (out / BUNDLE).write_text(bundle_source(), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out, tokenizer is not None
