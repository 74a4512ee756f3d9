"""PNG figures for K-DOF and training runs, drawn from records, curves and metrics.jsonl.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas) rather than pyplot, so
nothing touches a display or the process-wide backend, and plotting works on headless nodes.
Every ``plot_*`` function writes one PNG and returns its path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from parallax.eval.kdof import K_KEY, TRACE_KEY
from parallax.eval.records import TokenRecords


def _colour(label: int):
    return matplotlib.colormaps["tab10"](label % 10)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_sequence_k(records: TokenRecords, path: Path, sequences: Sequence[int] = (0, 1, 2)) -> Path:
    """K of every scored token of a few sequences, in position order, bars coloured by label.

    Only scored tokens are in the records, so positions without a bar were not scored.
    """
    k = records.token_diagnostics[K_KEY].float()
    shown = [s for s in sequences if bool((records.sequence == s).any())]
    fig = Figure(figsize=(12, 2.4 * max(1, len(shown))), layout="constrained")
    axes = fig.subplots(max(1, len(shown)), 1, squeeze=False)[:, 0]
    for ax, seq in zip(axes, shown):
        sel = records.sequence == seq
        order = torch.argsort(records.position[sel])
        positions, ks, labels = records.position[sel][order], k[sel][order], records.label[sel][order]
        ax.bar(positions.tolist(), ks.tolist(), width=0.8, color=[_colour(int(i)) for i in labels])
        ax.set_ylabel("K")
        ax.set_title(f"sequence {seq}", fontsize=9)
    axes[-1].set_xlabel("position")
    present = sorted(set(records.label.tolist()))
    handles = [Patch(color=_colour(i), label=records.label_names[i]) for i in present]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    return _save(fig, path)


def plot_k_distribution(records: TokenRecords, path: Path) -> Path:
    """Box plot of K per label (labels with no tokens are left out)."""
    k = records.token_diagnostics[K_KEY].float()
    present = [i for i in range(len(records.label_names)) if bool((records.label == i).any())]
    fig = Figure(figsize=(1.6 * max(3, len(present)), 4), layout="constrained")
    ax = fig.subplots()
    ax.boxplot([k[records.label == i].tolist() for i in present], showmeans=True)
    ax.set_xticks(range(1, len(present) + 1), [records.label_names[i] for i in present], rotation=20)
    ax.set_ylabel("K (iterations used)")
    ax.set_title("K per label")
    return _save(fig, path)


def plot_settling_traces(records: TokenRecords, path: Path, per_label: int = 3) -> Path:
    """||raw_k - raw_{k-1}|| against k: ``per_label`` faint traces and the mean per label, log y."""
    trace = records.token_diagnostics[TRACE_KEY].float()  # (N, K), NaN after halting
    steps = list(range(1, trace.shape[1] + 1))
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for idx, name in enumerate(records.label_names):
        rows = trace[records.label == idx]
        if rows.shape[0] == 0:
            continue
        for row in rows[:per_label]:
            ax.plot(steps, row.tolist(), color=_colour(idx), alpha=0.25, linewidth=0.8)
        ax.plot(steps, torch.nanmean(rows, dim=0).tolist(), color=_colour(idx), linewidth=2, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("iteration k")
    ax.set_ylabel("||raw_k - raw_{k-1}||")
    ax.set_title("settling traces (thin: single tokens, thick: mean per label)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_quality_curve(curve: list[dict], path: Path) -> Path:
    """Accuracy, loss and mean K against the swept knob (``k_max`` or ``halt_tol``)."""
    knob = "k_max" if "k_max" in curve[0] else "halt_tol"
    xs = [point[knob] for point in curve]

    def series(key):
        return [float("nan") if point.get(key) is None else point[key] for point in curve]

    fig = Figure(figsize=(12, 3.6), layout="constrained")
    acc_ax, loss_ax, k_ax = fig.subplots(1, 3)
    acc_ax.plot(xs, series("accuracy"), marker="o", label="all scored")
    if any(point.get("recall_accuracy") is not None for point in curve):
        acc_ax.plot(xs, series("recall_accuracy"), marker="s", label="recall")
    acc_ax.set_ylabel("accuracy")
    acc_ax.legend(fontsize=8)
    loss_ax.plot(xs, series("loss"), marker="o", color="tab:red")
    loss_ax.set_ylabel("loss (nats)")
    k_ax.plot(xs, series("mean_k"), marker="o", color="tab:green", label="all scored")
    if any(point.get("recall_mean_k") is not None for point in curve):
        k_ax.plot(xs, series("recall_mean_k"), marker="s", color="tab:olive", label="recall")
    k_ax.set_ylabel("mean K used")
    k_ax.legend(fontsize=8)
    for ax in (acc_ax, loss_ax, k_ax):
        ax.set_xlabel(knob)
        if knob == "halt_tol":
            ax.set_xscale("log")
    fig.suptitle("compute-quality curve")
    return _save(fig, path)


def save_kdof_plots(records: TokenRecords, curve: list[dict] | None, out_dir: Path) -> list[Path]:
    """Every K-DOF figure the data allows: the K plots need ``k_used``, the traces
    ``settle_trace``, the curve a non-empty ``curve``."""
    out_dir = Path(out_dir)
    written = []
    if K_KEY in records.token_diagnostics and records.loss.numel():
        written.append(plot_sequence_k(records, out_dir / "k_per_token.png"))
        written.append(plot_k_distribution(records, out_dir / "k_by_label.png"))
    if TRACE_KEY in records.token_diagnostics and records.loss.numel():
        written.append(plot_settling_traces(records, out_dir / "settling_traces.png"))
    if curve:
        written.append(plot_quality_curve(curve, out_dir / "quality_curve.png"))
    return written


def _read_jsonl(path: Path) -> list[dict]:
    """The objects of a metrics.jsonl; blank or unparseable lines (a run still writing) are skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def save_training_curves(metrics_jsonl_path: Path, out_dir: Path) -> list[Path]:
    """``loss.png`` (every ``*loss*`` key vs step) and ``accuracy.png`` (every ``*accuracy*`` key).

    Each line may carry any subset of keys (train and eval steps log different ones); a
    figure whose keys never appear is not written.
    """
    rows = _read_jsonl(metrics_jsonl_path)
    keys = sorted({key for row in rows for key, value in row.items() if isinstance(value, (int, float))})
    written = []
    for name, word in (("loss", "loss"), ("accuracy", "accuracy")):
        chosen = [key for key in keys if word in key]
        if not chosen:
            continue
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.subplots()
        for key in chosen:
            points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
        written.append(_save(fig, Path(out_dir) / f"{name}.png"))
    return written
