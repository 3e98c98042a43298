"""How a stored return value is shown: JSON as itself, bytes and arrays by reference."""

from __future__ import annotations

from typing import Any

from ..cas import StoredValue


def render_value(stored: StoredValue, loaded: Any) -> Any:
    if stored.kind == "json":
        return loaded
    if stored.kind == "none":
        return None
    blob = stored.blob
    return {"kind": stored.kind, "digest": blob.digest if blob else None, "size": blob.size if blob else 0}
