"""What the operator remembers between API reads, so that the hot path reads nothing twice.

- The latest body of every unfinished job (from watch events and from the answers to its
  own writes): the periodic resync walks these instead of listing every ComputeJob.
- The resourceVersions its own writes produced: the watch echoes each write, and the echo
  of a write that a later write of ours superseded describes a state already acted upon,
  so it is skipped rather than re-read (any other version is acted upon: decisions write
  with resourceVersion preconditions, so acting on a stale body costs a 409, never a wrong
  write).
- Who waits for what: a job that waits for another with the same key (single flight) or
  for an upstream job is woken when that one settles, instead of at the next resync.

All of it is a cache: an operator that restarts with none of it lists the jobs once and
rebuilds it, and the periodic full list repairs anything missed. Not thread-safe: the
reconciler holds its lock around every call.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any, Literal

from . import protocol as p
from .views import job, meta_of
from .views import ref_of as ref_of

Ref = tuple[str, str]                 # (namespace, name)
Topic = tuple[str, str, str]          # ("key", namespace, key label) | ("job", namespace, name)
Verdict = Literal["skip", "settled", "open"]

REMEMBERED_WRITES = 8                 # resourceVersions kept per job
REMEMBERED_JOBS = 20000               # jobs whose writes are remembered (least recently written dropped)


def settled(obj: Mapping[str, Any]) -> bool:
    """Final for its current spec: nothing to do until the spec changes."""
    return job(obj).settled


def key_topic(namespace: str, cache_key: str) -> Topic:
    return ("key", namespace, p.key_label(cache_key))


def job_topic(namespace: str, name: str) -> Topic:
    return ("job", namespace, name)


def topics_of(obj: Mapping[str, Any]) -> list[Topic]:
    """What a job settling (or going away) may unblock: its name and its key."""
    namespace, name = ref_of(obj)
    out = [job_topic(namespace, name)]
    key = job(obj).status.cache_key
    if key:
        out.append(key_topic(namespace, key))
    return out


class JobIndex:
    def __init__(self) -> None:
        self.open: dict[Ref, dict[str, Any]] = {}
        self._writes: OrderedDict[Ref, deque[str]] = OrderedDict()
        self._waiters: dict[Topic, set[Ref]] = {}

    # -- bodies ------------------------------------------------------------------------

    def stale(self, obj: Mapping[str, Any]) -> bool:
        """An echo of a write of ours that a later write of ours superseded."""
        rv = meta_of(obj).resource_version
        written = self._writes.get(ref_of(obj))
        return written is not None and rv in written and rv != written[-1]

    def observe(self, obj: dict[str, Any]) -> Verdict:
        """A body from the watch."""
        if self.stale(obj):
            return "skip"
        return self._keep(obj)

    def wrote(self, obj: dict[str, Any]) -> None:
        """The API server's answer to a write of ours."""
        ref = ref_of(obj)
        written = self._writes.pop(ref, None) or deque(maxlen=REMEMBERED_WRITES)
        written.append(str(meta_of(obj).resource_version))
        self._writes[ref] = written
        while len(self._writes) > REMEMBERED_JOBS:
            self._writes.popitem(last=False)
        self._keep(obj)

    def _keep(self, obj: dict[str, Any]) -> Verdict:
        ref = ref_of(obj)
        if settled(obj) or meta_of(obj).deleting:
            self.open.pop(ref, None)
            return "settled"
        self.open[ref] = obj
        return "open"

    def forget(self, ref: Ref) -> None:
        self.open.pop(ref, None)
        self._writes.pop(ref, None)

    def replace_open(self, items: list[dict[str, Any]]) -> None:
        """A full list: the unfinished jobs are exactly these."""
        self.open = {ref_of(o): o for o in items if not settled(o)}

    # -- waiting -------------------------------------------------------------------------

    def wait_for(self, waiter: Ref, topic: Topic) -> None:
        self._waiters.setdefault(topic, set()).add(waiter)

    def wake(self, obj: Mapping[str, Any]) -> list[Ref]:
        """The jobs waiting on what `obj` settling (or being deleted) may unblock; they
        are forgotten here (one that still waits registers again)."""
        woken: set[Ref] = set()
        for topic in topics_of(obj):
            woken |= self._waiters.pop(topic, set())
        woken.discard(ref_of(obj))
        return sorted(woken)

    def waiting(self) -> int:
        return sum(len(v) for v in self._waiters.values())
