"""Measurements behind ``parallax bench``: plain functions returning rows of numbers."""
