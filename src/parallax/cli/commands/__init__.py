"""One module per ``parallax`` subcommand (``prepare_text.py`` -> ``parallax prepare-text``)."""

import argparse


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def only_sections(overrides: list[str], sections, command: str) -> None:
    """Refuse an override of a section ``command`` does not read: it would be ignored silently."""
    from parallax.errors import ConfigError

    wrong = [o for o in overrides if o.partition(".")[0] not in sections]
    if wrong:
        taken = " or ".join(f"{section}.KEY=VALUE" for section in sections)
        raise ConfigError(f"{command} takes {taken} overrides only, got {wrong[0]!r}")
