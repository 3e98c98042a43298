"""The object backend interface under the content-addressed store.

A backend is a flat namespace of immutable-ish byte objects addressed by
slash-separated names ("chunks/ab/ab12...", "refs/b3:..."). The filesystem
backend serves the embedded mode and the node-local chunk cache; an S3/MinIO
backend (issue 4) implements the same protocol, so the Store never changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    mtime: float  # seconds since the epoch; GC's grace period reads it


@runtime_checkable
class Backend(Protocol):
    """Byte objects by name. Every `put` is atomic: readers see all or nothing."""

    def put(self, name: str, data: bytes | bytearray) -> None: ...

    def put_if_absent(self, name: str, data: bytes | Callable[[], bytes]) -> bool:
        """Write unless present; True if this call wrote it (two racing writers of
        the same content-addressed object may both say True). Used for chunks.

        `data` may be a callable, called only when the object is absent, so a
        deduplicated chunk is never compressed.

        When the object is already present its mtime must be refreshed: GC keeps
        objects younger than its grace period, so a writer that deduplicates
        against an old unreferenced object protects it until its ref is written.
        """
        ...

    def create(self, name: str, data: bytes) -> bool:
        """Write `data` under `name` only if nothing is there, atomically: of racing creators
        exactly one gets True, and nothing is ever overwritten. Used where names are not
        content addresses (the audit log's sequence numbers), so a stat-then-put would fork."""
        ...

    def get(self, name: str) -> bytes:
        """The object's bytes; raises memoplane.errors.NotFound if absent."""
        ...

    def exists(self, name: str) -> bool: ...

    def delete(self, name: str) -> None:
        """Remove; absent is not an error (idempotent)."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def flush(self) -> None:
        """Make every object written so far durable. The store calls it before
        writing a ref, so a ref never outlives the data it names after a crash.
        (A no-op where `put` is durable on return, as with S3.)"""
        ...

    def describe(self) -> str:
        """A human-readable location, e.g. a path or s3://bucket/prefix."""
        ...


class PrefixedBackend:
    """Another backend's objects under one name prefix: a namespace of its own (a team's store
    inside a shared location). Nothing outside the prefix is reachable through it."""

    def __init__(self, inner: Backend, prefix: str) -> None:
        if not prefix.endswith("/") or prefix.startswith("/") or ".." in prefix.split("/"):
            raise ValueError(f"prefix {prefix!r} must be relative, end with '/' and hold no '..'")
        self.inner, self.prefix = inner, prefix

    @property
    def root(self) -> str | None:
        """The directory of the namespace when the inner backend is a directory (Store.local_root)."""
        inner_root = getattr(self.inner, "root", None)
        return None if inner_root is None else os.path.join(inner_root, self.prefix)

    def put(self, name: str, data: bytes | bytearray) -> None:
        self.inner.put(self.prefix + name, data)

    def put_if_absent(self, name: str, data: bytes | Callable[[], bytes]) -> bool:
        return self.inner.put_if_absent(self.prefix + name, data)

    def create(self, name: str, data: bytes) -> bool:
        return self.inner.create(self.prefix + name, data)

    def get(self, name: str) -> bytes:
        return self.inner.get(self.prefix + name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(self.prefix + name)

    def delete(self, name: str) -> None:
        self.inner.delete(self.prefix + name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for info in self.inner.list(self.prefix + prefix):
            yield ObjectInfo(info.name.removeprefix(self.prefix), info.size, info.mtime)

    def flush(self) -> None:
        self.inner.flush()

    def describe(self) -> str:
        return f"{self.inner.describe()} ({self.prefix.rstrip('/')})"
