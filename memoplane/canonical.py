"""Canonical JSON: the one byte encoding that cache keys are hashed over.

Rules (DESIGN §3): sorted keys, no insignificant whitespace, UTF-8 (not \\u escapes),
integers as integers, floats in a fixed format (`repr`-shortest round-trip, with
`-0.0` kept distinct from `0.0`), NaN and infinities refused (JSON cannot carry them
and they would make two different computations share a key). Test vectors live in
tests/unit/vectors/canonical.json.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import InputError

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _float(x: float, path: str) -> str:
    if not math.isfinite(x):
        raise InputError(f"{path}: {x!r} is not a JSON number", "use a finite number or null")
    if x.is_integer() and abs(x) < 2**53:
        # 1.0 and 1 are different JSON texts for many tools; keep the float marker
        # but in one fixed form.
        return f"{int(x)}.0" if x != 0 or math.copysign(1, x) > 0 else "-0.0"
    return repr(x)


def _encode(value: Any, path: str, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(int(value)))
    elif isinstance(value, float):
        out.append(_float(float(value), path))
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, f"{path}[{i}]", out)
        out.append("]")
    elif isinstance(value, dict):
        keys = list(value)
        for k in keys:
            if not isinstance(k, str):
                raise InputError(f"{path}: object key {k!r} is not a string", "use string keys")
        out.append("{")
        for i, k in enumerate(sorted(keys)):
            if i:
                out.append(",")
            out.append(_string(k))
            out.append(":")
            _encode(value[k], f"{path}.{k}", out)
        out.append("}")
    else:
        raise InputError(
            f"{path}: a {type(value).__name__} is not JSON",
            "pass JSON values (null, bool, number, string, list, object)",
        )


def canonical_json(value: Any) -> bytes:
    """Encode `value` canonically; equal JSON values give equal bytes."""
    out: list[str] = []
    _encode(value, "$", out)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"$: text contains {exc.object[exc.start:exc.end]!r}, which is not valid Unicode",
            "remove lone surrogates from strings",
        ) from None
