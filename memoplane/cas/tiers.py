"""A cold tier: a second, cheaper backend behind the store's own (issue 14 item 5).

TieredBackend wraps `hot` (the store as it is) and `cold`. Writes go to hot. Reads try hot,
then cold: an object found only in cold is copied back into hot (re-warmed) before it is
returned, so the next read is hot again; a ranged read (packs are read by byte ranges) that
misses hot fetches the whole object from cold once, re-warms it, and serves the range from it
(concurrent misses of one object wait for that one fetch). Nothing the tier returns is
trusted: the Store verifies every chunk it reads (blake3) whichever tier it came from. A pack
from cold that does not hash to its name is not re-warmed (it is served for that verification,
which quarantines its damaged chunk copies, so a forged pack never enters hot); a damaged legacy
chunks/ object is quarantined through `delete`, which removes it from both tiers. A scrub
(`memoplane verify`) reads cold packs by byte range, not whole.

Which objects move: names under DEMOTABLE only (pack files, and the per-chunk objects of
stores written before packs). Blob and tree manifests, results, index segments, refs,
attestations and records are small and read by every hit or by GC's marking: they stay hot.

Demotion (`demote`, run by the operator's ResultCache maintenance and `memoplane gc`) moves a
demotable object not read for `after` seconds: copy to cold, flush, read the copy back and
compare, and only then delete it from hot. A crash before the delete leaves two copies (the
next run finishes the move); after it, one copy in cold. An object is never readable nowhere.
A writer that deduplicated against a hot object the demoter then deletes finds it in cold on
read. GC sees both tiers (`list` is their union, `delete` removes both).

Last read. Object stores have no atime, and a request per hit to record one would double the
cost of the hot path. So reads are noted in memory only: a set of the names this process read
today (an object is noted at most once a day per process, and the set is cleared when the day
changes, so it holds at most what was read that day). The noted names are written as one mark
object, `tiers/marks/<time>-<node>-<pid>-<n>` (one name a line), at most every MARK_FLUSH_EVERY
seconds from a short-lived background thread, and at exit. A hit thus costs a lock and a set
lookup. The demoter takes an object's last use as the newest of its hot copy's mtime (written or
deduplicated against) and the marks naming it; marks older than `after` can no longer keep
anything hot and are deleted, and those older than a day are merged into one per day (naming only
what is still hot), so a demotion reads about after/day marks plus the last day's. Marks are a hint: a forged or lost mark only moves an object
early or late, and a read of a demoted object re-warms it.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Literal

from ..errors import InputError, NotFound
from .backend import Backend, ObjectInfo
from .cached import CachingBackend
from .digests import b3, digest_of_name
from .packs import PACKS, read_range

log = logging.getLogger("memoplane.cas")

DEMOTABLE = (PACKS, "chunks/")  # the only names a cold tier ever holds
MARKS = "tiers/marks/"
MARK_EVERY = 86400.0  # an object is noted at most once per this many seconds per process
MARK_FLUSH_EVERY = 300.0  # noted names are written at most this often (and at exit)
_counter = itertools.count()


def demotable(name: str) -> bool:
    return name.startswith(DEMOTABLE)


@dataclass
class TierCounters:
    cold_reads: int = 0  # objects fetched from cold (each re-warmed)
    marks_written: int = 0


@dataclass(frozen=True)
class TierReport:
    moved: int  # objects demoted to cold
    bytes_moved: int
    kept_hot: int  # demotable objects read or written within `after`
    failed: int  # copies that did not read back equal (left hot)
    left: int  # due but beyond the call's limit
    marks_dropped: int  # older than `after`
    marks_merged: int  # older than a day, merged into one per day
    after: float  # the tier's delay, seconds
    cold: str  # where the tier is (describe())

    def to_dict(self) -> dict[str, int | float | str]:
        return asdict(self)


class TieredBackend:
    """`hot` with a cold tier behind it for objects not read for `after` seconds."""

    def __init__(self, hot: Backend, cold: Backend, *, after: float,
                 clock: Callable[[], float] = time.time, node: str | None = None) -> None:
        if after <= 0:
            raise InputError(f"cold tier after={after} is not positive", "set after to a duration such as 720h")
        self.hot = hot
        self.cold = cold
        self.after = after
        self.clock = clock
        self.node = re.sub(r"[^A-Za-z0-9_.-]", "-", node or socket.gethostname())[:63] or "node"
        self.counters = TierCounters()
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}
        self._day = -1
        self._noted: set[str] = set()  # read today (this process)
        self._pending: set[str] = set()  # noted, not yet in a mark object
        self._last_flush = clock()
        self._flushing = False
        self._writing = threading.Lock()  # one mark write at a time: flush_marks returns once all are written
        self._scrubbing = 0  # scrub() calls in progress: reads are neither noted nor re-warmed
        ref = weakref.ref(self)
        atexit.register(lambda: (b := ref()) is not None and b.flush_marks())

    # -- the Backend protocol ------------------------------------------------------

    def put(self, name: str, data: bytes | bytearray) -> None:
        self.hot.put(name, data)

    def put_if_absent(self, name: str, data: bytes | Callable[[], bytes]) -> bool:
        """Asks hot only: content used again that sits in cold is written hot (a re-warm by write)."""
        return self.hot.put_if_absent(name, data)

    def create(self, name: str, data: bytes) -> bool:
        return self.hot.create(name, data)

    def get(self, name: str) -> bytes:
        try:
            data = self.hot.get(name)
        except NotFound:
            if not demotable(name):
                raise
            data, _ = self._from_cold(name, lambda: self.hot.get(name))
        self._note(name)
        return data

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            data = read_range(self.hot, name, offset, length)
        except NotFound:
            if not demotable(name):
                raise
            if self._scrubbing:  # a scrub reads every chunk copy: one ranged read each, never whole packs
                return read_range(self.cold, name, offset, length)
            data, whole = self._from_cold(name, lambda: read_range(self.hot, name, offset, length))
            if whole:
                data = data[offset:offset + length]
        self._note(name)
        return data

    def exists(self, name: str) -> bool:
        return self.hot.exists(name) or (demotable(name) and self.cold.exists(name))

    def delete(self, name: str) -> None:
        """From both tiers (GC, quarantine): cold first, so a crash between leaves the hot copy."""
        if demotable(name):
            self.cold.delete(name)
        self.hot.delete(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Hot's objects, then cold's that hot lacks (an object in both is listed once, as hot)."""
        seen = set()
        for info in self.hot.list(prefix):
            seen.add(info.name)
            yield info
        if not any(prefix.startswith(p) or p.startswith(prefix) for p in DEMOTABLE):
            return
        for info in self.cold.list(prefix):
            if info.name not in seen and demotable(info.name):
                yield info

    def flush(self) -> None:
        self.hot.flush()

    def describe(self) -> str:
        return f"{self.hot.describe()} (cold tier {self.cold.describe()} after {self.after:.0f} s)"

    def drop_cached(self, name: str, seen: bytes) -> bool:
        """A node-local cache in front of hot (cached.py) drops its damaged copy; see Store._load."""
        drop = getattr(self.hot, "drop_cached", None)
        return bool(drop(name, seen)) if drop is not None else False

    def drop_cached_range(self, name: str, offset: int, length: int) -> bool:
        """The same for a pack's byte range (chunks.py `_read_copy`): without it, a damaged range in
        the node cache would be taken for a damaged remote copy and quarantined."""
        drop = getattr(self.hot, "drop_cached_range", None)
        return bool(drop(name, offset, length)) if drop is not None else False

    @contextmanager
    def scrub(self) -> Iterator[None]:
        """Reads that are not uses (`memoplane verify` re-reads everything): while inside, nothing
        read is noted and what comes from cold stays there, so a scrub neither keeps every object
        hot for `after` nor warms the whole cold tier. (For the whole backend: hits meanwhile
        are not noted either.)"""
        with self._lock:
            self._scrubbing += 1
        try:
            yield
        finally:
            with self._lock:
                self._scrubbing -= 1

    # -- read-through ----------------------------------------------------------------

    def _from_cold(self, name: str, read_hot: Callable[[], bytes]) -> tuple[bytes, bool]:
        """(hot's answer, False) if another thread re-warmed `name` meanwhile, else (the whole
        object from cold, True) after writing it to hot. NotFound if cold lacks it too."""
        with self._lock:
            fetching = self._fetching.setdefault(name, threading.Lock())
        with fetching:
            try:
                try:
                    return read_hot(), False
                except NotFound:
                    pass
                data = self.cold.get(name)
                if self._scrubbing or not _intact(name, data):
                    return data, True
                self.hot.put_if_absent(name, data)
                with self._lock:
                    self.counters.cold_reads += 1
                log.info("re-warmed %s from %s", name, self.cold.describe())
                return data, True
            finally:
                with self._lock:
                    if self._fetching.get(name) is fetching:
                        del self._fetching[name]

    # -- last-read marks -----------------------------------------------------------

    def _note(self, name: str) -> None:
        if not demotable(name):
            return
        now = self.clock()
        with self._lock:
            if self._scrubbing:
                return
            day = int(now // MARK_EVERY)
            if day != self._day:
                self._day, self._noted = day, set()
            if name not in self._noted:
                self._noted.add(name)
                self._pending.add(name)
            due = bool(self._pending) and not self._flushing and now - self._last_flush >= MARK_FLUSH_EVERY
            if due:
                self._flushing = True
        if due:
            threading.Thread(target=self._flush_in_background, name="memoplane-tier-marks", daemon=True).start()

    def _flush_in_background(self) -> None:
        try:
            self.flush_marks()
        except Exception as e:  # noqa: BLE001 - a lost mark only makes a demotion early; the read succeeded
            log.warning("could not write the cold tier's read marks to %s: %s", self.hot.describe(), e)
        finally:
            with self._lock:
                self._flushing = False

    def flush_marks(self) -> int:
        """Write the names noted since the last flush as one mark object; returns how many.
        Waits for a background write in progress, so every name noted before the call is written."""
        with self._writing:
            with self._lock:
                names, self._pending = sorted(self._pending), set()
                self._last_flush = now = self.clock()
            if not names:
                return 0
            self.hot.create(self.mark_name(now, self.node), "\n".join(names).encode())
            with self._lock:
                self.counters.marks_written += 1
            return len(names)

    @staticmethod
    def mark_name(at: float, who: str) -> str:
        return f"{MARKS}{int(at * 1000):015d}-{who}-{os.getpid()}-{next(_counter)}"


def _intact(name: str, data: bytes) -> bool:
    """Whether a demotable object fetched from cold may be re-warmed: a pack must hash to its name
    (packs are named by blake3 of their bytes). One that does not is served once, not copied hot,
    so the Store's per-chunk verification quarantines its damaged copies without a forged pack
    ever entering hot. (A legacy chunks/ object is named by its plain bytes: the Store checks it.)"""
    if not name.startswith(PACKS) or digest_of_name(name) == b3(data):
        return True
    log.warning("%s read from the cold tier does not hash to its name: served for verification, not re-warmed", name)
    return False


# -- demotion --------------------------------------------------------------------------


def _mark_time(name: str) -> float | None:
    stamp = name[len(MARKS):].split("-", 1)[0]
    return int(stamp) / 1000 if stamp.isdigit() else None


def last_reads(hot: Backend) -> tuple[dict[str, float], dict[str, tuple[float, list[str]]]]:
    """(object name -> newest mark naming it, mark object name -> (its time, the names in it))."""
    newest: dict[str, float] = {}
    marks: dict[str, tuple[float, list[str]]] = {}
    for info in hot.list(MARKS):
        at = _mark_time(info.name)
        if at is None:
            continue
        try:
            names = hot.get(info.name).decode("utf-8", "replace").splitlines()
        except NotFound:
            continue
        marks[info.name] = (at, names)
        for name in names:
            if at > newest.get(name, 0.0):
                newest[name] = at
    return newest, marks


def demote(tiered: TieredBackend, now: float | None = None, limit: int | None = None) -> TierReport:
    """Move demotable objects not read for `tiered.after` seconds to cold (see the module doc);
    `now` defaults to the tier's clock. At most `limit` moves (the rest are counted as `left`, for
    the next call), so a first demotion of a large store does not hold its caller for hours."""
    tiered.flush_marks()
    now = tiered.clock() if now is None else now
    cutoff = now - tiered.after
    newest, marks = last_reads(tiered.hot)
    moved = size = failed = left = 0
    kept: set[str] = set()
    for prefix in DEMOTABLE:
        for info in list(tiered.hot.list(prefix)):
            if max(info.mtime, newest.get(info.name, 0.0)) > cutoff:
                kept.add(info.name)
                continue
            if limit is not None and moved + failed >= limit:
                left += 1
                continue
            outcome = _move(tiered, info.name)
            if outcome == "moved":
                moved, size = moved + 1, size + info.size
            elif outcome == "failed":
                failed += 1
    dropped, merged = _compact_marks(tiered, marks, kept, cutoff, now)
    return TierReport(moved, size, len(kept), failed, left, dropped, merged, tiered.after, tiered.cold.describe())


def _compact_marks(tiered: TieredBackend, marks: dict[str, tuple[float, list[str]]], hot: set[str],
                   cutoff: float, now: float) -> tuple[int, int]:
    """Delete marks older than `after` (they keep nothing hot any more), and merge those older than a
    day into one per day, naming only objects still hot and stamped with the day's newest time (an
    object may stay hot up to a day longer): a demotion then reads about after/MARK_EVERY marks plus
    the last day's. The merged marks are written before the merged are deleted. Returns (dropped, merged)."""
    dropped = merged = 0
    days: dict[int, tuple[float, set[str]]] = {}
    for name, (at, names) in marks.items():
        if at <= cutoff:
            tiered.hot.delete(name)
            dropped += 1
        elif at <= now - MARK_EVERY:
            newest, kept = days.get(int(at // MARK_EVERY), (0.0, set()))
            days[int(at // MARK_EVERY)] = (max(newest, at), kept | (set(names) & hot))
    old = [name for name, (at, _) in marks.items() if cutoff < at <= now - MARK_EVERY]
    if len(old) <= len(days):
        return dropped, merged
    for at, still_hot in days.values():
        if still_hot:
            tiered.hot.create(tiered.mark_name(at, "merged"), "\n".join(sorted(still_hot)).encode())
    for name in old:
        tiered.hot.delete(name)
        merged += 1
    return dropped, merged


def _behind_cache(hot: Backend) -> Backend:
    """What a node-local cache (cached.py) is in front of: demotion reads what it moves from there,
    so it neither fills the cache with packs about to leave nor downloads each twice (a cached
    object's delete first compares the local copy with the remote's)."""
    return hot.remote if isinstance(hot, CachingBackend) else hot


def _move(tiered: TieredBackend, name: str) -> Literal["moved", "failed", "gone"]:
    """Copy `name` to cold, read it back, then delete it from hot; "failed" (left hot) if the
    copy differs, "gone" if hot no longer has it (GC deleted it meanwhile)."""
    try:
        data = _behind_cache(tiered.hot).get(name)
    except NotFound:
        return "gone"
    tiered.cold.put(name, data)
    tiered.cold.flush()
    try:
        copied = tiered.cold.get(name)
    except NotFound:
        copied = None
    if copied != data:
        log.warning("kept %s hot: its copy in %s did not read back equal", name, tiered.cold.describe())
        return "failed"
    tiered.hot.delete(name)
    return "moved"
