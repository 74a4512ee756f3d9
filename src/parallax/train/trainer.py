"""One trainer for every model.

AdamW with linear warm-up and cosine decay, gradient clipping and accumulation, bf16 autocast
on CUDA (fp32 on CPU), optional ``torch.compile``, periodic evaluation, a progress bar,
TensorBoard + ``metrics.jsonl``, and atomic checkpoints that resume exactly: batches are a
pure function of (seed, step), the schedule a pure function of the step, and the optimizer
and RNG states are restored, so a resumed run computes the same losses as an uninterrupted
one. Several processes (DDP or FSDP2 under torchrun) go through ``train.distributed``: each
rank trains on its slice of the global batch and rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from parallax import __version__
from parallax.checkpoint import (
    CONFIG_FILE,
    ENVIRONMENT_FILE,
    check_same_data,
    check_same_vocabulary,
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    save_checkpoint,
    write_text_atomic,
)
from parallax.config import RunConfig
from parallax.data import DataSource, build_data
from parallax.data.batch import batch_generator
from parallax.errors import CheckpointError, ConfigError, TrainingDiverged
from parallax.eval.records import collect_records, summarize
from parallax.models import build_model, count_parameters
from parallax.train import distributed
from parallax.train.metrics_log import MetricsLogger
from parallax.train.runtime import Runtime, single_process_runtime
from parallax.train.schedule import lr_at


def bind_data_shapes(cfg: RunConfig, source: DataSource) -> None:
    """Fill the model's vocabulary and context from the data, or check they are compatible."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = source.vocab_size
    elif cfg.model.vocab_size < source.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
            f"({source.vocab_size}); remove the override or raise it"
        )
    if cfg.model.max_seq_len == 0:
        cfg.model.max_seq_len = source.seq_len
    elif cfg.model.max_seq_len < source.seq_len:
        raise ConfigError(
            f"model.max_seq_len={cfg.model.max_seq_len} is shorter than the data's sequences "
            f"({source.seq_len}); remove the override or raise it"
        )
    block_size = getattr(cfg.model, "block_size", None)  # swap's context window; never taken from the data
    if block_size is not None and block_size < source.seq_len:
        raise ConfigError(
            f"model.block_size={block_size} is shorter than the data's sequences ({source.seq_len}); raise it"
        )


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norm gains, biases) do not."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        fused=device.type == "cuda",
    )


def describe_environment(cfg: RunConfig, source: DataSource, n_params: int, runtime: Runtime) -> dict:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {
        "parallax": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else platform.processor() or "cpu",
        "world_size": runtime.world_size,
        "git_revision": rev,
        "command": sys.argv,
        "seed": cfg.train.seed,
        "data": source.fingerprint(),
        "parameters": n_params,
    }


