"""Generative memory: a deterministic dataset over 2^64 addresses, computed on read.

    g = GMem(1337, "float64", layers=[Layer(7, 0.5)])
    g.fetch_range(0, 1_000_000)        # no store needed (e.g. inside a sandbox)
    g.write_many([5, 9], [0.25, 0.75])  # overrides, seen by every later read

Persistence (`GMemStore`) keeps overrides in a durable log and snapshots in the store;
`seed_digest` names a seed's content (parameters + overlay) for cache keys;
`GMemLinear` is a linear layer whose weights are generated from a seed and a vector.
"""

from .engine import DTYPES, GMem, GMemParams, Journal, Layer
from .linear import GMemLinear
from .log import OverlayLog, Replay
from .overlay import Overlay
from .persist import GMemStore, OpenReport, StoredGMem, overlay_digest, seed_digest

__all__ = [
    "DTYPES",
    "GMem",
    "GMemLinear",
    "GMemParams",
    "GMemStore",
    "Journal",
    "Layer",
    "OpenReport",
    "Overlay",
    "OverlayLog",
    "Replay",
    "StoredGMem",
    "overlay_digest",
    "seed_digest",
]
