"""Data sources. Importing this package registers every task by name."""

from parallax.data import tasks  # noqa: F401  (registers)
from parallax.data.batch import Batch, DataSource
from parallax.registry import DATA


def build_data(cfg) -> DataSource:
    """Build the registered data source whose config class is ``type(cfg)``."""
    from parallax.config import section_name

    return DATA.get(section_name(DATA, cfg)).builder(cfg)


__all__ = ["Batch", "DataSource", "build_data", "DATA"]
