"""The content-addressed store (DESIGN §4): chunks, blobs, trees, results, refs.

    store = open_store()                       # $MEMOPLANE_STORE or ~/.cache/memoplane/store
    out = store.put_tree(out_dir)
    digest = store.commit(ResultManifest(...))  # result, then ref
    hit = store.get_ref(key)                    # None = miss: recompute

    store = open_store("s3://bucket/prefix")    # MinIO/S3: MEMOPLANE_S3_ENDPOINT, _ACCESS_KEY, _SECRET_KEY

With MEMOPLANE_COLD_STORE set (a location as above), the store has a cold tier there (tiers.py):
content not read for MEMOPLANE_COLD_AFTER_SECONDS moves there at `memoplane gc`, and is read back.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from ..errors import InputError
from ..settings import COLD_AFTER_ENV, COLD_AFTER_SECONDS, COLD_STORE_ENV, LOCAL_CACHE_BYTES_ENV, LOCAL_CACHE_ENV
from .backend import Backend, ObjectInfo, PrefixedBackend
from .cached import DEFAULT_MAX_BYTES as DEFAULT_CACHE_BYTES
from .cached import CachingBackend
from .chunking import ChunkParams
from .digests import b3, check_digest
from .fs import FilesystemBackend
from .gc import Damage, EvictReport, GcReport, Stats, VerifyReport
from .records import (
    BlobManifest,
    BlobRef,
    Provenance,
    ResultManifest,
    StoredValue,
    TreeEntry,
    TreeManifest,
    ValueKind,
)
from .store import INLINE_MAX, READ_AHEAD, Hit, RefEntry, SnapshotEntry, Store

__all__ = [
    "INLINE_MAX", "Backend", "BlobManifest", "BlobRef", "CachingBackend",
    "ChunkParams", "Damage", "EvictReport", "FilesystemBackend", "GcReport", "Hit", "ObjectInfo",
    "Provenance", "RefEntry", "ResultManifest", "S3Backend", "SnapshotEntry", "Stats", "Store",
    "StoreUnavailable", "StoredValue", "TreeEntry", "TreeManifest", "ValueKind", "VerifyReport",
    "b3", "check_digest", "default_store_path", "namespaces", "open_backend", "open_namespace", "open_store",
    "s3_backend",
    "store_from_settings",
]

ENV = "MEMOPLANE_STORE"


def __getattr__(name: str) -> object:
    # S3 names load the minio client on first use; the embedded CLI never pays for it.
    if name in ("S3Backend", "StoreUnavailable"):
        from . import s3

        return getattr(s3, name)
    raise AttributeError(f"module 'memoplane.cas' has no attribute {name!r}")

S3_ENV = ("MEMOPLANE_S3_ENDPOINT", "MEMOPLANE_S3_ACCESS_KEY", "MEMOPLANE_S3_SECRET_KEY")
# optional: a node-local chunk cache in front of S3, under the agents' names (memoplane.settings)
CACHE_DIR_ENV, CACHE_MAX_ENV = LOCAL_CACHE_ENV, LOCAL_CACHE_BYTES_ENV


def default_store_path() -> Path:
    """$MEMOPLANE_STORE if set, else $XDG_CACHE_HOME/memoplane/store (~/.cache/...).

    The store sits in a subdirectory so other caches can live beside it in
    ~/.cache/memoplane."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "memoplane" / "store"


def open_store(location: str | os.PathLike[str] | None = None, *, workers: int | None = None,
               cold: tuple[str, float] | None = None) -> Store:
    """A store at a path, file:// URL or s3://bucket/prefix (None: $MEMOPLANE_STORE, else
    the default directory). s3:// reads MEMOPLANE_S3_ENDPOINT (http://host:port or
    https://...), MEMOPLANE_S3_ACCESS_KEY, MEMOPLANE_S3_SECRET_KEY, and optionally
    MEMOPLANE_LOCAL_CACHE / MEMOPLANE_LOCAL_CACHE_BYTES for a node-local chunk cache.
    `cold`: a cold tier's (location, after seconds) (default: MEMOPLANE_COLD_STORE's, see the module doc)."""
    if location is None:
        env = os.environ.get(ENV)
        location = env if env and env.startswith(("s3://", "minio://")) else default_store_path()
    backend = open_backend(location, workers=workers)
    if cold is None and os.environ.get(COLD_STORE_ENV):
        cold = (os.environ[COLD_STORE_ENV], _cold_after())
    if cold is not None:
        from .tiers import TieredBackend
        backend = TieredBackend(backend, open_backend(cold[0], workers=workers), after=cold[1])
    return Store(backend, workers=workers)


def _cold_after() -> float:
    text = os.environ.get(COLD_AFTER_ENV)
    try:
        after = float(text) if text else COLD_AFTER_SECONDS
    except ValueError:
        after = -1.0
    if not after > 0:
        raise InputError(f"{COLD_AFTER_ENV}={text!r} is not a positive number of seconds",
                         f"set it to e.g. {COLD_AFTER_SECONDS:.0f} (30 days), or unset it")
    return after


