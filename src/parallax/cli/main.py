"""The ``parallax`` command: a thin layer of argument parsing over plain functions.

Each subcommand lives in ``parallax/cli/commands/<name>.py`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. User errors (``ParallaxError``) print one
line on stderr and exit with the error's code; no traceback. So do paths that cannot be
read or written (``OSError``, exit 2), an interrupt (130) and a closed pipe on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys

from parallax import __version__
from parallax.cli import commands
from parallax.discovery import import_submodules
from parallax.errors import ParallaxError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parallax",
        description="Train, evaluate and inspect language models whose depth is a test-time knob.",
    )
    parser.add_argument("--version", action="version", version=f"parallax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in import_submodules(commands):
        name = module.__name__.rsplit(".", 1)[1].replace("_", "-")
        doc = (module.__doc__ or "").strip()
        cmd = sub.add_parser(
            name, help=module.HELP, description=doc or module.HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(handler=module.run)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``, letting ``key=value`` overrides and options come in any order.

    ``parallax eval RUN --batches 4 model.k_max=8`` needs intermixed parsing of the
    subcommand's arguments; a subcommand with subcommands of its own (``bench``) cannot use it.
    """
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if argv and argv[0] in commands:
        try:
            args = commands[argv[0]].parse_intermixed_args(argv[1:])
        except TypeError:
            return parser.parse_args(argv)
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    command = "parallax"
    try:
        parser = build_parser()
        args = parse(parser, sys.argv[1:] if argv is None else list(argv))
        if not getattr(args, "handler", None):
            parser.print_help()
            return 0
        command = f"parallax {args.command}"
        return int(args.handler(args) or 0)
    except ParallaxError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``parallax models -v | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except OSError as exc:  # a path the user gave that cannot be read or written
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
