"""Repacking GC for packs (issue 14 item 3): reclaim dead chunks' bytes, never lose a live one.

Inputs: the live chunk digests (gc.py marks them from refs and roots), the backend, and the time
the mark began (`now`, injected: tests move it past grace periods). One `collect` call reads what
packs/, index/ and tombstones/ hold (`load_layout`), decides (pure functions, `decide`) and applies (`execute`).

Two passes at least `grace` seconds apart (kopia's maintenance safety rules):
- pass 1: a pack older than `min_pack_age` whose dead share (stored bytes of chunks no live digest
  needs from it, over all its chunk bytes) is at least `dead_share` is condemned. Its live chunks
  are first copied into new packs and a segment (durable), then one tombstone (a tombstones/ object,
  packs.build_tombstone) names the condemned packs. A PackIndex that loaded the tombstone no longer
  deduplicates against them: a writer packs such a chunk again rather than reuse a doomed copy.
- pass 2, in a later run once the tombstone is `grace` old at mark time: the mark is fresh, so a
  chunk that became live since pass 1 (a writer that deduplicated against a condemned pack before
  it saw the tombstone) is copied out too; then a consolidated segment replaces every segment
  naming a deleted pack, those segments go, the packs go, and the tombstone goes last (a
  PackIndex refresh reads tombstones before segments: one that still reads a replaced segment
  reads its tombstone too, and does not deduplicate against the packs being deleted). Past
  MAX_SEGMENTS segments, the small old ones are merged into that consolidated segment too, so a
  PackIndex loads a bounded number of objects at start (a writer writes one per flush).
  Safe when `grace` exceeds the writers' index refresh interval plus their longest write: by then
  every writer has seen the tombstone, and every write that deduplicated against a condemned copy
  before has written its ref, which the fresh mark sees.
A chunk held by several packs (racing writers, a repack cut short) counts as live only in the
youngest one not condemned (its "home"), so duplicates make older packs dead and are dropped.

Unindexed packs (named by no segment: a writer killed between its pack and its segment, or a
damaged segment) older than `grace` are deleted, unless a live chunk is in no indexed pack and the
pack holds it: then `index_pack` indexes it (salvage). A load that raced another GC's
consolidation (a segment vanished) deletes no unindexed pack that run.

Every step is idempotent and ordered so a GC killed anywhere leaves only extra copies, extra
segments or young unindexed packs, and the next run finishes the job: new packs and their segment
before the tombstone; the consolidated segment before the segments it replaces; segments before
packs; packs before the tombstone. A pack the repack wrote with a condemned pack's exact bytes
(same name) is neither condemned nor deleted. A live chunk no copy of which verifies keeps its
packs (they hold all there is) and is counted `unreadable`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from itertools import chain
from typing import Any

from ..errors import InputError, NotFound
from .backend import Backend, ObjectInfo
from .chunking import encode_chunk
from .digests import b3, digest_of_name, object_name
from .packs import (
    INDEX,
    PACK_TARGET,
    PACKS,
    TOMBSTONES,
    Location,
    PackDamaged,
    PackIndex,
    PackWriter,
    Segment,
    build_segment,
    build_tombstone,
    index_pack,
    load_segment,
    parse_pack,
    read_chunk,
    verified_chunk,
)

log = logging.getLogger("memoplane.cas")

DEAD_SHARE = 0.2  # condemn a pack once this share of its bytes is dead: at most 4 live bytes rewritten per 1 freed
MAX_SEGMENTS = 32  # more index segments than this: the small old ones are merged (each costs a GET at index load)
SMALL_SEGMENT = 8 << 20  # bytes (about 80,000 chunk records): a segment below this may be merged


@dataclass(frozen=True)
class Policy:
    grace: float  # seconds from a tombstone to its packs' deletion; also an unindexed pack's grace
    min_pack_age: float  # a younger pack is never condemned: its chunks may be a write whose ref is not written yet
    dead_share: float = DEAD_SHARE

    def __post_init__(self) -> None:
        for name in ("grace", "min_pack_age"):
            if getattr(self, name) < 0:
                raise InputError(f"{name}={getattr(self, name)} is negative", "use 0 or more seconds")
        if not 0 < self.dead_share <= 1:
            raise InputError(f"dead_share={self.dead_share} is outside (0, 1]", "use a share such as 0.2")

    @classmethod
    def from_grace(cls, grace: float) -> Policy:
        """gc's grace period for both ages (MEMOPLANE_GC_GRACE_SECONDS, `memoplane gc --grace`)."""
        return cls(grace=grace, min_pack_age=grace)


