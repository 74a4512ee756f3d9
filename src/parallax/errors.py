"""User-facing errors.

Anything a user can cause (a bad config key, a missing run directory, a corrupt checkpoint)
raises a ``ParallaxError`` whose message is one complete sentence. The CLI prints it on one
line and exits with ``exit_code`` instead of showing a traceback.
"""


class ParallaxError(Exception):
    """An error caused by input the user can fix; the message says how."""

    exit_code = 1


class ConfigError(ParallaxError):
    """A config key that does not exist, or a value of the wrong type."""

    exit_code = 2


class CheckpointError(ParallaxError):
    """A run directory or checkpoint that is missing, corrupt or of another model."""


class TrainingDiverged(ParallaxError):
    """The loss became NaN or infinite; training stopped before saving anything bad."""
