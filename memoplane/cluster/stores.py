"""The stores of ResultCaches, opened once per process and shared by its threads.

A ResultCache names a bucket and a prefix; the endpoint comes from MEMOPLANE_S3_ENDPOINT,
the keys from a credentials directory (MEMOPLANE_S3_CREDENTIALS_DIR, see read_credentials;
what the chart gives the agents, whose environment a job might read through /proc) or from
MEMOPLANE_S3_ACCESS_KEY and MEMOPLANE_S3_SECRET_KEY (the operator, local tools). With
MEMOPLANE_STORE_ROOT instead, a bucket is a directory under it: the same code runs with no
object store (unit tests, one-machine demos).

Agents put a node-local chunk cache (memoplane.cas.cached.CachingBackend) in front of the
remote: content-addressed objects never change, so a local copy is as good as the remote
one, and every read is verified either way.

A location whose ResultCache has a cold tier (spec.tiers) gets a TieredBackend over it (the local
cache stays in front of the hot remote, so a local hit counts as a read). Who knows the tier tells
the Stores (`set_tier`): the operator from the owning cache, an agent from the job's assignment.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

from ..cas import FilesystemBackend, Store
from ..cas.backend import Backend
from ..settings import CREDENTIALS_ENV as CREDENTIALS_ENV  # the settings live in memoplane.settings
from ..settings import StoreSettings as StoreSettings
from ..settings import read_credentials as read_credentials
from . import protocol as p
from .views import CacheView

ROOT_ENV = "MEMOPLANE_STORE_ROOT"


class Stores:
    """Store per (bucket, prefix); thread-safe."""

    def __init__(self, settings: StoreSettings) -> None:
        if not settings.root and not settings.endpoint:
            raise ValueError("no object store configured: set MEMOPLANE_S3_ENDPOINT (and the keys) "
                             f"or {ROOT_ENV}")
        self.settings = settings
        self._lock = threading.Lock()
        self._stores: dict[tuple[str, str], Store] = {}
        self._tiers: dict[tuple[str, str], p.ColdTier] = {}
        self._retired: list[Store] = []   # replaced when a tier changed; closed with the others
        self._ensured: set[str] = set()
        self._client: Any = None

    def client(self) -> Any:
        """The minio client (S3 mode only)."""
        if self._client is None:
            from ..cas.s3 import make_client
            s = self.settings
            self._client = make_client(s.endpoint or "", s.access_key or "", s.secret_key or "")
        return self._client

    def _remote(self, bucket: str, prefix: str) -> Backend:
        if self.settings.root:
            return FilesystemBackend(Path(self.settings.root) / bucket / prefix.strip("/"))
        from ..cas.s3 import S3Backend
        backend = S3Backend(self.client(), bucket, prefix)
        if bucket not in self._ensured:
            backend.ensure_bucket()
            self._ensured.add(bucket)
        return backend

    def get(self, bucket: str, prefix: str) -> Store:
        key = (bucket, prefix.strip("/"))
        with self._lock:
            store = self._stores.get(key)
            if store is None:
                store = Store(self._backend(key), workers=self.settings.workers)
                self._stores[key] = store
            return store

    def _backend(self, key: tuple[str, str]) -> Backend:
        backend = self._remote(*key)
        if self.settings.local_cache:
            from ..cas.cached import CachingBackend
            local = FilesystemBackend(Path(self.settings.local_cache) / key[0] / key[1])
            backend = CachingBackend(backend, local, max_bytes=self.settings.local_cache_bytes)
        tier = self._tiers.get(key)
        if tier is not None:
            from ..cas.tiers import TieredBackend
            backend = TieredBackend(backend, self._remote(tier.bucket, tier.prefix), after=tier.after)
        return backend

    def of_cache(self, view: CacheView, *, owner: bool) -> Store:
        """A ResultCache's location. When the cache owns it (usable, not a guest there), its
        spec.tiers decides the location's cold tier; a guest's view never does."""
        if owner:
            self.set_tier(view.bucket, view.prefix, view.cold_tier)
        return self.get(view.bucket, view.prefix)

    def set_tier(self, bucket: str, prefix: str, tier: p.ColdTier | None) -> None:
        """The location's cold tier from now on (None: none); a store opened without it is reopened."""
        key = (bucket, prefix.strip("/"))
        with self._lock:
            if self._tiers.get(key) == tier:
                return
            if tier is None:
                del self._tiers[key]
            else:
                self._tiers[key] = tier
            replaced = self._stores.pop(key, None)
            if replaced is not None:
                self._retired.append(replaced)   # a thread may still be using it

    def tier_of(self, bucket: str, prefix: str) -> p.ColdTier | None:
        with self._lock:
            return self._tiers.get((bucket, prefix.strip("/")))

    def by_url(self, url: str) -> Store:
        return self.get(*p.parse_store_url(url))

    def ensure(self, bucket: str, prefix: str) -> None:
        """Make sure the bucket exists (creating the store does)."""
        self.get(bucket, prefix)

    # -- raw objects (fromObject inputs) ---------------------------------------------------

    def open_object(self, bucket: str, key: str) -> Any | None:
        """A readable binary stream of an object, or None if it does not exist."""
        if self.settings.root:
            path = Path(self.settings.root) / bucket / key
            return path.open("rb") if path.is_file() else None
        from minio.error import S3Error
        try:
            return _Response(self.client().get_object(bucket, key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                return None
            raise

    def opened(self) -> list[Store]:
        """The stores opened so far (a ResultCache's is opened when a job or the cache is reconciled)."""
        with self._lock:
            return list(self._stores.values())

    def close(self) -> None:
        with self._lock:
            for store in [*self._stores.values(), *self._retired]:
                store.close()
            self._stores.clear()
            self._retired.clear()


class _Response(io.RawIOBase):
    """A minio response as a closeable binary stream."""

    def __init__(self, response: Any) -> None:
        self._r = response

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._r.read(len(b))
        n = len(data)
        b[:n] = data
        return n

    def read(self, size: int = -1) -> bytes:
        return bytes(self._r.read(None if size is None or size < 0 else size))

    def close(self) -> None:
        try:
            self._r.close()
            self._r.release_conn()
        finally:
            super().close()