@dataclass(frozen=True)
class Layout:
    """What packs/, index/ and tombstones/ held when GC read them."""

    packs: Mapping[str, ObjectInfo]  # pack digest -> its listing (size, mtime)
    index: Mapping[str, tuple[ObjectInfo, Segment]]  # index object name -> listing, parsed (segment or tombstone)
    incomplete: bool = False  # an index object vanished while loading (another GC consolidated)

    def segments(self) -> dict[str, Segment]:
        return {name: seg for name, (_, seg) in self.index.items() if not seg.condemned}

    def tombstones(self) -> dict[str, tuple[float, frozenset[str]]]:
        return {name: (info.mtime, seg.condemned) for name, (info, seg) in self.index.items() if seg.condemned}


def load_layout(backend: Backend) -> Layout:
    """Every index object (checked against its name; damaged ones are left out, so their packs
    look unindexed), then the packs: a pack a listed segment names is listed too."""
    index: dict[str, tuple[ObjectInfo, Segment]] = {}
    incomplete = False
    for info in chain(backend.list(TOMBSTONES), backend.list(INDEX)):
        try:
            index[info.name] = (info, load_segment(backend, info.name))
        except NotFound:
            incomplete = True
        except PackDamaged as e:
            log.warning("index object %s is damaged (%s); GC treats its packs as unindexed", info.name, e)
    packs = {digest_of_name(info.name): info for info in backend.list(PACKS)}
    return Layout(packs, index, incomplete)


# -- decisions (pure) ----------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    live: int  # stored bytes of the live chunks this pack is the home of
    total: int  # stored bytes of all its chunks

    @property
    def dead_share(self) -> float:
        return 1 - self.live / self.total if self.total else 1.0


@dataclass(frozen=True)
class Decisions:
    condemn: frozenset[str] = frozenset()  # packs a new tombstone names (pass 1)
    delete: frozenset[str] = frozenset()  # condemned packs past the grace period (pass 2)
    repack: frozenset[str] = frozenset()  # live chunks every stored copy of which is condemned
    replace: frozenset[str] = frozenset()  # segments naming a deleted pack: one consolidated segment replaces them
    merge: frozenset[str] = frozenset()  # small old segments the consolidated segment also replaces
    retire: frozenset[str] = frozenset()  # tombstones past the grace period
    unindexed: frozenset[str] = frozenset()  # unindexed packs past the grace period
    missing: frozenset[str] = frozenset()  # live chunks in no indexed pack (an unindexed pack may hold them)


def contents(layout: Layout) -> dict[str, dict[str, Location]]:
    """Stored pack -> the chunks its segments say it holds."""
    out: dict[str, dict[str, Location]] = defaultdict(dict)
    for seg in layout.segments().values():
        for digest, loc in seg.records:
            if loc.pack in layout.packs:
                out[loc.pack][digest] = loc
    return dict(out)


def condemned_since(layout: Layout) -> dict[str, float]:
    """Stored pack a tombstone condemns -> when its earliest tombstone was written."""
    out: dict[str, float] = {}
    for mtime, packs in layout.tombstones().values():
        for pack in packs & layout.packs.keys():
            out[pack] = min(out.get(pack, mtime), mtime)
    return out


def past_grace(layout: Layout, policy: Policy, now: float) -> frozenset[str]:
    """Condemned packs whose tombstone is at least `grace` old: pass 2 deletes them."""
    return frozenset(p for p, since in condemned_since(layout).items() if now - since >= policy.grace)


def too_young(layout: Layout, policy: Policy, now: float) -> frozenset[str]:
    return frozenset(p for p, info in layout.packs.items() if now - info.mtime < policy.min_pack_age)


def usage(layout: Layout, live: Iterable[str], excluded: Iterable[str] = ()) -> dict[str, Usage]:
    """Live and total bytes of every indexed pack; a live chunk counts in its home only: the
    youngest pack outside `excluded` (the condemned) that holds it."""
    held, live_set, skip = contents(layout), set(live), set(excluded)
    home: dict[str, str] = {}
    for pack, chunks in held.items():
        if pack in skip:
            continue
        for digest in chunks.keys() & live_set:
            if digest not in home or _age_key(layout, pack) > _age_key(layout, home[digest]):
                home[digest] = pack
    return {pack: Usage(sum(loc.length for d, loc in chunks.items() if home.get(d) == pack),
                        sum(loc.length for loc in chunks.values()))
            for pack, chunks in held.items()}


def _age_key(layout: Layout, pack: str) -> tuple[float, str]:
    return layout.packs[pack].mtime, pack


def dead(usages: Mapping[str, Usage]) -> frozenset[str]:
    """Packs none of whose chunks is live here."""
    return frozenset(p for p, u in usages.items() if u.live == 0)


def worth_repacking(usages: Mapping[str, Usage], policy: Policy) -> frozenset[str]:
    """Dead packs, and packs whose dead bytes make up at least the policy's share."""
    return dead(usages) | {p for p, u in usages.items() if u.live < u.total and u.dead_share >= policy.dead_share}