class Trainer:
    """Holds the state of one run; ``fit()`` trains to ``cfg.train.steps``."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, runtime: Runtime | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.runtime = runtime or single_process_runtime(cfg.train.device, cfg.train.precision)
        self.source = build_data(cfg.data)
        if resume:
            check_same_vocabulary(cfg, self.source)
        bind_data_shapes(cfg, self.source)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model).to(self.runtime.device)
        self.step = 0
        self._cpu_copy: torch.nn.Module | None = None
        state = self._prepare_run_dir(resume)
        self.train_model = distributed.wrap_model(self.model, self.runtime)
        self.optimizer = build_optimizer(self.model, cfg, self.runtime.device)
        if state is not None:
            distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.runtime)
        self.forward_model = (
            torch.compile(self.train_model, mode=cfg.train.compile_mode) if cfg.train.compile else self.train_model
        )

    # -- run directory -------------------------------------------------------------------
    def _prepare_run_dir(self, resume: bool) -> dict[str, Any] | None:
        """Start the run directory, or restore the weights and return the saved trainer state."""
        ckpt = latest_checkpoint(self.run_dir) if self.run_dir.is_dir() else None
        if resume:
            if ckpt is None:
                raise CheckpointError(f"cannot resume: {str(self.run_dir)!r} holds no checkpoint")
            check_same_data(self.run_dir, self.source)
            state = self._restore(ckpt)
            if self.runtime.is_main:  # the train.* overrides hold for the next --resume too
                write_text_atomic(self.run_dir / CONFIG_FILE, self.cfg.to_json() + "\n")
            return state
        if ckpt is not None:
            raise CheckpointError(
                f"{str(self.run_dir)!r} already holds a run; resume it with --resume or choose another --out"
            )
        if (self.run_dir / "metrics.jsonl").exists():  # a new run's logs would follow the old ones
            raise CheckpointError(
                f"{str(self.run_dir)!r} holds the logs of an earlier run that saved no checkpoint; "
                "choose another --out or remove it"
            )
        if self.runtime.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / CONFIG_FILE, self.cfg.to_json() + "\n")
            env = describe_environment(self.cfg, self.source, count_parameters(self.model), self.runtime)
            write_text_atomic(self.run_dir / ENVIRONMENT_FILE, json.dumps(env, indent=2) + "\n")
        return None

    def _restore(self, ckpt: Path) -> dict[str, Any]:
        """Weights, step and RNG now (before any wrapping); the optimizer state is returned."""
        load_weights(ckpt, self.model, self.cfg.model_name)
        state = load_trainer_state(ckpt)
        self.step = int(state["step"])
        torch.set_rng_state(state["rng_cpu"])
        if self.runtime.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], self.runtime.device)
        return state

    def save(self) -> Path | None:
        """Write a checkpoint from rank 0 (every rank must call it: FSDP2 gathers the weights)."""
        model, optimizer_state = distributed.checkpoint_state(self.model, self.optimizer, self.runtime, self._cpu_model)
        if model is None:
            return None
        state = {
            "optimizer": optimizer_state,
            "step": self.step,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.runtime.device) if self.runtime.device.type == "cuda" else None,
        }
        return save_checkpoint(
            self.run_dir, self.step, model, self.cfg.model_name, state, self.cfg.train.keep_checkpoints
        )

    def _cpu_model(self) -> torch.nn.Module:
        """An unsharded CPU copy of the model that FSDP2 checkpoints are gathered into (built once).

        Built without touching the RNG, which every rank must keep in step.
        """
        if self._cpu_copy is None:
            with torch.random.fork_rng(devices=[]):
                self._cpu_copy = build_model(self.cfg.model)
        return self._cpu_copy

    # -- one optimizer step ----------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, int]:
        """Run ``grad_accum`` micro-batches and one optimizer step; returns (loss, tokens).

        The loss stays a device tensor: reading it waits for the GPU, which would stop the host
        from queueing the next step while this one runs. ``fit`` reads it only when it logs.
        """
        t = self.cfg.train
        lr = lr_at(self.step, lr=t.lr, warmup_steps=t.warmup_steps, total_steps=t.steps, min_lr_ratio=t.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total = torch.zeros((), device=self.runtime.device)
        tokens = 0
        for micro in range(t.grad_accum):
            gen = batch_generator(t.seed, "train", self.step * t.grad_accum + micro)
            global_batch = self.source.batch("train", self.runtime.world_size * t.batch_size, gen)
            batch = distributed.rank_rows(global_batch, self.runtime).to(self.runtime.device)
            with distributed.gradient_sync(self.train_model, self.runtime, enabled=micro == t.grad_accum - 1):
                with self.runtime.autocast():
                    out = self.forward_model(batch.input_ids, batch.targets, batch.loss_mask)
                (out.loss / t.grad_accum).backward()
            total += out.loss.detach()
            tokens += batch.input_ids.numel()
        loss = distributed.mean_over_ranks(total / t.grad_accum, self.runtime)
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, tokens

    def evaluate(self) -> dict[str, Any]:
        """Validation metrics over ``eval_batches`` batches, the same on every rank.

        Each rank scores its share of the batches and the records are gathered, so the metrics
        are those of one process and evaluation gets faster with more ranks (every rank must
        call it). Evaluation leaves the RNG as it was, so ranks, which evaluate different
        batches, stay in step.
        """
        t, rt = self.cfg.train, self.runtime
        devices = [rt.device] if rt.device.type == "cuda" else []
        share = None  # none for a rank beyond the last batch
        with torch.random.fork_rng(devices=devices), distributed.unsharded(self.model, rt):
            if rt.rank < t.eval_batches:
                share = collect_records(
                    self.model, self.source, batches=t.eval_batches, batch_size=t.batch_size,
                    device=rt.device, seed=t.seed, autocast_dtype=rt.autocast_dtype,
                    rank=rt.rank, world_size=rt.world_size,
                )
        records = distributed.gather_records(share, t.eval_batches, rt)
        metrics = summarize(records)
        k = records.token_diagnostics.get("k_used")
        if k is not None:
            metrics["mean_k"] = k.mean().item()
            for idx, name in enumerate(records.label_names):
                sel = records.label == idx
                if sel.any() and "per_label" in metrics:
                    metrics["per_label"][name]["mean_k"] = k[sel].mean().item()
        return metrics

    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        logger = MetricsLogger(self.run_dir, enabled=self.runtime.is_main, start_step=self.step)
        bar = None
        if t.progress and self.runtime.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=t.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5,
            )
        start_step, started = self.step, time.perf_counter()
        window_tokens, window_start = 0, time.perf_counter()
        metrics: dict[str, Any] = {}
        try:
            # the first step whose loss was not finite (0: none), kept on the device like the loss
            diverged_at = torch.zeros((), dtype=torch.long, device=self.runtime.device)
            while self.step < t.steps:
                loss, tokens = self.train_step()
                diverged_at = torch.where((diverged_at == 0) & ~loss.isfinite(), self.step, diverged_at)
                window_tokens += tokens * self.runtime.world_size
                last = self.step == t.steps
                log, evaluate, save = (last or self.step % every == 0 for every in (t.log_every, t.eval_every, t.save_every))
                if log or evaluate or save:
                    stop_if_diverged(diverged_at)
                if log:
                    loss = loss.item()
                    elapsed = time.perf_counter() - window_start
                    tok_s = window_tokens / max(elapsed, 1e-9)
                    logger.log(self.step, {"train_loss": loss, "train_lr": self.optimizer.param_groups[0]["lr"], "train_tokens_per_s": tok_s})
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
                    window_tokens, window_start = 0, time.perf_counter()
                if bar is not None:
                    bar.update(1)
                if evaluate:
                    metrics = self.evaluate()
                    logger.log(self.step, flatten_metrics(metrics, prefix="val"))
                    if bar is not None:  # to stderr with the bar: stdout is the summary's (``--json``)
                        bar.write(format_eval_line(self.step, metrics), file=sys.stderr)
                    elif self.runtime.is_main:
                        print(format_eval_line(self.step, metrics), file=sys.stderr)
                if save:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        trained = self.step - start_step
        seconds = time.perf_counter() - started
        return {
            "run_dir": str(self.run_dir),
            "step": self.step,
            "seconds": seconds,
            "tokens_per_s": trained * t.grad_accum * t.batch_size * self.source.seq_len * self.runtime.world_size / max(seconds, 1e-9),
            "parameters": count_parameters(self.model),
            "peak_memory_bytes": peak_memory_bytes(self.runtime.device),
            "eval": metrics,
        }


def stop_if_diverged(diverged_at: torch.Tensor) -> None:
    """Raise before anything is logged or saved from weights a non-finite loss has reached.

    The in-memory model and optimizer state already hold the non-finite values by then: only
    the checkpoints on disk are good, so resume from the last one rather than reuse the model.
    """
    step = diverged_at.item()
    if step:
        raise TrainingDiverged(
            f"the loss stopped being finite at step {step}; training stopped and the last "
            f"checkpoint was kept as it was (try a lower train.lr or train.grad_clip)"
        )


def peak_memory_bytes(device: torch.device) -> int | None:
    """This process's peak CUDA memory (what FSDP2 saves over DDP shows here); None on CPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def flatten_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{"loss": 1, "per_label": {"recall": {"accuracy": .5}}}`` -> ``{"val_loss": 1, "val_recall_accuracy": .5}``."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, prefix if key == "per_label" else f"{prefix}_{key}"))
        elif isinstance(value, (int, float)):
            flat[f"{prefix}_{key}"] = float(value)
    return flat


