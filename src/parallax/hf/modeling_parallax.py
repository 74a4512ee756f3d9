"""Hugging Face ``PretrainedConfig`` / ``PreTrainedModel`` wrappers of parallax's causal models.

This file is also the remote code of an export: ``parallax export RUN_DIR --hf OUT_DIR``
copies it into OUT_DIR next to ``parallax_source.py``, which holds the source of the parallax
package that wrote the weights. ``AutoModelForCausalLM.from_pretrained(OUT_DIR,
trust_remote_code=True)`` then needs torch and transformers only: the model is built from
that bundled source, imported under a private package name, so the export keeps working
where parallax is absent or at another version. Run from an installed parallax (no bundle
beside this file), the installed package is used.

The models keep no KV cache for ``generate()``: each step re-reads the context, cropped to
the model's context length as ``parallax generate`` crops it, so greedy tokens are the same.
They take no attention mask, so batches must be padded on the right.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from .parallax_source import NAME, SOURCES
except ImportError:  # this file inside an installed parallax: no bundle beside it
    NAME = SOURCES = None

CAUSAL_MODELS = ("cws", "recurrent", "swap", "transformer")


def _load_bundle(name: str, sources: dict[str, str]):
    """Write the bundled package to disk once (atomically) and import it by file location.

    Real files, rather than an in-memory importer, keep ``pkgutil`` discovery (the model
    registry), tracebacks and ``inspect`` working.
    """
    if name in sys.modules:
        return sys.modules[name]
    root = None
    for parent in (Path(__file__).parent, Path(tempfile.gettempdir())):
        if os.access(parent, os.W_OK) or (parent / name).is_dir():
            root = parent / name
            break
    if root is None:
        raise OSError(f"nowhere to unpack the bundled parallax source: {Path(__file__).parent} is read-only")
    if not root.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root.parent))
        for rel, text in sources.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text, encoding="utf-8")
        try:
            os.rename(tmp, root)
        except OSError:  # another process unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
            if not root.is_dir():
                raise
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


def parallax_package():
    """The parallax package these wrappers build from: the bundle if present, else the installed one."""
    return _load_bundle(NAME, SOURCES) if SOURCES is not None else importlib.import_module("parallax")


class ParallaxConfig(PretrainedConfig):
    """A parallax model config: ``parallax_model`` names the architecture and
    ``parallax_config`` holds its config dataclass as a dict (test-time knobs such as
    ``k_max`` may be changed there before building the model)."""

    model_type = "parallax"

    def __init__(
        self,
        parallax_model: str = "transformer",
        parallax_config: dict | None = None,
        vocab_size: int = 0,
        max_position_embeddings: int | None = None,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.parallax_model = parallax_model
        self.parallax_config = dict(parallax_config or {})
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.tie_word_embeddings = tie_word_embeddings
        kwargs.setdefault("use_cache", False)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def _check_right_padded(attention_mask: torch.Tensor | None) -> None:
    """The models see every position, so only right padding (ignored by causality) is safe."""
    if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise ValueError(
            "parallax models take no attention mask: pad batches on the right (tokenizer.padding_side='right')"
        )


class ParallaxForCausalLM(PreTrainedModel, GenerationMixin):
    """A parallax causal model (``self.model``) behind the Hugging Face interface.

    Weight names are the parallax names under ``model.``; the LM head is tied to the token
    embedding, so a checkpoint stores ``model.embed.weight`` once.
    """

    config_class = ParallaxConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
    _no_split_modules: list[str] = []
    _supports_cache_class = False  # transformers 4.x: do not hand us a DynamicCache

    def __init__(self, config: ParallaxConfig):
        super().__init__(config)
        if config.parallax_model not in CAUSAL_MODELS:
            raise ValueError(
                f"parallax model {config.parallax_model!r} is not causal; "
                f"the Hugging Face wrappers cover {', '.join(CAUSAL_MODELS)}"
            )
        models = importlib.import_module(parallax_package().__name__ + ".models")
        entry = models.MODELS.get(config.parallax_model)
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.parallax_config.items()}
        with torch.device("cpu"):  # real tensors even where transformers builds on the meta device
            self.model = entry.builder(entry.config_class(**fields))
        self._buffer_values = {
            id(module): {name: module.get_buffer(name).clone() for name in module._non_persistent_buffers_set}
            for module in self.model.modules()
            if module._non_persistent_buffers_set
        }
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not create a cache: the wrapped models keep none

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Restore ``module``'s non-persistent buffers (RoPE tables), which transformers 5
        re-allocates empty when loading; the parallax model initialised its parameters when
        built, and loading replaces them."""
        for name, value in self._buffer_values.get(id(module), {}).items():
            buffer = module.get_buffer(name)
            module.register_buffer(name, value.to(buffer.device, buffer.dtype), persistent=False)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.lm_head = value

    def context_length(self) -> int | None:
        """The longest context the model reads, as ``parallax generate`` computes it."""
        generation = importlib.import_module(parallax_package().__name__ + ".generation")
        return generation.context_length(self.model)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, V); with ``labels`` (B, T), the mean next-token loss (labels are
        shifted here, -100 ignored), as for any Hugging Face causal LM."""
        _check_right_padded(attention_mask)
        logits = self.model(input_ids).logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask=None, **kwargs) -> dict:
        """The whole sequence every step (no cache), cropped to the context."""
        context = self.context_length()
        if context is not None:
            input_ids = input_ids[:, -context:]
            attention_mask = attention_mask[:, -context:] if attention_mask is not None else None
        return {"input_ids": input_ids, "attention_mask": attention_mask}


# One config and model class per architecture, so each has its own ``model_type``. Each
# config names ``__init__`` itself: transformers 5 otherwise gives a config subclass a
# generated dataclass ``__init__`` that skips ``ParallaxConfig.__init__``.


class ParallaxCWSConfig(ParallaxConfig):
    model_type = "parallax_cws"
    __init__ = ParallaxConfig.__init__


class ParallaxCWSForCausalLM(ParallaxForCausalLM):
    config_class = ParallaxCWSConfig


class ParallaxRecurrentConfig(ParallaxConfig):
    model_type = "parallax_recurrent"
    __init__ = ParallaxConfig.__init__


class ParallaxRecurrentForCausalLM(ParallaxForCausalLM):
    config_class = ParallaxRecurrentConfig


class ParallaxSwapConfig(ParallaxConfig):
    model_type = "parallax_swap"
    __init__ = ParallaxConfig.__init__


class ParallaxSwapForCausalLM(ParallaxForCausalLM):
    config_class = ParallaxSwapConfig


class ParallaxTransformerConfig(ParallaxConfig):
    model_type = "parallax_transformer"
    __init__ = ParallaxConfig.__init__


class ParallaxTransformerForCausalLM(ParallaxForCausalLM):
    config_class = ParallaxTransformerConfig


CLASSES = {
    "cws": (ParallaxCWSConfig, ParallaxCWSForCausalLM),
    "recurrent": (ParallaxRecurrentConfig, ParallaxRecurrentForCausalLM),
    "swap": (ParallaxSwapConfig, ParallaxSwapForCausalLM),
    "transformer": (ParallaxTransformerConfig, ParallaxTransformerForCausalLM),
}
