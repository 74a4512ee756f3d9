"""The one output type every model returns, and the shared loss.

Evaluation and plotting read ``diagnostics`` by key without knowing which model produced
them. Conventions for the keys (a model fills only those it has):

* ``k_used``        (B, T)        iterations each token used (CWS; recurrent depth)
* ``settle_trace``  (B, T, K)     ||raw_k - raw_{k-1}|| per iteration, NaN after halting
* ``residual``      (S,)          fixed-point residual ||dz||/||z|| per solver step (EAM)
* ``energy``        (S,)          Hopfield energy per solver step (EAM)

Per-token tensors are shaped ``(B, T, ...)`` so they line up with ``logits``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: Tensor
    loss: Tensor | None = None
    diagnostics: dict[str, Tensor] = field(default_factory=dict)


# A pytree node, so code that walks a module's output finds the tensors inside. FSDP2 hooks its
# gradient reduce-scatter and resharding on them: in torch 2.11, which does not look inside
# unregistered dataclasses, a model under FSDP2 silently stopped learning.
torch.export.register_dataclass(ModelOutput, serialized_type_name="parallax.ModelOutput")


def token_loss(logits: Tensor, targets: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """Per-token cross-entropy (B, T) in fp32; masked positions are 0."""
    if loss_mask is not None:
        targets = targets.masked_fill(~loss_mask.bool(), IGNORE_INDEX)
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)


def lm_loss(logits: Tensor, targets: Tensor, loss_mask: Tensor | None = None) -> Tensor:
    """Mean cross-entropy over the positions the mask keeps (all positions if no mask)."""
    if loss_mask is not None:
        targets = targets.masked_fill(~loss_mask.bool(), IGNORE_INDEX)
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
