"""The content-addressed store (DESIGN §4): chunks, blobs, trees, results, refs.

    store = open_store()                       # $MEMOPLANE_STORE or ~/.cache/memoplane/store
    out = store.put_tree(out_dir)
    digest = store.commit(ResultManifest(...))  # result, then ref
    hit = store.get_ref(key)                    # None = miss: recompute
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from ..errors import InputError
from .backend import Backend, ObjectInfo
from .chunking import ChunkParams
from .digests import b3, check_digest
from .fs import FilesystemBackend
from .gc import Damage, EvictReport, GcReport, Stats, VerifyReport
from .manifests import (BlobManifest, BlobRef, Provenance, ResultManifest, StoredValue, TreeEntry,
                        TreeManifest, ValueKind)
from .signing import Blake3MacSigner, SignatureInvalid, Signer
from .store import INLINE_MAX, Hit, Store

__all__ = [
    "Backend", "ObjectInfo", "FilesystemBackend", "Store", "Hit", "ChunkParams",
    "BlobRef", "BlobManifest", "TreeEntry", "TreeManifest", "StoredValue", "Provenance",
    "ResultManifest", "ValueKind", "Signer", "Blake3MacSigner", "SignatureInvalid",
    "VerifyReport", "Damage", "GcReport", "Stats", "EvictReport", "INLINE_MAX",
    "b3", "check_digest", "default_store_path", "open_store",
]

ENV = "MEMOPLANE_STORE"


def default_store_path() -> Path:
    """$MEMOPLANE_STORE if set, else $XDG_CACHE_HOME/memoplane/store (~/.cache/...).

    The store sits in a subdirectory so other caches can live beside it in
    ~/.cache/memoplane."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "memoplane" / "store"


def open_store(location: str | os.PathLike[str] | None = None, *, signer: Signer | None = None,
               workers: int | None = None) -> Store:
    """A store at a path or file:// URL (None: default_store_path())."""
    if location is None:
        return Store(FilesystemBackend(default_store_path()), signer=signer, workers=workers)
    text = os.fspath(location)
    url = urlparse(text)
    if url.scheme in ("s3", "minio", "http", "https"):
        raise InputError(f"store {text}: object-store backends are not available yet",
                         "use a directory path, or set MEMOPLANE_STORE to one")
    if url.scheme == "file":
        text = url.path
    elif url.scheme and len(url.scheme) > 1:
        raise InputError(f"store {text}: unknown scheme {url.scheme!r}", "use a directory path or file://")
    return Store(FilesystemBackend(text), signer=signer, workers=workers)