def format_eval_line(step: int, metrics: dict[str, Any]) -> str:
    parts = [f"step {step:>6}", f"val loss {metrics['loss']:.4f}", f"acc {metrics['token_accuracy']:.3f}"]
    if "mean_k" in metrics:
        parts.append(f"mean K {metrics['mean_k']:.2f}")
    for name, stats in metrics.get("per_label", {}).items():
        extra = f" K {stats['mean_k']:.1f}" if "mean_k" in stats else ""
        parts.append(f"{name} {stats['accuracy']:.3f}{extra}")
    return " | ".join(parts)


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir`` (or continue it with ``resume=True``); returns a summary.

    Under torchrun every process calls this; they train one model together, in ``out_dir`` as
    rank 0 named it.
    """
    t = cfg.train
    with distributed.launch(t.device, t.precision, t.parallel) as runtime:
        out_dir = distributed.from_rank0(str(out_dir), runtime)
        return Trainer(cfg, out_dir, resume=resume, runtime=runtime).fit()


def resume_config(run_dir: str | Path, overrides: list[str]) -> RunConfig:
    """The saved config of ``run_dir`` with ``overrides``; only ``train.*`` may change."""
    from parallax.checkpoint import read_run_config

    saved = read_run_config(run_dir)
    cfg = read_run_config(run_dir, overrides)
    for section in ("model", "data"):
        if getattr(cfg, section) != getattr(saved, section):
            raise ConfigError(f"--resume cannot change the {section} section; start a new run instead")
    return cfg

