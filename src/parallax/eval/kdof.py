"""K-DOF analysis: does a model spend more iterations (K) on harder tokens?

The CWS seeds claim ~18 of 24 iterations on hard recall tokens against ~7.5 on easy ones
(synthetic BIND/RECALL), and K uniform across surprisal quantiles on TinyStories. These
functions measure both from ``TokenRecords`` (``records.token_diagnostics["k_used"]``, (N,))
so any model that reports per-token K can be tested; only ``compute_quality_curve`` runs a
model. Records without K still get accuracy and loss; the K fields are then ``None``.

Which labels count as hard or easy is a parameter: by default every label whose name starts
with ``recall`` is hard and ``easy`` is easy (the ``bind_recall`` scheme). Everything returned
is JSON-serialisable (plain floats, ints, lists, dicts; ``None`` where undefined).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from parallax.data.batch import DataSource
from parallax.eval.records import TokenRecords, collect_records

K_KEY = "k_used"
TRACE_KEY = "settle_trace"
EASY_LABELS = ("easy",)


def default_hard_labels(label_names: Sequence[str]) -> tuple[str, ...]:
    """The recall-type labels: every name starting with ``recall``."""
    return tuple(n for n in label_names if n.startswith("recall"))


def _number(x: float | Tensor) -> float | None:
    value = float(x)
    return None if math.isnan(value) else value


def _token_k(records: TokenRecords) -> Tensor | None:
    k = records.token_diagnostics.get(K_KEY)
    return None if k is None else k.float().reshape(-1)


def _select(records: TokenRecords, names: Sequence[str]) -> Tensor:
    """(N,) bool: tokens whose label is one of ``names`` (names absent from the records are skipped)."""
    ids = [records.label_names.index(n) for n in names if n in records.label_names]
    return torch.isin(records.label, torch.tensor(ids, dtype=records.label.dtype))


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of ``x`` (N,), tied values sharing the mean of their ranks."""
    x = x.double().reshape(-1)
    if x.numel() == 0:
        return x
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[1:] = sorted_x[1:] != sorted_x[:-1]
    group = torch.cumsum(new_group.long(), 0) - 1  # group id of each sorted element
    positions = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    group_sum = torch.zeros(int(group[-1]) + 1, dtype=torch.float64).index_add_(0, group, positions)
    group_size = torch.bincount(group).double()
    ranks = torch.empty_like(x)
    ranks[order] = (group_sum / group_size)[group]
    return ranks


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation of two (N,) tensors (average ranks for ties); NaN if undefined."""
    if x.numel() != y.numel():
        raise ValueError(f"spearman needs equal lengths, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    return float("nan") if denominator == 0 else float((rx * ry).sum() / denominator)


def label_stats(records: TokenRecords) -> dict[str, dict]:
    """Per label present: tokens, mean and (lower) median K, accuracy and mean loss."""
    k = _token_k(records)
    stats = {}
    for idx, name in enumerate(records.label_names):
        sel = records.label == idx
        if not sel.any():
            continue
        stats[name] = {
            "tokens": int(sel.sum()),
            "mean_k": None if k is None else _number(k[sel].mean()),
            "median_k": None if k is None else _number(k[sel].median()),
            "accuracy": _number(records.correct[sel].float().mean()),
            "loss": _number(records.loss[sel].mean()),
        }
    return stats


def hard_easy_ratio(
    records: TokenRecords,
    hard_labels: Sequence[str] | None = None,
    easy_labels: Sequence[str] = EASY_LABELS,
) -> dict:
    """Mean K over hard-labelled tokens divided by mean K over easy ones (the seed's 18 / 7.5).

    ``ratio`` is ``None`` when K is missing or either group has no tokens.
    """
    hard_labels = default_hard_labels(records.label_names) if hard_labels is None else tuple(hard_labels)
    k = _token_k(records)
    out = {"hard_labels": list(hard_labels), "easy_labels": list(easy_labels)}
    hard, easy = _select(records, hard_labels), _select(records, easy_labels)
    out["hard_tokens"], out["easy_tokens"] = int(hard.sum()), int(easy.sum())
    hard_k = _number(k[hard].mean()) if k is not None and hard.any() else None
    easy_k = _number(k[easy].mean()) if k is not None and easy.any() else None
    out["hard_mean_k"], out["easy_mean_k"] = hard_k, easy_k
    out["ratio"] = hard_k / easy_k if hard_k is not None and easy_k else None
    return out


def k_by_surprisal(records: TokenRecords, bins: int = 10) -> list[dict]:
    """Mean K in ``bins`` equal-count quantile bins of surprisal (the token's loss).

    Tokens are binned by their average rank, so tied losses always share a bin (bins may
    therefore be uneven, or empty and left out, when losses tie a lot).
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    n = records.loss.numel()
    if n == 0:
        return []
    k = _token_k(records)
    which = ((average_ranks(records.loss) - 0.5) * bins / n).long().clamp(0, bins - 1)
    out = []
    for b in range(bins):
        sel = which == b
        if not sel.any():
            continue
        loss = records.loss[sel]
        out.append({
            "bin": b,
            "tokens": int(sel.sum()),
            "loss_min": float(loss.min()),
            "loss_max": float(loss.max()),
            "mean_loss": float(loss.mean()),
            "mean_k": None if k is None else _number(k[sel].mean()),
            "accuracy": _number(records.correct[sel].float().mean()),
        })
    return out


def mean_settle_traces(records: TokenRecords) -> dict[str, list[float | None]]:
    """Per label, the mean settling trace over iterations (NaN after halting is skipped)."""
    trace = records.token_diagnostics.get(TRACE_KEY)
    if trace is None:
        return {}
    out = {}
    for idx, name in enumerate(records.label_names):
        sel = records.label == idx
        if sel.any():
            out[name] = [_number(v) for v in torch.nanmean(trace[sel].float(), dim=0)]
    return out


def kdof_report(
    records: TokenRecords,
    *,
    hard_labels: Sequence[str] | None = None,
    easy_labels: Sequence[str] = EASY_LABELS,
    surprisal_bins: int = 10,
    curve: list[dict] | None = None,
) -> dict:
    """Everything above in one JSON-serialisable dict (``curve`` is passed through)."""
    k = _token_k(records)
    report = {
        "tokens": int(records.loss.numel()),
        "has_k": k is not None,
        "mean_k": _number(k.mean()) if k is not None and k.numel() else None,
        "accuracy": _number(records.correct.float().mean()) if records.loss.numel() else None,
        "loss": _number(records.loss.mean()) if records.loss.numel() else None,
        "per_label": label_stats(records),
        "hard_vs_easy": hard_easy_ratio(records, hard_labels, easy_labels),
        "spearman_k_loss": _number(spearman(k, records.loss)) if k is not None else None,
        "k_by_surprisal": k_by_surprisal(records, surprisal_bins),
        "settle_trace_by_label": mean_settle_traces(records),
    }
    if curve is not None:
        report["quality_curve"] = curve
    return report


def compute_quality_curve(
    model: torch.nn.Module,
    source: DataSource,
    *,
    k_max_values: Sequence[int] | None = None,
    tol_values: Sequence[float] | None = None,
    batches: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    hard_labels: Sequence[str] | None = None,
) -> list[dict]:
    """Accuracy and loss as test-time compute is turned up: one point per ``k_max`` or tolerance.

    Sets ``model.config.k_max`` (or ``model.config.halt_tol``) to each value, re-collects records
    on the same batches, and restores the original value afterwards, even on error. Each point:
    ``{"k_max" | "halt_tol": v, "mean_k", "accuracy", "loss", "recall_accuracy", "recall_mean_k"}``
    where recall means the hard labels (``None`` if the source has none).
    """
    if (k_max_values is None) == (tol_values is None):
        raise ValueError("give exactly one of k_max_values and tol_values")
    attr, values = ("k_max", k_max_values) if k_max_values is not None else ("halt_tol", tol_values)
    config = getattr(model, "config", None)
    if not hasattr(config, attr):
        raise ValueError(f"{type(model).__name__} has no config.{attr} to sweep")
    original = getattr(config, attr)
    curve = []
    try:
        for value in values:
            setattr(config, attr, value)
            records = collect_records(model, source, batches=batches, batch_size=batch_size, device=device, seed=seed)
            k = _token_k(records)
            hard = _select(records, default_hard_labels(records.label_names) if hard_labels is None else hard_labels)
            curve.append({
                attr: value,
                "mean_k": _number(k.mean()) if k is not None else None,
                "accuracy": _number(records.correct.float().mean()),
                "loss": _number(records.loss.mean()),
                "recall_accuracy": _number(records.correct[hard].float().mean()) if hard.any() else None,
                "recall_mean_k": _number(k[hard].mean()) if k is not None and hard.any() else None,
            })
    finally:
        setattr(config, attr, original)
    return curve
