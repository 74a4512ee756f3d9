"""Central Workspace (CWS): a small recurrent state that settles over K iterations per token.

Modules, one concern each: ``config`` (CWSConfig), ``experts`` (SSM, attention probe, MLP
probe, SIREN), ``pool`` (the pool built from config, token- and h-clocked passes),
``workspace`` (one iteration of the seed's pseudo-code), ``halting`` (per-token halting
rules), ``settle`` (the K-iteration loop and training contract), ``decoder`` (motor
decoder), ``model`` (the registered module and its incremental cache).
"""

from parallax.models.cws.config import CWSConfig
from parallax.models.cws.model import CWS, CWSCache

__all__ = ["CWS", "CWSCache", "CWSConfig"]
