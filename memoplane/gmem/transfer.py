"""A seed as a job receives it: parameters (JSON), a range, and the overlay as one small file.

The values themselves never travel: the job generates them where it runs. What travels is
the overlay (only the written overrides), as a .npy of shape (2, n) uint64: row 0 the
sorted addresses, row 1 the values' bits (see engine.to_bits). A plain .npy keeps the
reader trivial (numpy only) inside a sandbox.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputError, StoreCorrupted
from .engine import DTYPES, GMem, GMemParams, Layer, from_bits, to_bits
from .overlay import Overlay
from .persist import seed_digest


def params_from_json(doc: Mapping[str, Any]) -> GMemParams:
    """GMemParams.to_json() read back (raises InputError on a bad document)."""
    try:
        layers = tuple(Layer(int(x["seed"]), float(x.get("weight", 1.0))) for x in doc.get("layers") or ())
        return GMemParams(int(doc["seed"]), doc.get("dtype", "float64"), layers)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"seed parameters {dict(doc)!r} are malformed ({exc})", "use GMemParams.to_json()") from None


def overlay_npy(overlay: Overlay) -> bytes | None:
    """The overlay as .npy bytes, or None when nothing was written."""
    keys, values = overlay.to_arrays()
    if keys.shape[0] == 0:
        return None
    buf = io.BytesIO()
    np.save(buf, np.stack([keys, to_bits(values)]), allow_pickle=False)
    return buf.getvalue()


def overlay_from_array(arr: np.ndarray, dtype: str) -> Overlay:
    if arr.ndim != 2 or arr.shape[0] != 2 or arr.dtype != np.uint64:
        raise InputError(f"an overlay file holds a (2, n) uint64 array, not {arr.shape} {arr.dtype}",
                         "write it with memoplane.gmem.transfer.overlay_npy")
    vdtype = np.dtype(DTYPES[dtype])
    return Overlay.from_arrays(arr[0].copy(), from_bits(arr[1].copy(), vdtype), vdtype)


def load_overlay(path_or_bytes: str | bytes, dtype: str) -> Overlay:
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return overlay_from_array(np.load(source, allow_pickle=False), dtype)


def generate(params: Mapping[str, Any], offset: int, count: int, overlay: Overlay | None = None) -> np.ndarray:
    """The values a job reading (params, overlay) at [offset, offset + count) receives."""
    p = params_from_json(params)
    return GMem(p.seed, p.dtype, p.layers, overlay=overlay).fetch_range(offset, count)


def verified_overlay(params: Mapping[str, Any], data: bytes | None, digest: str) -> Overlay | None:
    """The overlay in `data`, checked against the seed digest the job's key was derived from:
    a result is never stored under a key whose seed differs from what was generated."""
    p = params_from_json(params)
    overlay = load_overlay(data, p.dtype) if data is not None else None
    if seed_digest(p, overlay) != digest:
        raise StoreCorrupted(f"seed input: parameters and overlay do not hash to {digest}",
                             "the GMemSeed changed or its overlay blob is wrong: resolve the job again")
    return overlay
