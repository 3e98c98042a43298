"""Store maintenance: verify (scrub), gc (mark and sweep, then repack.py over packs), stats, evict (retention).

gc, stats and evict work on the store's backend; verify re-runs the store's checked
reads on every object. The Store's methods of the same names call them.

Marking reads manifests without checking signatures: GC must never delete data
that is live for a reader holding another key.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Protocol

from ..errors import InputError, NotFound, StoreCorrupted
from . import repack
from .backend import Backend, ObjectInfo
from .digests import attestation_name, digest_of_name, object_name
from .packs import INDEX, PACKS, TOMBSTONES
from .records import BlobManifest, ResultManifest, SealError, TreeManifest, unseal

CONTENT = ("chunks/", "blobs/", "trees/", "results/", "attestations/")  # what the sweep may delete
# packs/ and index/ (packs.py) are outside the sweep: only the repacking GC may delete them.
SNAPSHOTS = "snapshots"  # kept snapshots (Store.keep_snapshot): roots like refs, outside the sweep
STORED = (*CONTENT, "packs/", "index/", "refs/", SNAPSHOTS + "/")  # what counts as stored bytes


# -- marking ---------------------------------------------------------------------


@dataclass
class _Graph:
    """What each ref reaches, with plain sizes of chunks for stats."""

    refs: dict[str, tuple[str, float]] = field(default_factory=dict)  # ref name -> (result, mtime)
    reach: dict[str, set[str]] = field(default_factory=dict)  # ref name -> object names
    logical: dict[str, int] = field(default_factory=dict)  # ref name -> result logical size
    chunk_plain: dict[str, int] = field(default_factory=dict)  # chunk name -> plain size
    inline: dict[str, int] = field(default_factory=dict)  # result name -> inline value size
    _blobs: dict[str, set[str]] = field(default_factory=dict)

    def live(self) -> set[str]:
        return set().union(*self.reach.values()) | set(self.refs)


def _read(backend: Backend, name: str) -> dict[str, Any] | None:
    try:
        return unseal(backend.get(name))
    except (NotFound, SealError):
        return None


def _blob_reach(backend: Backend, g: _Graph, digest: str) -> set[str]:
    name = object_name("blobs", digest)
    if name not in g._blobs:
        body = _read(backend, name)
        out = {name}
        if body is not None:
            try:
                for c, n in BlobManifest.from_dict(body).chunks:
                    cname = object_name("chunks", c)
                    out.add(cname)
                    g.chunk_plain[cname] = n
            except InputError:
                pass
        g._blobs[name] = out
    return g._blobs[name]


def _result_reach(backend: Backend, g: _Graph, digest: str) -> tuple[set[str], int]:
    name = object_name("results", digest)
    out = {name}
    body = _read(backend, name)
    if body is None:
        return out, 0
    try:
        result = ResultManifest.from_dict(body)
    except InputError:
        return out, 0
    if result.value.blob is None:
        g.inline[name] = result.value.size
    blobs = result.blobs()
    if result.output_tree:
        out |= _tree_reach(backend, g, result.output_tree.digest)
    for b in blobs:
        out |= _blob_reach(backend, g, b)
    return out, result.logical_size


def _tree_reach(backend: Backend, g: _Graph, digest: str) -> set[str]:
    name = object_name("trees", digest)
    out = {name}
    body = _read(backend, name)
    if body is not None:
        with contextlib.suppress(InputError):
            for b in TreeManifest.from_dict(body).blobs():
                out |= _blob_reach(backend, g, b)
    return out


def _mark_roots(backend: Backend, g: _Graph, results: Iterable[str], blobs: Iterable[str]) -> set[str]:
    """What results and blobs named from outside the refs (live jobs, GMemSeed overlays) reach."""
    out: set[str] = set()
    for digest in results:
        with contextlib.suppress(InputError):
            out |= _result_reach(backend, g, digest)[0]
    for digest in blobs:
        with contextlib.suppress(InputError):
            out |= _blob_reach(backend, g, digest)
    return out


def chunk_digests(live: Iterable[str]) -> set[str]:
    """The chunk digests among marked object names (what repack.py takes as live)."""
    return {digest_of_name(name) for name in live if name.startswith("chunks/")}


def live_chunks(backend: Backend, *, results: Iterable[str] = (), blobs: Iterable[str] = ()) -> set[str]:
    """Digests of the chunks the refs and the root `results` and `blobs` reach."""
    g = mark(backend)
    return chunk_digests(g.live() | _mark_roots(backend, g, results, blobs))


def mark(backend: Backend) -> _Graph:
    g = _Graph()
    for info in backend.list("refs/"):
        body = _read(backend, info.name)
        result = body.get("result") if body else None
        if not isinstance(result, str):
            continue
        try:
            g.reach[info.name], g.logical[info.name] = _result_reach(backend, g, result)
            # Who vouches for a live result stays as long as it does.
            vouching = attestation_name(digest_of_name(info.name), result, None)
            g.reach[info.name] |= {a.name for a in backend.list(vouching)}
        except InputError:  # a malformed digest in the ref
            continue
        g.refs[info.name] = (result, info.mtime)
    for info in backend.list(SNAPSHOTS + "/"):   # a kept snapshot keeps its tree (unsigned: never judged here)
        body = _read(backend, info.name)
        with contextlib.suppress(InputError):
            if body is not None and body.get("tree") == digest_of_name(info.name):
                g.reach[info.name] = _tree_reach(backend, g, digest_of_name(info.name))
    return g


# -- verify ------------------------------------------------------------------------


@dataclass(frozen=True)
class Damage:
    name: str
    reason: str


@dataclass
class VerifyReport:
    checked: dict[str, int]
    damaged: list[Damage]

    @property
    def ok(self) -> bool:
        return not self.damaged

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": dict(self.checked), "damaged": [asdict(d) for d in self.damaged]}


def _check(fn: Callable[[], object], name: str) -> Damage | None:
    try:
        fn()
    except (StoreCorrupted, InputError) as e:
        return Damage(name, str(e))
    except NotFound as e:
        return Damage(name, f"missing: {e}")
    return None


class CheckedReads(Protocol):
    """The store's reads that check what they read: each quarantines a damaged object and raises
    StoreCorrupted, InputError or NotFound. A Store is one."""

    @property
    def backend(self) -> Backend: ...

    def iter_blob(self, digest: str, *, stored: bool = False) -> Iterator[bytes]: ...

    def get_tree(self, digest: str) -> TreeManifest: ...

    def read_ref(self, key: str) -> str | None: ...


def _read_blob(store: CheckedReads, digest: str) -> None:
    for _ in store.iter_blob(digest, stored=True):
        pass


def _check_ref(store: CheckedReads, info: ObjectInfo) -> None:
    key = "b3:" + info.name.rsplit("/", 1)[-1]
    digest = store.read_ref(key)
    if digest is None:
        raise StoreCorrupted(f"ref {key} was damaged and quarantined")
    if not store.backend.exists(object_name("results", digest)):
        raise NotFound(f"ref {key} names result {digest}, which is not stored")


def verify(store: CheckedReads, work: Executor, read_chunk: Callable[[str], object],
           check_result: Callable[[str], object], packed: Iterable[tuple[str, Callable[[], object]]] = ()
           ) -> VerifyReport:
    """Re-hash every object; damaged ones are quarantined (as reads do) and reported.

    `work` reads the chunks in parallel; `read_chunk` and `check_result` are the store's own
    checks of one chunk and of one result with everything it names; `packed` are (name, check)
    of every chunk copy in a pack (counted as "packed")."""
    checks: list[tuple[str, str, Callable[[], object]]] = []
    for info in store.backend.list("chunks/"):
        checks.append(("chunks", info.name, partial(read_chunk, digest_of_name(info.name))))
    checks += [("packed", name, check) for name, check in packed]
    damaged = [d for d in work.map(lambda c: _check(c[2], c[1]), checks) if d]
    checked = Counter(kind for kind, _, _ in checks)
    later: list[tuple[str, str, Callable[[], object]]] = []
    for info in store.backend.list("blobs/"):
        later.append(("blobs", info.name, partial(_read_blob, store, digest_of_name(info.name))))
    for info in store.backend.list("trees/"):
        later.append(("trees", info.name, partial(store.get_tree, digest_of_name(info.name))))
    for info in store.backend.list("results/"):
        later.append(("results", info.name, partial(check_result, digest_of_name(info.name))))
    for info in store.backend.list("refs/"):
        later.append(("refs", info.name, partial(_check_ref, store, info)))
    for kind, name, fn in later:  # blobs read chunks through the pool themselves
        checked[kind] += 1
        if (d := _check(fn, name)) is not None:
            damaged.append(d)
    return VerifyReport(dict(checked), damaged)


# -- gc ----------------------------------------------------------------------------


@dataclass
class GcReport:
    live: int
    deleted: int
    deleted_bytes: int
    kept_young: int  # unreferenced but within the grace period
    temp_removed: int
    kept_bytes: int = 0  # bytes of the content objects, packs, index objects and refs left on the backend
    packs: repack.RepackReport = field(default_factory=repack.RepackReport)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "packs": self.packs.to_dict()}


def gc(backend: Backend, grace_seconds: float, *, results: Iterable[str] = (), blobs: Iterable[str] = (),
       clock: Callable[[], float] = time.time) -> GcReport:
    """Delete objects no ref (nor any of the root `results` and `blobs`) reaches and older than
    the grace period, then repack packs (repack.collect: the same grace between its two passes,
    and as the minimum age of a pack it condemns).

    Marks first, then lists: anything written after marking began is young, and
    writers refresh the mtime of objects they deduplicate against, so an
    in-flight write is never swept. Packs are deduplicated against without a request,
    so repack.py's tombstones and two passes protect them instead.
    """
    if grace_seconds < 0:
        raise InputError(f"grace_seconds={grace_seconds} is negative", "use 0 or more seconds")
    marked_at = clock()  # repack's grace periods count from the start of the mark
    g = mark(backend)
    live = g.live() | _mark_roots(backend, g, results, blobs)
    now = clock()
    deleted = deleted_bytes = young = kept = 0
    for prefix in CONTENT:
        for info in backend.list(prefix):
            if info.name in live or now - info.mtime < grace_seconds:
                young += info.name not in live
                kept += info.size
                continue
            backend.delete(info.name)
            deleted += 1
            deleted_bytes += info.size
    packs = repack.collect(backend, chunk_digests(live), repack.Policy.from_grace(grace_seconds), marked_at)
    kept += sum(i.size for prefix in ("refs/", PACKS, INDEX, TOMBSTONES) for i in backend.list(prefix))
    sweep = getattr(backend, "sweep_temp", None)
    temps = sweep(max(grace_seconds, 60.0)) if sweep else 0
    return GcReport(len(live), deleted, deleted_bytes, young, temps, kept, packs)


# -- stats ---------------------------------------------------------------------------


@dataclass
class Stats:
    entries: int  # refs
    logical_bytes: int  # sum over refs of their results' sizes: what storing each in full would take
    unique_bytes: int  # plain bytes of the distinct chunks (and inline values) the refs reach
    stored_bytes: int  # bytes of every object on the backend (compressed chunks, manifests, refs)
    chunks: int  # chunks on the backend: chunk objects and chunk copies in packs
    objects: int

    @property
    def dedup_ratio(self) -> float:
        """logical / unique: deduplication alone, compression excluded."""
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def storage_ratio(self) -> float:
        """logical / stored: deduplication and compression together."""
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dedup_ratio": self.dedup_ratio, "storage_ratio": self.storage_ratio}


def stats(backend: Backend, packed_chunks: int = 0) -> Stats:
    """`packed_chunks`: chunk copies in packs (the store's index knows them), counted as chunks."""
    g = mark(backend)
    live_chunks = {n for reach in g.reach.values() for n in reach if n.startswith("chunks/")}
    stored, chunks, objects = 0, packed_chunks, 0
    for prefix in STORED:
        for info in backend.list(prefix):
            stored += info.size
            objects += 1
            chunks += prefix == "chunks/"
    unique = sum(g.chunk_plain.get(n, 0) for n in live_chunks) + sum(g.inline.values())
    return Stats(len(g.refs), sum(g.logical.values()), unique, stored, chunks, objects)


# -- evict ---------------------------------------------------------------------------


@dataclass
class EvictReport:
    evicted: list[str]  # cache keys
    remaining: int
    live_bytes_before: int
    live_bytes_after: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evict(backend: Backend, *, max_age: float | None, max_bytes: int | None,
          on_evict: Callable[[str, str], object] | None = None, chunk_bytes: dict[str, int] | None = None
          ) -> EvictReport:
    """Delete refs older than max_age, then oldest first until what the remaining
    refs reach is at most max_bytes (as stored). Run gc() afterwards to free space.
    `on_evict(key, result)` follows each deletion (the store's audit log). `chunk_bytes`: stored
    bytes of packed chunks by their `chunks/` name (they are no objects of their own)."""
    for name, v in (("max_age", max_age), ("max_bytes", max_bytes)):
        if v is not None and v < 0:
            raise InputError(f"{name}={v} is negative", f"use a non-negative {name} or None")
    g = mark(backend)
    sizes = {**(chunk_bytes or {}), **{i.name: i.size for p in (*CONTENT, "refs/") for i in backend.list(p)}}
    order = sorted(g.refs, key=lambda r: (g.refs[r][1], r))  # oldest first
    newest: dict[str, int] = {}  # object -> index of the newest ref reaching it
    for i, ref in enumerate(order):
        for obj in g.reach[ref] | {ref}:
            newest[obj] = i
    kept = set().union(*(reach for name, reach in g.reach.items() if name not in g.refs))  # by snapshots
    freed_by = Counter[int]()
    for obj, i in newest.items():
        freed_by[i] += 0 if obj in kept else sizes.get(obj, 0)
    live = before = sum(freed_by.values())
    now = time.time()
    evicted: list[str] = []
    for i, ref in enumerate(order):
        too_old = max_age is not None and now - g.refs[ref][1] > max_age
        too_big = max_bytes is not None and live > max_bytes
        if not (too_old or too_big):
            break
        backend.delete(ref)
        evicted.append(digest_of_name(ref))
        if on_evict is not None:
            on_evict(evicted[-1], g.refs[ref][0])
        live -= freed_by[i]
    return EvictReport(evicted, len(order) - len(evicted), before, live)
