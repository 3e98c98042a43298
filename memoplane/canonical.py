"""Canonical JSON: the one byte encoding that cache keys are hashed over.

Rules (DESIGN §3): sorted keys, no insignificant whitespace, UTF-8 (not \\u escapes),
integers as integers, floats in a fixed format (`repr`-shortest round-trip, with
`-0.0` kept distinct from `0.0`), NaN and infinities refused (JSON cannot carry them
and they would make two different computations share a key). Test vectors live in
tests/unit/vectors/canonical.json.
"""

from __future__ import annotations

import json
import math
from itertools import repeat
from typing import Any

from .errors import InputError

# The C string encoder of the json module escapes exactly what we specify: '"',
# '\\', \b \f \n \r \t by their short forms, other controls as \u00XX, and
# nothing else (non-ASCII stays UTF-8). It is ~20x faster than a Python loop.
_string = json.encoder.c_encode_basestring or json.encoder.py_encode_basestring  # type: ignore[attr-defined]


# Deepest nesting of lists and objects accepted anywhere a JSON value crosses a
# boundary (inputs, return values, manifests): deeper values are refused with a
# clear message before any recursive code (encoders, decoders) sees them.
MAX_JSON_DEPTH = 100


_CONTAINERS = (list, tuple, dict)


def json_depth_exceeds(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when `value` nests lists/dicts more than `limit` levels deep.
    Iterative (one level at a time), so a hostile value cannot exhaust the stack
    while it is checked; flat containers of scalars are skipped at C speed."""
    level = [value] if isinstance(value, _CONTAINERS) else []
    depth = 0
    while level:
        if depth >= limit:
            return True
        level = [child for item in level for child in _nested(item)]
        depth += 1
    return False


def _nested(container: Any) -> list[Any]:
    """The lists/tuples/dicts directly inside `container`."""
    children = list(container.values()) if isinstance(container, dict) else container
    kinds = set(map(type, children))
    if not any(issubclass(kind, _CONTAINERS) for kind in kinds):
        return []
    return [child for child in children if isinstance(child, _CONTAINERS)]


def too_deep(what: str, limit: int = MAX_JSON_DEPTH) -> InputError:
    """The one message for a value nested deeper than `limit`."""
    return InputError(f"{what} nests lists/objects more than {limit} levels deep",
                      f"flatten it to at most {limit} levels")


def check_json_depth(value: Any, what: str, limit: int = MAX_JSON_DEPTH) -> None:
    """InputError naming `what` when `value` nests deeper than `limit`."""
    if json_depth_exceeds(value, limit):
        raise too_deep(what, limit)


def _float(x: float, path: str) -> str:
    if not math.isfinite(x):
        raise InputError(f"{path}: {x!r} is not a JSON number", "use a finite number or null")
    # Shortest round-trip repr: 1.0 stays "1.0" (not "1"), 1e16 is "1e+16", -0.0 is kept.
    return float.__repr__(float(x))


def _encode(value: Any, path: str, out: list[str], room: int) -> None:
    """`room`: how many more levels of lists/objects may open here."""
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
    elif isinstance(value, _CONTAINERS) and room <= 0:
        raise too_deep("the value")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, f"{path}[{i}]", out, room - 1)
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
            _encode(value[k], f"{path}.{k}", out, room - 1)
        out.append("}")
    else:
        raise InputError(
            f"{path}: a {type(value).__name__} is not JSON",
            "pass JSON values (null, bool, number, string, list, object)",
        )


# Endless `room` arguments for map(), made once: a container's children get one level less.
_ROOM = tuple(repeat(room) for room in range(MAX_JSON_DEPTH))


def _is_plain(value: Any, room: int = MAX_JSON_DEPTH) -> bool:
    """Exactly-typed JSON with string keys and finite floats: what the fast path takes.
    Raises InputError for lists/objects deeper than MAX_JSON_DEPTH (`room` levels left),
    so neither encoder ever recurses past the cap."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is not list and kind is not tuple and kind is not dict:
        return False
    if room <= 0:
        raise too_deep("the value")
    if kind is dict:
        return all(type(k) is str for k in value) and all(map(_is_plain, value.values(), _ROOM[room - 1]))
    return all(map(_is_plain, value, _ROOM[room - 1]))


def canonical_json(value: Any) -> bytes:
    """Encode `value` canonically; equal JSON values give equal bytes.

    Plain values go through the json module's C encoder, whose output with these
    settings is exactly our format; anything else takes the Python encoder,
    which accepts subclasses (numpy floats, IntEnum) and names the bad path.
    Values nesting deeper than MAX_JSON_DEPTH raise InputError before either recurses."""
    try:
        if _is_plain(value):
            return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        out: list[str] = []
        _encode(value, "$", out, MAX_JSON_DEPTH)
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"$: text contains {exc.object[exc.start:exc.end]!r}, which is not valid Unicode",
            "remove lone surrogates from strings",
        ) from None
