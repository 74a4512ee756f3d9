"""Run configuration: dataclasses, TOML presets and ``key=value`` overrides.

A run is described by three sections:

* ``[model]``: ``name`` picks an architecture from the model registry; the other keys are
  that architecture's config dataclass (for example ``TransformerConfig``).
* ``[data]``: ``name`` picks a task or text source from the data registry, likewise.
* ``[train]``: the one ``TrainConfig`` shared by every model.

Values are resolved in order: dataclass defaults, then a TOML file, then command-line
overrides such as ``model.d_model=256``. Every key and value is checked against the
dataclass field it targets; a wrong one is a one-line ``ConfigError`` naming the valid keys.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from parallax.errors import ConfigError
from parallax.registry import DATA, MODELS, Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass
class ModelConfig:
    """Fields every architecture shares. ``0`` means: take it from the data source."""

    vocab_size: int = 0
    max_seq_len: int = 0


@dataclass
class DataConfig:
    """Fields every data source shares."""


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """The trainer's knobs; identical for every architecture."""

    steps: int = 600
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 4
    save_every: int = 200
    log_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode; reduce-overhead adds CUDA graphs
    parallel: str = "none"  # none | ddp | fsdp; under torchrun with several processes none means ddp
    progress: bool = True  # the progress bar; without it the evaluation lines still print

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches", "save_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"train.{name} must be at least 1, got {getattr(self, name)}"
                    + (" (it counts steps: set it above train.steps to act only at the end)" if "every" in name else "")
                )
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1] (of train.lr), got {self.min_lr_ratio}")
        if self.seed >= 2**63:
            raise ValueError(f"seed must be below 2**63, got {self.seed}")
        if self.parallel not in ("none", "ddp", "fsdp"):
            raise ValueError(f"parallel must be none, ddp or fsdp, got {self.parallel!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def model_name(self) -> str:
        return section_name(MODELS, self.model)

    @property
    def data_name(self) -> str:
        return section_name(DATA, self.data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {"name": self.model_name, **dataclasses.asdict(self.model)},
            "data": {"name": self.data_name, **dataclasses.asdict(self.data)},
            "train": dataclasses.asdict(self.train),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: list[str] = ()) -> "RunConfig":
        return build_run_config(raw, list(overrides))


DEFAULT_MODEL = "cws"
DEFAULT_TASK = "bind_recall"

# `parallax train` with no --config/--model/--task: the CWS on a BIND/RECALL small enough to
# train in a few minutes on 2 CPU cores (the class defaults are the GPU-scale settings).
DEFAULT_JOB: dict[str, dict[str, Any]] = {
    "model": {
        "name": DEFAULT_MODEL, "d_model": 64, "mlp_hidden": 128, "siren_hidden": 64,
        "probe_head_dim": 16, "k_max": 4,
    },
    "data": {
        "name": DEFAULT_TASK, "n_keys": 8, "n_values": 8, "n_bindings": 4, "n_rebinds": 1,
        "n_queries": 3, "n_fillers": 2, "far_distance": 16,
    },
    "train": {"steps": 1000, "eval_every": 250, "save_every": 250},
}
SECTIONS = ("model", "data", "train")


def _ensure_registered() -> None:
    # Importing the packages runs their @register decorators.
    import parallax.data  # noqa: F401
    import parallax.models  # noqa: F401


def section_name(registry: Registry, cfg: Any) -> str:
    for entry in registry.entries():
        if type(cfg) is entry.config_class:
            return entry.name
    raise ConfigError(f"{type(cfg).__name__} is not a registered {registry.kind} config")


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} {'is a directory' if path.is_dir() else 'does not exist'}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """``["model.d_model=256"]`` -> ``{"model": {"d_model": "256"}}`` (values stay strings)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(
                f"override {item!r} is not of the form section.key=value "
                f"(sections: {', '.join(SECTIONS)})"
            )
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}; valid sections: {', '.join(SECTIONS)}")
        out.setdefault(section, {})[name] = value.strip()
    return out


def build_run_config(raw: dict[str, Any], overrides: list[str]) -> RunConfig:
    """Resolve defaults <- ``raw`` (a parsed TOML/JSON dict) <- ``overrides`` strings."""
    _ensure_registered()
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(
            f"unknown config section {sorted(unknown)[0]!r}; valid sections: {', '.join(SECTIONS)}"
        )
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config section {section!r} must be a table of keys, got {table!r}")
    cli = parse_overrides(overrides)
    sections: dict[str, Any] = {}
    for section, registry, default in (("model", MODELS, DEFAULT_MODEL), ("data", DATA, DEFAULT_TASK)):
        table = dict(raw.get(section, {}))
        given = dict(cli.get(section, {}))
        name = given.pop("name", None) or table.pop("name", None) or default
        table.pop("name", None)
        cls = registry.get(str(name)).config_class
        sections[section] = _fill(cls(), table, given, f"{section} ({name})")
    sections["train"] = _fill(TrainConfig(), dict(raw.get("train", {})), cli.get("train", {}), "train")
    return RunConfig(**sections)


def _fill(obj: Any, table: dict[str, Any], strings: dict[str, str], where: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    valid = [f.name for f in fields(obj)]
    for source, values in (("file", table), ("override", strings)):
        for key, value in values.items():
            if key not in valid:
                raise ConfigError(f"unknown key {key!r} in {where}; valid keys: {', '.join(valid)}")
            parse = _parse_string if source == "override" else _check_value
            setattr(obj, key, parse(value, hints[key], f"{where.split(' ')[0]}.{key}"))
    _check_numbers(obj, where.split(" ")[0])
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"invalid {where} config: {exc}") from None
    return obj


# sizes an architecture cannot have none of (each model names its own; 0 elsewhere means "from
# the data" or "off")
MODEL_SIZES = (
    "d_model", "n_heads", "n_layers", "dim", "heads", "n_embd", "n_head", "n_layer", "core_layers", "decoder_heads",
)


def _check_numbers(obj: Any, section: str) -> None:
    """No config number is negative or not finite, no model size is 0 and dropout is below 1."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{section}.{f.name} must be a finite number, got {value}")
        if value < 0:
            raise ConfigError(f"{section}.{f.name} must not be negative, got {value}")
        if section == "model" and f.name in MODEL_SIZES and value < 1:
            raise ConfigError(f"model.{f.name} must be at least 1, got {value}")
        if f.name == "dropout" and value >= 1:
            raise ConfigError(f"{section}.dropout must be below 1, got {value}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Validate a value that came from TOML/JSON (already typed) against ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [_check_value(v, item, key) if item is not Any else v for v in value]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")


def _parse_string(text: str, tp: Any, key: str) -> Any:
    """Parse a command-line string into the field type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null", "") and len(args) < len(typing.get_args(tp)):
            return None
        for arg in args:
            try:
                return _parse_string(text, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {text!r}")
    if origin in (tuple, list):
        (item,) = typing.get_args(tp)[:1] or (str,)
        parts = [p.strip() for p in text.strip("[]()").split(",") if p.strip()]
        items = [_parse_string(p, item, key) for p in parts]
        return tuple(items) if origin is tuple else items
    try:
        if tp is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
    except ValueError:
        pass
    else:
        raise ConfigError(f"{key} has an unsupported type {_type_name(tp)}")
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {text!r}")
