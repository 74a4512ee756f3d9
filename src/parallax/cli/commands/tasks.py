"""List the registered data sources (synthetic tasks and text) and their config keys."""

from __future__ import annotations

import dataclasses

HELP = "list the tasks and data sources"


def add_arguments(parser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="also list every config key")


def run(args) -> int:
    import parallax.data  # noqa: F401
    from parallax.registry import DATA

    for entry in DATA.entries():
        print(f"{entry.name:<12} {entry.summary}")
        if args.verbose:
            for f in dataclasses.fields(entry.config_class):
                print(f"    data.{f.name} = {getattr(entry.config_class(), f.name)!r}")
    return 0
