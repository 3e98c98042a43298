"""What kept history holds alive: every result a run record names, and its code and runtime
blobs. Garbage collection takes these as roots, so an old version stays readable (and `diff`
can show its code) for as long as its record is kept."""

from __future__ import annotations

from ..cas import Store
from .index import open_index


def kept_roots(store: Store) -> tuple[set[str], set[str]]:
    """(result digests, blob digests) named by the store's run records (malformed ones are skipped),
    read from the store's history index: only the records it has not seen yet are read."""
    with open_index(store) as index:
        return index.roots()