def to_repack(layout: Layout, live: Iterable[str], gone: Iterable[str]) -> frozenset[str]:
    """Live chunks every stored, indexed copy of which is in a `gone` pack."""
    live_set, gone_set = set(live), set(gone)
    doomed: set[str] = set()
    kept: set[str] = set()
    for pack, chunks in contents(layout).items():
        (doomed if pack in gone_set else kept).update(chunks.keys() & live_set)
    return frozenset(doomed - kept)


def unindexed(layout: Layout, policy: Policy, now: float) -> frozenset[str]:
    """Stored packs no segment names, at least `grace` old."""
    named = contents(layout).keys()
    return frozenset(p for p, info in layout.packs.items() if p not in named and now - info.mtime >= policy.grace)


def to_merge(layout: Layout, policy: Policy, now: float) -> frozenset[str]:
    """Small segments at least `min_pack_age` old, once there are more than MAX_SEGMENTS: merged
    into the consolidated segment, so a PackIndex loads few objects at start."""
    segments = layout.segments()
    if len(segments) <= MAX_SEGMENTS:
        return frozenset()
    small = frozenset(name for name in segments if layout.index[name][0].size < SMALL_SEGMENT
                      and now - layout.index[name][0].mtime >= policy.min_pack_age)
    return small if len(small) > 1 else frozenset()


def decide(layout: Layout, live: Iterable[str], policy: Policy, now: float) -> Decisions:
    """Both passes' decisions for one run; `now` is when the mark of `live` began."""
    live_set = set(live)
    prior = frozenset(condemned_since(layout))
    delete = past_grace(layout, policy, now)
    condemn = worth_repacking(usage(layout, live_set, prior), policy) - prior - too_young(layout, policy, now)
    replace = frozenset(name for name, seg in layout.segments().items()
                        if any(loc.pack in delete for _, loc in seg.records))
    retire = frozenset(name for name, (mtime, _) in layout.tombstones().items() if now - mtime >= policy.grace)
    orphans = frozenset() if layout.incomplete else unindexed(layout, policy, now) - prior
    indexed = {d for chunks in contents(layout).values() for d in chunks}
    return Decisions(condemn, delete, to_repack(layout, live_set, prior | condemn), replace,
                     to_merge(layout, policy, now), retire, orphans, frozenset(live_set - indexed))


# -- execution -----------------------------------------------------------------------


@dataclass
class RepackReport:
    packs_condemned: int = 0  # named by this run's tombstone (pass 1)
    packs_deleted: int = 0  # condemned packs past their grace period (pass 2) and unindexed packs
    chunks_repacked: int = 0  # live chunks copied out of condemned packs
    packs_written: int = 0
    segments_replaced: int = 0
    unindexed_indexed: int = 0  # unindexed packs indexed because they held a live chunk
    unreadable: int = 0  # live chunks no copy of which verified: their packs are kept
    bytes_deleted: int = 0  # packs and index objects deleted
    bytes_repacked: int = 0  # stored bytes of the chunks copied into new packs

    @property
    def bytes_reclaimed(self) -> int:
        """Freed minus copied (trailers and segments aside)."""
        return self.bytes_deleted - self.bytes_repacked

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_reclaimed": self.bytes_reclaimed}


def collect(backend: Backend, live: Iterable[str], policy: Policy, now: float, *,
            target: int = PACK_TARGET) -> RepackReport:
    """One GC run over the packs: load, decide, execute. `now`: when the mark of `live` began."""
    layout = load_layout(backend)
    return execute(backend, layout, decide(layout, live, policy, now), target=target)


def execute(backend: Backend, layout: Layout, decisions: Decisions, *, target: int = PACK_TARGET) -> RepackReport:
    report = RepackReport()
    written, unreadable = _repack(backend, layout, decisions.repack, report, target)
    condemn = decisions.condemn - written
    if condemn:
        _put_index(backend, "tombstones", build_tombstone(condemn))
        report.packs_condemned = len(condemn)
    _delete_condemned(backend, layout, decisions, decisions.delete - written - unreadable, unreadable, report)
    _settle_unindexed(backend, layout, decisions, report)
    return report


def _index_of(layout: Layout) -> PackIndex:
    index = PackIndex()
    for name, (_, seg) in layout.index.items():
        index.add(name, seg)
    return index


