"""Training: one trainer for every model and data source."""

from parallax.train.trainer import Trainer, resume_config, train

__all__ = ["Trainer", "resume_config", "train"]
