"""Nodes from the agents' Leases: which are alive, what they run, where a job goes.

Liveness is judged by when the operator *saw* a lease change (its resourceVersion), not by
the renewTime an agent wrote, so a node whose clock is off is neither lost early nor kept
late. On first sight (an operator that just started) the renewTime stands in, bounded by
the lease duration.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import protocol as p
from .resolve import parse_time
from .views import job, meta_of, section


@dataclass(frozen=True)
class NodeView:
    name: str
    capacity: int
    running: int
    profiles: Mapping[str, str]  # profile -> runtime identity digest
    age_s: float                 # seconds since the lease was last seen renewed
    duration_s: float = float(p.LEASE_DURATION_SECONDS)
    sessions: str = ""           # host:port of its session endpoint ("": it serves none)

    @property
    def live(self) -> bool:
        return self.age_s <= self.duration_s


def lease_fields(lease: Mapping[str, Any]) -> dict[str, Any] | None:
    """The parts of an agent's Lease (a dict as the API server returns it) we use; None
    if it is not an agent lease."""
    meta = meta_of(lease)
    name = meta.name
    if not name.startswith(p.LEASE_PREFIX):
        return None
    ann = meta.annotations
    spec = section(lease, "spec")
    profiles = {}
    for prof in [x.strip() for x in str(ann.get(p.PROFILES_ANNOTATION, "")).split(",") if x.strip()]:
        digest = ann.get(p.runtime_annotation(prof))
        if digest:
            profiles[prof] = digest

    def _int(text: Any, default: int) -> int:
        try:
            return int(text)
        except (TypeError, ValueError):
            return default

    return {
        "node": name[len(p.LEASE_PREFIX):],
        "resource_version": meta.resource_version,
        "renew_time": parse_time(spec.get("renewTime")),
        "duration_s": float(spec.get("leaseDurationSeconds") or p.LEASE_DURATION_SECONDS),
        "capacity": max(0, _int(ann.get(p.CAPACITY_ANNOTATION), 1)),
        "running": max(0, _int(ann.get(p.RUNNING_ANNOTATION), 0)),
        "profiles": profiles,
        "sessions": str(ann.get(p.SESSIONS_ANNOTATION, "")),
    }


@dataclass
class LeaseTracker:
    """Remembers when each lease last changed, in the observer's monotonic time."""

    _seen: dict[str, tuple[str | None, float]] = field(default_factory=dict)

    def observe(self, leases: Iterable[Mapping[str, Any]], now_mono: float, now_wall: datetime
                ) -> list[NodeView]:
        views = []
        present = set()
        for lease in leases:
            f = lease_fields(lease)
            if f is None:
                continue
            node = f["node"]
            present.add(node)
            previous = self._seen.get(node)
            if previous is None:
                # First sight: trust the written renewTime, but never beyond one duration.
                written_age = (now_wall - f["renew_time"]).total_seconds() if f["renew_time"] else f["duration_s"]
                written_age = min(max(written_age, 0.0), f["duration_s"] + 1)
                self._seen[node] = (f["resource_version"], now_mono - written_age)
            elif previous[0] != f["resource_version"]:
                self._seen[node] = (f["resource_version"], now_mono)
            age = now_mono - self._seen[node][1]
            views.append(NodeView(node, f["capacity"], f["running"], f["profiles"], age, f["duration_s"],
                                  f["sessions"]))
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return sorted(views, key=lambda v: v.name)


def live_nodes(nodes: Iterable[NodeView]) -> list[NodeView]:
    return [n for n in nodes if n.live]


def runtime_for(nodes: Iterable[NodeView], profile: str) -> str | None:
    """The runtime digest that live agents advertise for `profile`; when they disagree
    (a rolling upgrade), the one most nodes run (ties: the smaller digest)."""
    counts = Counter(n.profiles[profile] for n in live_nodes(nodes) if profile in n.profiles)
    if not counts:
        return None
    return min(counts, key=lambda d: (-counts[d], d))


def pick_node(nodes: Iterable[NodeView], profile: str, runtime: str,
              load: Mapping[str, int], avoid: str | None = None, exclude: frozenset[str] = frozenset()) -> str | None:
    """A live node serving `profile` at `runtime`, with the most free capacity.

    `load`: jobs the operator has assigned to each node and not yet seen finish (the
    leases' running counts lag). A full node is still chosen when all are full: its agent
    queues the job. `avoid` (the node a retried job failed on) loses ties and is taken only
    when it is the sole candidate. `exclude` (a replica's siblings' nodes) is never taken."""
    candidates = [n for n in live_nodes(nodes) if n.profiles.get(profile) == runtime and n.name not in exclude]
    if not candidates:
        return None

    def score(n: NodeView) -> tuple[int, int, str]:
        free = n.capacity - max(load.get(n.name, 0), n.running)
        return (1 if n.name == avoid else 0, -free, n.name)

    return min(candidates, key=score).name


def node_lost(node: str | None, nodes: Iterable[NodeView]) -> bool:
    """True when a job assigned to `node` must be reassigned: no live lease for it."""
    if not node:
        return False
    return not any(n.name == node and n.live for n in nodes)


def assigned_load(jobs: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Jobs Scheduled or Running on each node, by the node label: the operator's own count of
    what it assigned and has not yet seen finish."""
    load: dict[str, int] = {}
    for obj in jobs:
        view = job(obj)
        if view.status.phase in (p.SCHEDULED, p.RUNNING):
            node = view.assigned.node
            if node:
                load[node] = load.get(node, 0) + 1
    return load


@dataclass(frozen=True)
class Lost:
    """A started job whose node lost its lease (or that has no node): reschedule it, or
    fail it when its attempts are past the backoff limit."""
    what: str
    attempts: int
    backoff_limit: int

    @property
    def exhausted(self) -> bool:
        return self.attempts > self.backoff_limit


def lost(obj: Mapping[str, Any], nodes: Iterable[NodeView]) -> Lost | None:
    """None while the Scheduled or Running job's node holds a live lease."""
    view = job(obj)
    node = view.assigned.node
    if not node_lost(node, nodes) and node:
        return None
    return Lost(f"node {node} lost its lease" if node else "the job has no node", view.status.attempts,
                view.spec.backoff_limit)