def open_backend(location: str | os.PathLike[str], *, workers: int | None = None) -> Backend:
    """The backend open_store puts a Store on (see there), without a cold tier."""
    text = os.fspath(location)
    url = urlparse(text)
    if url.scheme in ("s3", "minio"):
        return _open_s3(text, workers=workers)
    if url.scheme in ("http", "https"):
        raise InputError(f"store {text}: an endpoint is not a store location",
                         "use s3://bucket/prefix and set MEMOPLANE_S3_ENDPOINT to the endpoint")
    if url.scheme == "file":
        text = url.path
    elif url.scheme and len(url.scheme) > 1:
        raise InputError(f"store {text}: unknown scheme {url.scheme!r}", "use a directory path or file://")
    return FilesystemBackend(text)


NAMESPACES = "namespaces/"   # where open_namespace keeps each namespace's objects


def open_namespace(location: str | os.PathLike[str] | None, namespace: str, *, workers: int | None = None) -> Store:
    """The store of one namespace (a team of `memoplane serve`) inside the store at `location`: its
    objects live under their own prefix, so its results, trees and snapshots are never found through
    another namespace or the store itself (and the chunks it shares with them are stored twice)."""
    shared = open_store(location, workers=workers)
    shared.close()   # only its backend is kept
    return Store(PrefixedBackend(shared.backend, f"{NAMESPACES}{namespace}/"), workers=workers)


def namespaces(store: Store) -> list[str]:
    """The namespaces open_namespace made inside `store` (each is collected like a store of its own:
    the store's own GC never looks inside them)."""
    return sorted({info.name[len(NAMESPACES):].partition("/")[0] for info in store.backend.list(NAMESPACES)})


def _open_s3(text: str, *, workers: int | None) -> Backend:
    url = urlparse(text)
    if not url.netloc:
        raise InputError(f"store {text} names no bucket", "use s3://bucket/prefix")
    for var in S3_ENV:
        if not os.environ.get(var):
            raise InputError(f"store {text}: {var} is not set",
                             f"export {var} (for the local control plane: eval \"$(hack/cluster env)\")")
    endpoint, access_key, secret_key = (os.environ[v] for v in S3_ENV)
    max_bytes = os.environ.get(CACHE_MAX_ENV)
    try:
        cache_max = int(max_bytes) if max_bytes else None
    except ValueError:
        raise InputError(f"{CACHE_MAX_ENV}={max_bytes!r} is not a number of bytes", "set it to an integer") from None
    return s3_backend(endpoint, access_key, secret_key, url.netloc, url.path,
                      cache_dir=os.environ.get(CACHE_DIR_ENV) or None, cache_max_bytes=cache_max, workers=workers)


def store_from_settings(endpoint: str, access_key: str, secret_key: str, bucket: str, prefix: str = "", *,
                        secure: bool | None = None, cache_dir: str | os.PathLike[str] | None = None,
                        cache_max_bytes: int | None = None,
                        workers: int | None = None, region: str | None = None,
                        create_bucket: bool = True) -> Store:
    """A Store on S3/MinIO from explicit settings: what open_store("s3://...") builds from the environment.

    `endpoint`: http://host:port, https://host or host:port (then `secure`, default
    True). `cache_dir`: a node-local read-through cache of content-addressed objects
    (bounded by `cache_max_bytes`, default memoplane.settings.LOCAL_CACHE_BYTES). `create_bucket`: create the bucket
    if missing (one request now instead of a failure on the first write)."""
    workers = workers or os.cpu_count() or 2
    return Store(s3_backend(endpoint, access_key, secret_key, bucket, prefix, secure=secure, cache_dir=cache_dir,
                            cache_max_bytes=cache_max_bytes, workers=workers, region=region,
                            create_bucket=create_bucket), workers=workers)


def s3_backend(endpoint: str, access_key: str, secret_key: str, bucket: str, prefix: str = "", *,
               secure: bool | None = None, cache_dir: str | os.PathLike[str] | None = None,
               cache_max_bytes: int | None = None, workers: int | None = None, region: str | None = None,
               create_bucket: bool = True) -> Backend:
    """The backend store_from_settings puts a Store on (see there)."""
    from .s3 import S3Backend, make_client  # minio costs ~0.1 s to import: only when used

    workers = workers or os.cpu_count() or 2
    # Upload threads plus read-ahead, with headroom for refs and listing.
    client = make_client(endpoint, access_key, secret_key, secure=secure, region=region,
                         max_connections=max(32, 2 * workers + READ_AHEAD))
    s3 = S3Backend(client, bucket, prefix)
    if create_bucket:
        s3.ensure_bucket()
    backend: Backend = s3
    if cache_dir is not None:
        backend = CachingBackend(s3, FilesystemBackend(cache_dir, durability="none"),
                                 max_bytes=DEFAULT_CACHE_BYTES if cache_max_bytes is None else cache_max_bytes)
    return backend
