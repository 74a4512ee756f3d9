"""Run directories and atomic, verifiable checkpoints.

A run directory describes itself::

    RUN_DIR/
      config.json               the resolved RunConfig
      environment.json          versions, git revision, command line, data fingerprint
      metrics.jsonl             one JSON object per logged step
      events.out.tfevents.*     TensorBoard
      checkpoints/
        latest                  name of the newest complete checkpoint (written last)
        step_00000600/
          model.safetensors     weights (tied tensors stored once)
          trainer_state.pt      optimizer, step, RNG; plain tensors and numbers only
          meta.json             run format version, step, model name, sha256 of the two files above

A checkpoint is assembled in a temporary folder, fsynced, renamed into place, and only then
named in ``latest`` (itself replaced atomically). Killing the process at any moment leaves
``latest`` pointing at a complete checkpoint. Loading verifies the hashes and never unpickles
code: weights go through safetensors and the trainer state through ``weights_only`` loading.
A run written in another run format is refused up front with its version, not half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from parallax.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
ENVIRONMENT_FILE = "environment.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
META = "meta.json"
# Bump whenever a change to this layout, the config or the weights stops older runs from loading.
# 2: the CWS slot norm moved from the workspace to the pool (its name and the parameter order)
RUN_FORMAT_VERSION = 2


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module, model_name: str, trainer_state: dict, keep: int = 2
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` of them."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / WEIGHTS), metadata={"model": model_name, "step": str(step)})
    torch.save(trainer_state, tmp / STATE)
    meta = {
        "format_version": RUN_FORMAT_VERSION,
        "step": step,
        "model": model_name,
        "sha256": {name: _sha256(tmp / name) for name in (WEIGHTS, STATE)},
    }
    (tmp / META).write_text(json.dumps(meta, indent=2))
    for name in (WEIGHTS, STATE, META):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (e.g. final == periodic): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for stale in root.glob(".step_*.tmp-*"):  # left by a process killed while it saved
        shutil.rmtree(stale, ignore_errors=True)
    write_text_atomic(root / LATEST, final.name + "\n")
    for stale in root.glob(f".{LATEST}.tmp-*"):
        stale.unlink(missing_ok=True)
    complete = sorted(p for p in root.glob("step_*") if p.is_dir())
    # later steps than this one were never named latest (a run killed between the two writes,
    # then resumed from an earlier step): another history, and never to be kept over this one
    newer = [p for p in complete if p.name > final.name]
    kept = [p for p in complete if p.name <= final.name]
    for old in newer + kept[: max(0, len(kept) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist; the run directory is damaged")
    return path


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {ckpt} has no readable {META}; it is incomplete or corrupt")
    return meta


def check_run_format(ckpt: Path) -> dict[str, Any]:
    """Refuse a checkpoint of another run format before its contents fail in obscure ways."""
    meta = read_meta(ckpt)
    found = meta.get("format_version")
    if found != RUN_FORMAT_VERSION:
        described = "none (written before run formats were versioned)" if found is None else repr(found)
        raise CheckpointError(
            f"run directory {str(ckpt.parent.parent)!r} records run format version {described}, but this "
            f"version of parallax reads only version {RUN_FORMAT_VERSION}; re-train the run, or load it "
            f"with the version of parallax that wrote it"
        )
    return meta


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check that every file is present and matches the hash recorded when it was written."""
    meta = check_run_format(ckpt)
    for name, expected in meta.get("sha256", {}).items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is missing {name}")
        if _sha256(path) != expected:
            raise CheckpointError(f"checkpoint file {path} is corrupt (its sha256 does not match {META})")
    return meta


def load_weights(ckpt: Path, model: torch.nn.Module, model_name: str) -> dict[str, Any]:
    meta = verify_checkpoint(ckpt)
    if meta.get("model") != model_name:
        raise CheckpointError(
            f"checkpoint {ckpt} holds a {meta.get('model')!r} model, not the {model_name!r} model the config describes"
        )
    try:
        missing, unexpected = load_model(model, str(ckpt / WEIGHTS), strict=False)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read weights {ckpt / WEIGHTS}: {exc}") from None
    except RuntimeError as exc:  # shape mismatch
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"weights in {ckpt} do not fit this model's shapes ({first[-1].strip() if first else exc})"
        ) from None
    if missing or unexpected:
        names = sorted(missing)[:3] or sorted(unexpected)[:3]
        raise CheckpointError(
            f"weights in {ckpt} do not match the model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected tensors, e.g. {', '.join(names)})"
        )
    return meta


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read trainer state {ckpt / STATE}: {type(exc).__name__}") from None


def read_run_config(run_dir: Path, overrides: list[str] = ()):
    from parallax.config import RunConfig

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a run directory" if run_dir.exists() else "does not exist"
        raise CheckpointError(f"run directory {str(run_dir)!r} {what}")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(run_dir)!r} is not a run directory (it has no {CONFIG_FILE})")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:  # an older run's config may not parse: report its format version instead
        check_run_format(ckpt)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is not valid JSON") from None
    try:
        saved = RunConfig.from_dict(raw)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    # a bad override is the caller's ConfigError (exit 2), not the file's
    return RunConfig.from_dict(raw, list(overrides)) if overrides else saved


@dataclass
class LoadedRun:
    run_dir: Path
    config: Any  # RunConfig
    model: torch.nn.Module
    source: Any  # DataSource
    step: int
    checkpoint: Path


def check_same_data(run_dir: Path, source) -> None:
    """A resumed run goes on with the data it started on: text prepared again with the same
    vocabulary size but other tokens would otherwise pass unnoticed. The fingerprint is the one
    ``environment.json`` recorded; a run without one is not checked (the file is descriptive)."""
    try:
        recorded = json.loads((Path(run_dir) / ENVIRONMENT_FILE).read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return
    if recorded is not None and recorded != source.fingerprint():
        raise CheckpointError(
            f"cannot resume: the data changed since the run started ({ENVIRONMENT_FILE} records "
            f"{recorded}, the data is now {source.fingerprint()}); start a new run or restore the data"
        )


def check_same_vocabulary(cfg, source) -> None:
    """A run's data must still fit its model's vocabulary: text prepared again with a larger
    vocabulary after training would index past the embedding."""
    if 0 < cfg.model.vocab_size < source.vocab_size:  # 0: not bound to the data yet
        raise CheckpointError(
            f"the data now has a vocabulary of {source.vocab_size} tokens, the run's model "
            f"{cfg.model.vocab_size}: the data changed since the run was trained ({source.fingerprint()})"
        )


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", overrides: list[str] = ()) -> LoadedRun:
    """Rebuild a run's model and data source from its directory and newest checkpoint.

    ``overrides`` may change test-time knobs, e.g. ``["model.k_max=48"]``.
    """
    from parallax.data import build_data
    from parallax.models import build_model

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir, overrides)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"run directory {str(run_dir)!r} has no checkpoint yet")
    source = build_data(cfg.data)
    check_same_vocabulary(cfg, source)
    model = build_model(cfg.model)
    meta = load_weights(ckpt, model, cfg.model_name)
    model.to(device).eval()
    return LoadedRun(run_dir, cfg, model, source, int(meta["step"]), ckpt)
