"""List the registered architectures and their config keys with defaults."""

from __future__ import annotations

import dataclasses

HELP = "list the model architectures"


def add_arguments(parser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="also list every config key")


def run(args) -> int:
    import parallax.models  # noqa: F401
    from parallax.registry import MODELS

    for entry in MODELS.entries():
        print(f"{entry.name:<12} {entry.summary}")
        if args.verbose:
            for f in dataclasses.fields(entry.config_class):
                print(f"    model.{f.name} = {getattr(entry.config_class(), f.name)!r}")
    return 0
