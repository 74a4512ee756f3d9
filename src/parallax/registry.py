"""Name -> (config class, builder) registries for models and data sources.

A registry is what lets ``model.name = "cws"`` in a TOML file pick both the dataclass that
validates the rest of the ``[model]`` table and the class that builds the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from parallax.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    config_class: type
    builder: T
    summary: str


class Registry(Generic[T]):
    """A small name registry with a clear error for unknown names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, config_class: type, summary: str = "") -> Callable[[T], T]:
        def decorate(builder: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if any(e.config_class is config_class for e in self._entries.values()):
                raise ValueError(f"{config_class.__name__} already belongs to another {self.kind}")
            doc = summary or (getattr(builder, "__doc__", None) or "").strip().splitlines()[0:1]
            text = doc if isinstance(doc, str) else (doc[0] if doc else "")
            self._entries[name] = Entry(name, config_class, builder, text)
            return builder

        return decorate

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: Any) -> bool:
        return name in self._entries


MODELS: Registry = Registry("model")
DATA: Registry = Registry("task")
