"""Per-token evaluation records: the common ground of metrics, K-DOF analysis and plots.

``collect_records`` runs a model over fixed validation batches and keeps, for every scored
token, its difficulty label, loss, correctness and whatever per-token diagnostics the model
returned (``k_used``, ``settle_trace``...). Analyses read records, never models, so they work
for any architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from parallax.data.batch import DataSource, batch_generator
from parallax.models.output import token_loss


@dataclass
class TokenRecords:
    """Flattened over every scored token of every evaluated sequence (N tokens)."""

    label: Tensor  # (N,) index into label_names
    loss: Tensor  # (N,) cross-entropy in nats
    correct: Tensor  # (N,) argmax == target
    sequence: Tensor  # (N,) which evaluated sequence the token came from
    position: Tensor  # (N,) position within its sequence
    label_names: tuple[str, ...]
    token_diagnostics: dict[str, Tensor] = field(default_factory=dict)  # (N, ...)
    run_diagnostics: dict[str, Tensor] = field(default_factory=dict)  # mean over batches

    @property
    def num_sequences(self) -> int:
        return int(self.sequence.max()) + 1 if self.sequence.numel() else 0


@torch.no_grad()
def collect_records(
    model: torch.nn.Module,
    source: DataSource,
    *,
    batches: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    split: str = "val",
    autocast_dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> TokenRecords:
    """Records of batches ``0 .. batches - 1`` of ``split``, or of those with ``i % world_size ==
    rank`` when processes share the work. Sequences keep their index among all ``batches``, so
    the shares of the ranks merge into the records of one process."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {k: [] for k in ("label", "loss", "correct", "sequence", "position")}
    diag_parts: dict[str, list[Tensor]] = {}
    run_diag: dict[str, list[Tensor]] = {}
    for i in range(rank, batches, world_size):
        batch = source.batch(split, batch_size, batch_generator(seed, split, i)).to(device)
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            # loss_mask tells non-causal models (EAM) which positions are the answer to hide
            out = model(batch.input_ids, loss_mask=batch.loss_mask)
        logits = out.logits.float()
        mask = batch.loss_mask.bool()
        b, t = mask.shape
        losses = token_loss(logits, batch.targets, mask)
        seq_index = (torch.arange(b, device=mask.device) + i * batch_size).unsqueeze(1).expand(b, t)
        pos_index = torch.arange(t, device=mask.device).unsqueeze(0).expand(b, t)
        parts["label"].append(batch.labels[mask])
        parts["loss"].append(losses[mask])
        parts["correct"].append((logits.argmax(-1) == batch.targets)[mask])
        parts["sequence"].append(seq_index[mask])
        parts["position"].append(pos_index[mask])
        for key, value in out.diagnostics.items():
            if value.dim() >= 2 and value.shape[:2] == (b, t):
                diag_parts.setdefault(key, []).append(value[mask].float().cpu())
            else:
                run_diag.setdefault(key, []).append(value.float().cpu())
    model.train(was_training)
    cat = {k: torch.cat(v).cpu() for k, v in parts.items()}
    return TokenRecords(
        label_names=tuple(source.label_names),
        token_diagnostics={k: torch.cat(v) for k, v in diag_parts.items()},
        run_diagnostics={k: torch.stack(v).mean(0) for k, v in run_diag.items()},
        **cat,
    )


def summarize(records: TokenRecords) -> dict[str, float | dict]:
    """Loss, token accuracy, whole-sequence accuracy and the same per difficulty label."""
    if records.loss.numel() == 0:
        return {"loss": float("nan"), "token_accuracy": float("nan"), "sequence_accuracy": float("nan")}
    n_seq = records.num_sequences
    wrong_per_seq = torch.zeros(n_seq).index_add_(0, records.sequence, (~records.correct).float())
    scored_seq = torch.zeros(n_seq).index_add_(0, records.sequence, torch.ones_like(records.loss))
    metrics: dict[str, float | dict] = {
        "loss": records.loss.mean().item(),
        "token_accuracy": records.correct.float().mean().item(),
        "sequence_accuracy": (wrong_per_seq[scored_seq > 0] == 0).float().mean().item(),
        "tokens": int(records.loss.numel()),
    }
    per_label = {}
    for idx, name in enumerate(records.label_names):
        sel = records.label == idx
        if sel.any():
            per_label[name] = {
                "tokens": int(sel.sum()),
                "loss": records.loss[sel].mean().item(),
                "accuracy": records.correct[sel].float().mean().item(),
            }
    if len(per_label) > 1:
        metrics["per_label"] = per_label
    return metrics
