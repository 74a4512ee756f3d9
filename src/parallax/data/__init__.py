"""Data sources: synthetic tasks and text. Importing this package registers each by name.

Adding a task is adding a module here that calls ``DATA.register``.
"""

import sys

from parallax.data.batch import Batch, DataSource
from parallax.discovery import import_submodules
from parallax.registry import DATA

import_submodules(sys.modules[__name__])


def build_data(cfg) -> DataSource:
    """Build the registered data source whose config class is ``type(cfg)``."""
    from parallax.config import section_name

    return DATA.get(section_name(DATA, cfg)).builder(cfg)


__all__ = ["Batch", "DataSource", "build_data", "DATA"]
