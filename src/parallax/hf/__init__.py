"""Hugging Face and lm-evaluation-harness integration (extras ``hf`` and ``eval``).

``modeling_parallax`` holds the ``PretrainedConfig`` / ``PreTrainedModel`` wrappers (and is
the remote code of an export); ``export`` turns a run directory into a folder that
``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` and ``AutoTokenizer``
load. Nothing here is imported by the core package, so transformers stays optional.
"""

from __future__ import annotations

import importlib.util

from parallax.errors import ParallaxError


def require(module: str, extra: str) -> None:
    """Raise a one-line install hint when an optional dependency is missing."""
    if importlib.util.find_spec(module) is None:
        raise ParallaxError(
            f"this needs the {module!r} package: pip install 'parallax[{extra}]' "
            "(on a CPU-only machine install torch first so pip keeps it)"
        )
