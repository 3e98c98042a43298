"""Content fingerprints of Python values, for `@memoize` keys.

Values are hashed by what they contain, never by identity: two equal numpy
arrays built separately give one fingerprint, and a changed element changes it.
Every value is written with a type tag so `[1, 2]`, `(1, 2)` and `b"[1,2]"` differ.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3

from .errors import InputError
from .keys import DIGEST_PREFIX


class _Writer:
    __slots__ = ("hasher",)

    def __init__(self) -> None:
        self.hasher = blake3.blake3()

    def tag(self, tag: bytes, payload: bytes = b"") -> None:
        self.hasher.update(tag + struct.pack("<Q", len(payload)) + payload)


def fingerprint(value: Any, *, where: str = "value") -> str:
    """The content digest of `value`; raises InputError naming `where` for
    values that have no content identity (open files, sockets, lambdas...)."""
    writer = _Writer()
    _write(writer, value, where)
    return DIGEST_PREFIX + writer.hasher.hexdigest()


def _write(w: _Writer, value: Any, where: str) -> None:
    handler = _HANDLERS.get(type(value))
    if handler is not None:
        handler(w, value, where)
        return
    for kind, handler in _FALLBACKS:
        if kind(value):
            handler(w, value, where)
            return
    raise InputError(
        f"{where}: cannot fingerprint a {type(value).__module__}.{type(value).__qualname__} by its content",
        "pass plain data (numbers, str, bytes, lists, dicts, numpy arrays, pandas frames, "
        "dataclasses) or list the argument in ignore=[...]",
    )


def _none(w: _Writer, value: Any, where: str) -> None:
    w.tag(b"N")


def _bool(w: _Writer, value: bool, where: str) -> None:
    w.tag(b"T" if value else b"F")


def _int(w: _Writer, value: int, where: str) -> None:
    w.tag(b"i", str(int(value)).encode())


def _float(w: _Writer, value: float, where: str) -> None:
    if math.isnan(value):
        w.tag(b"f", b"nan")  # all NaNs are one value for memoization
    else:
        w.tag(b"f", struct.pack("<d", value))


def _str(w: _Writer, value: str, where: str) -> None:
    w.tag(b"s", value.encode("utf-8", "surrogatepass"))


def _bytes(w: _Writer, value: bytes | bytearray | memoryview, where: str) -> None:
    w.tag(b"b", bytes(value))


def _sequence(tag: bytes) -> Callable[[_Writer, Any, str], None]:
    def write(w: _Writer, value: Any, where: str) -> None:
        w.tag(tag, struct.pack("<Q", len(value)))
        for i, item in enumerate(value):
            _write(w, item, f"{where}[{i}]")

    return write


def _dict(w: _Writer, value: dict[Any, Any], where: str) -> None:
    # Order-insensitive: entries sorted by the fingerprint of their key.
    entries = sorted((fingerprint(k, where=f"{where} key"), k) for k in value)
    w.tag(b"d", struct.pack("<Q", len(entries)))
    for key_digest, key in entries:
        w.tag(b"k", key_digest.encode())
        _write(w, value[key], f"{where}[{key!r}]")


def _set(w: _Writer, value: set[Any] | frozenset[Any], where: str) -> None:
    digests = sorted(fingerprint(item, where=f"{where} element") for item in value)
    w.tag(b"S", "".join(digests).encode())


def _path(w: _Writer, value: Path, where: str) -> None:
    # A path is a mutable name: fingerprint the file's bytes, not its name.
    if not value.is_file():
        raise InputError(f"{where}: {value} is not a readable file", "pass an existing file, or its bytes")
    hasher = blake3.blake3()
    with value.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    w.tag(b"P", hasher.digest())


def _dataclass(w: _Writer, value: Any, where: str) -> None:
    w.tag(b"D", f"{type(value).__module__}.{type(value).__qualname__}".encode())
    for f in dataclasses.fields(value):
        w.tag(b"n", f.name.encode())
        _write(w, getattr(value, f.name), f"{where}.{f.name}")


def _is_numpy(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "numpy" and hasattr(value, "dtype")


def _numpy(w: _Writer, value: Any, where: str) -> None:
    import numpy as np

    array = np.asarray(value)
    w.tag(b"A", f"{array.dtype.str}|{array.shape}".encode())
    if array.dtype.hasobject:
        for i, item in enumerate(array.ravel(order="C").tolist()):
            _write(w, item, f"{where}[{i}]")
    else:
        # hasher.update reads the buffer in place (.data: a memoryview, no copy) for contiguous arrays.
        w.hasher.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data)


def _is_pandas(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "pandas" and hasattr(value, "to_numpy")


def _pandas(w: _Writer, value: Any, where: str) -> None:
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        w.tag(b"pdF", struct.pack("<Q", value.shape[1]))
        _write(w, [str(c) for c in value.columns], f"{where}.columns")
        _pandas(w, value.index, f"{where}.index")
        for name in value.columns:
            _pandas(w, value[name], f"{where}[{name!r}]")
    elif isinstance(value, pd.Series):
        w.tag(b"pdS", f"{value.name}|{value.dtype}".encode())
        _pandas(w, value.index, f"{where}.index")
        _numpy(w, value.to_numpy(), where)
    elif isinstance(value, pd.Index):
        w.tag(b"pdI", str(value.dtype).encode())
        if isinstance(value, pd.RangeIndex):
            w.tag(b"r", f"{value.start}:{value.stop}:{value.step}".encode())
        else:
            _numpy(w, value.to_numpy(), where)
    else:
        _numpy(w, value.to_numpy(), where)


_HANDLERS: dict[type, Callable[[_Writer, Any, str], None]] = {
    type(None): _none,
    bool: _bool,
    int: _int,
    float: _float,
    str: _str,
    bytes: _bytes,
    bytearray: _bytes,
    memoryview: _bytes,
    list: _sequence(b"L"),
    tuple: _sequence(b"U"),
    dict: _dict,
    set: _set,
    frozenset: _set,
}

_FALLBACKS: list[tuple[Callable[[Any], bool], Callable[[_Writer, Any, str], None]]] = [
    (_is_numpy, _numpy),
    (_is_pandas, _pandas),
    (lambda v: dataclasses.is_dataclass(v) and not isinstance(v, type), _dataclass),
    (lambda v: isinstance(v, Path), _path),
    (lambda v: isinstance(v, bool), _bool),
    (lambda v: isinstance(v, int), _int),
    (lambda v: isinstance(v, float), _float),
    (lambda v: isinstance(v, str), _str),
    (lambda v: isinstance(v, dict), _dict),
]
