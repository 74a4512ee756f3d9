"""K-DOF analysis and plots on records with known K, and the compute-quality sweep on a fake model."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from parallax.data.bind_recall import LABEL_NAMES, QUERY, BindRecallConfig, BindRecallTask
from parallax.eval.kdof import (
    average_ranks,
    compute_quality_curve,
    hard_easy_ratio,
    k_by_surprisal,
    kdof_report,
    spearman,
)
from parallax.eval.plots import save_kdof_plots, save_training_curves
from parallax.eval.records import TokenRecords
from parallax.models.output import ModelOutput

PNG_HEADER = b"\x89PNG\r\n\x1a\n"
K_PER_LABEL = {"structural": 2.0, "easy": 4.0, "recall_near": 12.0, "recall_far": 16.0}


def make_records(k_per_label=K_PER_LABEL, per_label=10, with_k=True, k_max=24):
    """Records of 4 sequences; every token of a label uses the same K; loss grows with K."""
    labels, ks = [], []
    for name, k in k_per_label.items():
        labels += [LABEL_NAMES.index(name)] * per_label
        ks += [k] * per_label
    n = len(labels)
    k = torch.tensor(ks)
    trace = torch.full((n, k_max), float("nan"))
    for i, used in enumerate(ks):
        trace[i, : int(used)] = torch.logspace(0, -3, k_max)[: int(used)]
    diagnostics = {"k_used": k, "settle_trace": trace} if with_k else {}
    return TokenRecords(
        label=torch.tensor(labels),
        loss=k / 10,
        correct=k < 10,
        sequence=torch.arange(n) % 4,
        position=torch.arange(n),
        label_names=LABEL_NAMES,
        token_diagnostics=diagnostics,
    )


def test_average_ranks_and_spearman_with_ties_match_hand_computation():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    # ranks (1,2,3,4) vs (1,2.5,2.5,4): 4.5 / sqrt(5 * 4.5)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 2, 2, 5])) == pytest.approx(3 / math.sqrt(10))
    # ranks (1.5,1.5,3.5,3.5) vs (4,3,2,1): -4 / sqrt(4 * 5)
    assert spearman(torch.tensor([1.0, 1, 2, 2]), torch.tensor([4.0, 3, 2, 1])) == pytest.approx(-2 / math.sqrt(5))
    assert math.isnan(spearman(torch.ones(5), torch.arange(5.0)))
    assert spearman(torch.arange(6.0), torch.arange(6.0) ** 3) == pytest.approx(1.0)


def test_report_recovers_known_k_per_label_and_ratio():
    report = kdof_report(make_records(), surprisal_bins=4)
    json.dumps(report, allow_nan=False)
    per_label = report["per_label"]
    assert set(per_label) == set(K_PER_LABEL)
    for name, k in K_PER_LABEL.items():
        assert per_label[name]["mean_k"] == k and per_label[name]["median_k"] == k
        assert per_label[name]["tokens"] == 10
        assert per_label[name]["accuracy"] == (1.0 if k < 10 else 0.0)
    ratio = report["hard_vs_easy"]
    assert ratio["hard_labels"] == ["recall_near", "recall_far", "recall_rebound"]
    assert ratio["hard_mean_k"] == 14.0 and ratio["easy_mean_k"] == 4.0 and ratio["ratio"] == 3.5
    assert report["spearman_k_loss"] == pytest.approx(1.0)
    assert [b["mean_k"] for b in report["k_by_surprisal"]] == [2.0, 4.0, 12.0, 16.0]
    assert report["mean_k"] == pytest.approx(8.5)
    assert len(report["settle_trace_by_label"]["easy"]) == 24


def test_custom_and_missing_label_groups():
    records = make_records()
    custom = hard_easy_ratio(records, hard_labels=["recall_far"], easy_labels=["structural"])
    assert custom["ratio"] == 8.0
    no_easy = make_records({"structural": 2.0, "recall_far": 16.0})
    assert hard_easy_ratio(no_easy)["ratio"] is None and hard_easy_ratio(no_easy)["easy_tokens"] == 0
    no_k = kdof_report(make_records(with_k=False))
    json.dumps(no_k, allow_nan=False)
    assert not no_k["has_k"] and no_k["hard_vs_easy"]["ratio"] is None and no_k["spearman_k_loss"] is None
    assert no_k["per_label"]["easy"]["mean_k"] is None and no_k["per_label"]["easy"]["accuracy"] == 1.0


def test_surprisal_bins_keep_ties_together_and_flat_k_is_flat():
    records = make_records({"easy": 5.0, "recall_near": 5.0}, per_label=20)
    records.loss = torch.arange(40.0) % 8  # five of each loss value
    bins = k_by_surprisal(records, bins=4)
    assert [b["mean_k"] for b in bins] == [5.0] * len(bins)
    assert sum(b["tokens"] for b in bins) == 40
    assert all(bins[i]["loss_max"] < bins[i + 1]["loss_min"] for i in range(len(bins) - 1))


@dataclass
class FakeConfig:
    k_max: int = 24
    halt_tol: float = 0.05


class CopyingFakeModel(nn.Module):
    """Predicts "repeat the input token" with confidence k_max; spends k_max on queried keys
    (recall positions of bind_recall) and k_max // 4 elsewhere. Fails when k_max == 13."""

    def __init__(self, task):
        super().__init__()
        self.config = FakeConfig()
        self.task = task
        self.calls = 0

    def forward(self, input_ids, loss_mask=None):
        self.calls += 1
        if self.config.k_max == 13:
            raise RuntimeError("boom")
        logits = self.config.k_max * nn.functional.one_hot(input_ids, self.task.vocab_size).float()
        is_query = torch.zeros_like(input_ids, dtype=torch.bool)
        is_query[:, 1:] = input_ids[:, :-1] == QUERY  # the queried key, whose target is the recall
        k = torch.where(is_query, self.config.k_max, self.config.k_max // 4).float()
        return ModelOutput(logits=logits, diagnostics={"k_used": k})


def test_quality_curve_sweeps_and_restores_config():
    task = BindRecallTask(BindRecallConfig())
    model = CopyingFakeModel(task)
    curve = compute_quality_curve(model, task, k_max_values=[4, 8, 16], batches=2, batch_size=4)
    assert model.config.k_max == 24 and model.calls == 6
    assert [p["k_max"] for p in curve] == [4, 8, 16]
    assert [p["recall_mean_k"] for p in curve] == [4.0, 8.0, 16.0]
    assert curve[0]["mean_k"] < curve[1]["mean_k"] < curve[2]["mean_k"] < 16
    assert curve[0]["accuracy"] == curve[1]["accuracy"] == curve[2]["accuracy"]  # same batches, same argmax
    assert curve[0]["loss"] < curve[1]["loss"] < curve[2]["loss"]  # ever more confident where the copy is wrong
    assert curve[0]["recall_accuracy"] == 0.0  # copying the query key never gives its value
    assert all(0 < p["accuracy"] < 1 for p in curve)  # copies are right on easy tokens only
    json.dumps(curve, allow_nan=False)

    tol_curve = compute_quality_curve(model, task, tol_values=[0.1, 0.01], batches=1, batch_size=2)
    assert [p["halt_tol"] for p in tol_curve] == [0.1, 0.01] and model.config.halt_tol == 0.05

    with pytest.raises(RuntimeError, match="boom"):
        compute_quality_curve(model, task, k_max_values=[8, 13], batches=1, batch_size=2)
    assert model.config.k_max == 24
    with pytest.raises(ValueError, match="exactly one"):
        compute_quality_curve(model, task, batches=1, batch_size=2)


def is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG_HEADER and len(data) > 2000


def test_kdof_plots_are_valid_pngs(tmp_path):
    records = make_records()
    curve = [{"k_max": k, "mean_k": k / 2, "accuracy": 0.5 + k / 100, "loss": 1 / k, "recall_accuracy": None}
             for k in (4, 8, 16, 24)]
    written = save_kdof_plots(records, curve, tmp_path)
    assert sorted(p.name for p in written) == [
        "k_by_label.png", "k_per_token.png", "quality_curve.png", "settling_traces.png"]
    assert all(is_png(p) for p in written)
    assert save_kdof_plots(make_records(with_k=False), [], tmp_path / "none") == []


def test_training_curves_tolerate_missing_keys_and_a_torn_last_line(tmp_path):
    lines = [
        {"step": 10, "train_loss": 3.0, "lr": 0.001},
        {"step": 20, "train_loss": 2.5},
        {"step": 20, "val_loss": 2.7, "val_token_accuracy": 0.3},
        {"step": 30, "train_loss": 2.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 40, "train_lo')
    written = save_training_curves(path, tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "accuracy.png"] and all(is_png(p) for p in written)
    path.write_text(json.dumps({"step": 1, "train_loss": 1.0}) + "\n\n")
    assert [p.name for p in save_training_curves(path, tmp_path / "only_loss")] == ["loss.png"]
