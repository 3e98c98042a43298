"""A node-local read-through cache in front of a remote backend (DESIGN §4: the agent's
chunk cache in front of MinIO).

Content-addressed objects (chunks, blobs, trees, results) never change under their name,
so a local copy is always as good as the remote one: reads try the local directory first
and fill it on a miss. Refs are mutable and always go to the remote. Writes go to the
remote (which refreshes GC ages there) and populate the cache with what this node uploaded.

Packs (packs.py) are read in byte ranges: each range fetched from the remote is kept as a local
object `ranges/<2 hex>/<pack hex>/<offset>-<length>`, and a later ranged read inside a kept range
(or inside a whole pack this node wrote or fetched) is served locally. Ranges, not whole packs:
a read plans the ranges it needs under a read-amplification budget (packs.plan_reads), and
fetching the whole 16 MiB pack for one chunk of it would break that budget and fill the cache
with chunks nobody asked for; a repeated read of the same blob plans the same ranges, so it hits.
Index segments are not cached (they are read once per Store, and a damaged local copy would hide
chunks).

Corruption: the Store verifies every read, every chunk of a range included. When a damaged copy
came from this cache, the Store calls `drop_cached(name, seen)` (`drop_cached_range` for a pack), which removes the local copy, and re-reads the object
(now from the remote) before it gives up; only a damaged *remote* copy is quarantined. As a
second line, `delete` of a cached name removes the remote object only when the remote bytes
equal the local copy it dropped: a damaged local copy can never delete a good remote one.

`exists` answers from the cache first: a local copy is verified data this node can serve,
and the Store's writers never rely on it for the remote, because they put_if_absent (which
always asks the remote and refreshes its age) every object before checking it exists.

The cache is bounded: past `max_bytes`, the least recently used copies (by mtime, which a
hit refreshes; atime is unreliable under relatime/noatime) are removed down to 90 %.
Several processes may share one cache directory; each keeps an estimate of its size and an
eviction rescans the directory for the truth.
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import InputError, NotFound
from ..settings import LOCAL_CACHE_BYTES
from .backend import Backend, ObjectInfo
from .fs import FilesystemBackend
from .packs import PACKS, read_range

log = logging.getLogger("memoplane.cas")

CACHE_PREFIXES = ("chunks/", "blobs/", "trees/", "results/", "packs/")
RANGES = "ranges/"  # local only: byte ranges of packs, see the module docstring
DEFAULT_MAX_BYTES = LOCAL_CACHE_BYTES  # one default for every node-local cache (memoplane.settings)
LOW_WATER = 0.9  # an eviction frees down to this fraction of max_bytes, so it runs rarely


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    evicted: int = 0
    dropped_damaged: int = 0


class CachingBackend:
    """`remote` with a bounded local copy of its immutable objects in `local`."""

    def __init__(self, remote: Backend, local: FilesystemBackend,
                 cache_prefixes: tuple[str, ...] = CACHE_PREFIXES, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, populate_on_write: bool = True) -> None:
        if max_bytes < 0:
            raise InputError(f"cache max_bytes={max_bytes} is negative", "use a size in bytes (0 caches nothing)")
        if any(p.startswith("refs/") or p == "" for p in cache_prefixes):
            raise InputError(f"cache_prefixes {cache_prefixes} include refs", "refs are mutable: never cache them")
        self.remote = remote
        self.local = local
        self.cache_prefixes = tuple(cache_prefixes)
        self.max_bytes = max_bytes
        self.populate_on_write = populate_on_write
        self.counters = CacheCounters()
        self._lock = threading.Lock()
        self._evicting = threading.Lock()
        self._bytes: int | None = None  # estimate; None until first needed

    def _cached(self, name: str) -> bool:
        return name.startswith(self.cache_prefixes)

    # -- the Backend protocol ---------------------------------------------------

    def put(self, name: str, data: bytes | bytearray) -> None:
        self.remote.put(name, data)
        if self._cached(name):
            if self.populate_on_write:
                self._fill(name, data)
            else:
                self._drop(name)

    def put_if_absent(self, name: str, data: bytes | Callable[[], bytes]) -> bool:
        if not self._cached(name) or not self.populate_on_write:
            return self.remote.put_if_absent(name, data)
        made: list[bytes] = []

        def produce() -> bytes:  # called by the remote only when it lacks the object
            made.append(data() if callable(data) else data)
            return made[0]

        wrote = self.remote.put_if_absent(name, produce)
        if made:
            self._fill(name, made[0])
        return wrote

    def create(self, name: str, data: bytes) -> bool:
        if self._cached(name):
            raise InputError(f"create({name!r}): content-addressed objects are written with put_if_absent",
                             "create only names that are not content addresses (audit/...)")
        return self.remote.create(name, data)

    def get(self, name: str) -> bytes:
        if not self._cached(name):
            return self.remote.get(name)
        try:
            data = self.local.get(name)
        except NotFound:
            pass
        else:
            with self._lock:
                self.counters.hits += 1
            self._touch(name)
            return data
        data = self.remote.get(name)
        with self._lock:
            self.counters.misses += 1
        self._fill(name, data)
        return data

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """`length` bytes of `name` from `offset`: from a local whole copy or a kept range that
        covers them, else one ranged read of the remote, kept locally (see the module docstring)."""
        if not self._cached(name):
            return read_range(self.remote, name, offset, length)
        for local_name, start in self._covering(name, offset, length):
            try:
                data = self.local.get_range(local_name, offset - start, length)
            except NotFound:  # evicted meanwhile
                continue
            with self._lock:
                self.counters.hits += 1
            self._touch(local_name)
            return data
        data = read_range(self.remote, name, offset, length)
        with self._lock:
            self.counters.misses += 1
        self._fill(f"{_ranges_of(name)}/{offset}-{len(data)}", data)
        return data

    def _covering(self, name: str, offset: int, length: int) -> builtins.list[tuple[str, int]]:
        """(local name, its offset in `name`) of the local copies holding all of the range."""
        found = [(name, 0)] if self.local.exists(name) else []
        for start, size in self._ranges(name):
            if start <= offset and offset + length <= start + size:
                found.append((f"{_ranges_of(name)}/{start}-{size}", start))
        return found

    def _ranges(self, name: str) -> builtins.list[tuple[int, int]]:
        """(offset, length) of the kept ranges of pack `name`."""
        try:
            entries = os.listdir(self.local.root / _ranges_of(name))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for entry in entries:
            start, _, size = entry.partition("-")
            if start.isdigit() and size.isdigit():
                out.append((int(start), int(size)))
        return out

    def drop_cached_range(self, name: str, offset: int, length: int) -> bool:
        """The Store found bytes of `name` in [offset, offset + length) damaged. Drop every local
        copy overlapping them (the whole pack, kept ranges) and return True if there was one: the
        caller re-reads, now from the remote. False: the damage is not local."""
        if not self._cached(name):
            return False
        dropped = False
        if self.local.exists(name):
            self._drop(name)
            dropped = True
        for start, size in self._ranges(name):
            if start < offset + length and offset < start + size:
                self._drop(f"{_ranges_of(name)}/{start}-{size}", size)
                dropped = True
        if dropped:
            with self._lock:
                self.counters.dropped_damaged += 1
            log.warning("dropped damaged local bytes of %s from %s", name, self.local.describe())
        return dropped

    def exists(self, name: str) -> bool:
        return (self._cached(name) and self.local.exists(name)) or self.remote.exists(name)

    def delete(self, name: str) -> None:
        if self._cached(name):
            try:
                mine = self.local.get(name)
            except NotFound:
                pass
            else:
                self._drop(name, len(mine))
                try:
                    theirs = self.remote.get(name)
                except NotFound:
                    return
                if theirs != mine:
                    log.warning("kept %s in %s: only the local copy at %s differed", name,
                                self.remote.describe(), self.local.describe())
                    return
        if name.startswith(PACKS):
            for start, size in self._ranges(name):
                self._drop(f"{_ranges_of(name)}/{start}-{size}", size)
        self.remote.delete(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.remote.list(prefix)

    def flush(self) -> None:
        self.remote.flush()  # local copies can always be refetched: never synced

    def describe(self) -> str:
        return f"{self.remote.describe()} (cached in {self.local.describe()})"

    # -- corruption --------------------------------------------------------------

    def drop_cached(self, name: str, seen: bytes) -> bool:
        """The Store read `seen` for `name` and found it damaged. If that is this
        node's local copy, remove it and return True: the caller re-reads, which
        now goes to the remote. False: the damage is not (or no longer) local."""
        if not self._cached(name):
            return False
        try:
            mine = self.local.get(name)
        except NotFound:
            return False
        if mine != seen:
            return False
        self._drop(name, len(mine))
        with self._lock:
            self.counters.dropped_damaged += 1
        log.warning("dropped a damaged local copy of %s from %s", name, self.local.describe())
        return True

    # -- bookkeeping ---------------------------------------------------------------

    def _touch(self, name: str) -> None:
        try:
            os.utime(self.local.root / name)
        except FileNotFoundError:  # evicted by another process meanwhile
            pass

    def _drop(self, name: str, size: int | None = None) -> None:
        if size is None:
            try:
                size = (self.local.root / name).stat().st_size
            except FileNotFoundError:
                return
        self.local.delete(name)
        with self._lock:
            if self._bytes is not None:
                self._bytes = max(0, self._bytes - size)

    def _fill(self, name: str, data: bytes | bytearray) -> None:
        if len(data) > self.max_bytes:
            return
        self.local.put(name, data)
        with self._lock:
            if self._bytes is None:
                self._bytes = self._scan()[1]
            else:
                self._bytes += len(data)
        self._evict_while_over()

    def _evict_while_over(self) -> None:
        """Evict until the estimate is under max_bytes. A filler that finds another
        thread evicting leaves it to that thread, which checks again after it is done
        (the filler counted its bytes before looking), so no fill is left over the cap."""
        while True:
            with self._lock:
                if self._bytes is None or self._bytes <= self.max_bytes:
                    return
            if not self._evicting.acquire(blocking=False):
                return
            try:
                freed = self._evict_locked(None)
            finally:
                self._evicting.release()
            if freed == 0:
                return

    def _scan(self) -> tuple[builtins.list[ObjectInfo], int]:
        infos = [i for p in (*self.cache_prefixes, RANGES) for i in self.local.list(p)]
        return infos, sum(i.size for i in infos)

    def cached_bytes(self) -> int:
        """Bytes held in the local cache (a fresh scan)."""
        return self._scan()[1]

    def evict(self, target: int | None = None) -> int:
        """Remove least recently used local copies until at most `target` bytes
        (default LOW_WATER of max_bytes) remain; returns how many were removed.
        One thread evicts at a time; the others carry on."""
        if not self._evicting.acquire(blocking=False):
            return 0
        try:
            return self._evict_locked(target)
        finally:
            self._evicting.release()

    def _evict_locked(self, target: int | None) -> int:
        target = int(self.max_bytes * LOW_WATER) if target is None else target
        infos, total = self._scan()
        removed = freed = 0
        for info in sorted(infos, key=lambda i: (i.mtime, i.name)):
            if total <= target:
                break
            self.local.delete(info.name)
            total -= info.size
            freed += info.size
            removed += 1
        with self._lock:
            # Fills that raced with the scan added to the running estimate: keep them.
            scanned = total + freed
            raced = max(0, (self._bytes or 0) - scanned)
            self._bytes = total + raced
            self.counters.evicted += removed
        return removed


def _ranges_of(name: str) -> str:
    """The local directory of a pack's kept ranges: `ranges/<2 hex>/<hex>`."""
    return RANGES + name.split("/", 1)[1]
