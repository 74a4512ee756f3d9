"""Parallax: language models whose depth is a test-time knob."""

__version__ = "0.1.0"