def _repack(backend: Backend, layout: Layout, digests: frozenset[str], report: RepackReport,
            target: int) -> tuple[frozenset[str], frozenset[str]]:
    """Copy `digests` into new packs and a durable segment, one source pack at a time (one GET
    of the whole pack: a pack worth repacking is mostly read anyway, and S3 charges by request;
    every chunk verified, its stored bytes copied as they are). Returns the packs written and
    the packs holding a copy of a chunk no copy of which verified (kept, and still condemned)."""
    if not digests:
        return frozenset(), frozenset()
    index = _index_of(layout)
    writer = PackWriter(backend, PackIndex(), target=target)  # an empty index: never deduplicate here
    by_source: dict[str, list[str]] = defaultdict(list)
    for digest in sorted(digests):
        by_source[index.locations(digest)[0].pack].append(digest)
    unreadable: set[str] = set()
    for source in sorted(by_source):
        for digest, (stored, plain_length) in _read_verified(backend, index, source, by_source[source],
                                                             unreadable).items():
            writer.add(digest, _returning(stored), plain_length)
            report.bytes_repacked += len(stored)
            report.chunks_repacked += 1
    writer.flush()
    written = frozenset(loc.pack for d in digests - unreadable for loc in writer.index.locations(d))
    report.packs_written = len(written)
    report.unreadable = len(unreadable)
    return written, frozenset(loc.pack for d in unreadable for loc in index.locations(d))


def _returning(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _read_verified(backend: Backend, index: PackIndex, source: str, digests: list[str],
                   unreadable: set[str]) -> dict[str, tuple[bytes, int]]:
    """(stored bytes, plain length) of each chunk of `digests` in pack `source` that verifies
    there, else from another copy (read_chunk, re-encoded); the others go to `unreadable`."""
    try:
        data = backend.get(object_name("packs", source))
    except NotFound:
        data = b""
    out = {}
    for digest in digests:
        loc = next(loc for loc in index.locations(digest) if loc.pack == source)
        stored = data[loc.offset:loc.offset + loc.length]
        try:
            verified_chunk(digest, stored, loc.plain)
            out[digest] = (stored, loc.plain)
            continue
        except PackDamaged:
            pass
        try:
            plain = read_chunk(backend, index, digest)
            out[digest] = (encode_chunk(plain), len(plain))
        except (PackDamaged, NotFound) as e:
            log.warning("GC keeps the packs of live chunk %s: no copy verifies (%s)", digest, e)
            unreadable.add(digest)
    return out


def _put_index(backend: Backend, kind: str, data: bytes) -> str:
    """Write an index object or tombstone after everything before it is durable, and make it
    durable; its name."""
    name = object_name(kind, b3(data))
    backend.flush()
    backend.put_if_absent(name, data)
    backend.flush()
    return name


def _delete_condemned(backend: Backend, layout: Layout, decisions: Decisions, delete: frozenset[str],
                      keep: frozenset[str], report: RepackReport) -> None:
    """Pass 2: consolidated segment, then the segments it replaces, the packs, the tombstones
    (but one naming a `keep` pack). A condemned pack the repack rewrote byte for byte is not
    deleted, and its retired tombstone no longer condemns it."""
    segments = layout.segments()
    replace = sorted({n for n in decisions.replace if any(loc.pack in delete for _, loc in segments[n].records)}
                     | decisions.merge)
    survivors = [(d, loc) for name in replace for d, loc in segments[name].records
                 if loc.pack not in delete and loc.pack in layout.packs]
    consolidated = _put_index(backend, "index", build_segment(dict.fromkeys(survivors))) if survivors else ""
    for name in replace:
        if name != consolidated:  # merging a lone segment rewrites the same bytes
            _delete(backend, name, layout.index[name][0].size, report)
        report.segments_replaced += 1
    for pack in sorted(delete):
        _delete(backend, object_name("packs", pack), layout.packs[pack].size, report)
        report.packs_deleted += 1
    tombstones = layout.tombstones()
    for name in sorted(decisions.retire):
        if not tombstones[name][1] & keep:  # a kept pack stays condemned
            _delete(backend, name, layout.index[name][0].size, report)


def _settle_unindexed(backend: Backend, layout: Layout, decisions: Decisions, report: RepackReport) -> None:
    """Delete old unindexed packs, or index one that holds a live chunk no segment finds."""
    for pack in sorted(decisions.unindexed):
        name = object_name("packs", pack)
        if decisions.missing and _holds_any(backend, name, decisions.missing):
            try:
                index_pack(backend, PackIndex(), name)
                report.unindexed_indexed += 1
            except PackDamaged as e:
                log.warning("GC keeps unindexed pack %s: it holds a live chunk but does not verify (%s)", name, e)
            continue
        _delete(backend, name, layout.packs[pack].size, report)
        report.packs_deleted += 1


def _holds_any(backend: Backend, name: str, digests: frozenset[str]) -> bool:
    try:
        return any(d in digests for d, *_ in parse_pack(backend.get(name)))
    except (PackDamaged, NotFound):
        return False


def _delete(backend: Backend, name: str, size: int, report: RepackReport) -> None:
    backend.delete(name)
    report.bytes_deleted += size

