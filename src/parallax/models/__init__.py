"""Model architectures. Importing this package registers every model by name.

Every model is an ``nn.Module`` built from its config dataclass whose
``forward(input_ids, targets=None, loss_mask=None)`` returns a ``ModelOutput``. Causal models
that decode incrementally also provide ``new_cache(batch, max_len)`` and accept ``cache=``.
Models with layers that run exactly once per forward list them in ``shard_units()``, so FSDP2
shards and gathers those one at a time (never a layer inside a loop: trip counts can differ
between ranks).
Adding a model is adding a module (or sub-package) here that calls ``MODELS.register``.
"""

import sys

from parallax.discovery import import_submodules
from parallax.models.output import ModelOutput, count_parameters, lm_loss, token_loss
from parallax.registry import MODELS

import_submodules(sys.modules[__name__])


def build_model(cfg):
    """Build the registered model whose config class is ``type(cfg)``."""
    from parallax.config import section_name

    return MODELS.get(section_name(MODELS, cfg)).builder(cfg)


__all__ = ["ModelOutput", "build_model", "count_parameters", "lm_loss", "token_loss", "MODELS"]
