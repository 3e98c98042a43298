"""Propagation along fromJob edges: a result is never Ready while an upstream it used is
being recomputed, and a downstream job whose upstreams come back with the same results
runs nothing (early cutoff).

- The edge index: for every watched job (settled ones too) the jobs its fromJob inputs
  name, and of each job the little propagation reads (`JobState`). It is kept from the
  watch and the full list; like memoplane.cluster.index it is a cache that a restarted
  operator rebuilds from its first list, because every state it acts on is in the objects.
- Hold: a settled, Succeeded job one of whose upstreams is being recomputed (its spec
  changed, or it is not Ready for any other reason, e.g. held itself) goes to Waiting,
  reason UpstreamChanged, Ready=False and Reconciling=True (kstatus InProgress), its previous
  result left in status. Its own downstream jobs then see it not Ready and are held in turn.
- Release: a held job is resolved again (memoplane.cluster.flight.needs_resolution) when
  its upstreams settle: the same key is an early cutoff (Succeeded again with the result it
  had, nothing runs), another key is resolved as any new key is (a hit or a run), and the
  Event says which inputs changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import protocol as p
from .views import job

Ref = tuple[str, str]        # (namespace, name)
Edge = tuple[str, Ref]       # (input name, the upstream job it takes the result of)


def from_job_inputs(obj: Mapping[str, Any]) -> tuple[Edge, ...]:
    """The job's fromJob inputs: (input name, (namespace, name) of the upstream)."""
    view = job(obj)
    return tuple((str(i.get("name") or ""), (str(i["fromJob"].get("namespace") or view.meta.namespace),
                                             str(i["fromJob"].get("name") or "")))
                 for i in view.spec.inputs if isinstance(i.get("fromJob"), Mapping))


def _short(digest: str | None) -> str:
    return f"{digest[:15]}…" if digest else "none"


def _label(namespace: str, upstream: Ref) -> str:
    """An upstream's name as a job of `namespace` writes it."""
    return upstream[1] if upstream[0] == namespace else f"{upstream[0]}/{upstream[1]}"


@dataclass(frozen=True)
class JobState:
    """What propagation reads of a job."""

    generation: int
    phase: str | None
    current: bool              # the status describes the latest spec

    @property
    def ready(self) -> bool:
        """Succeeded for its current spec: its result is the one its downstream jobs use."""
        return self.current and self.phase == p.SUCCEEDED


def state_of(obj: Mapping[str, Any]) -> JobState:
    view = job(obj)
    generation = view.meta.raw.get("generation")
    current = generation is None or view.status.raw.get("observedGeneration") == generation
    return JobState(view.meta.generation, view.status.phase, current)


def held(obj: Mapping[str, Any]) -> bool:
    """Held back by an upstream being recomputed: resolve it again before anything else."""
    status = job(obj).status
    return status.phase == p.WAITING and status.reason == p.REASON_UPSTREAM_CHANGED


def holdable(obj: Mapping[str, Any]) -> bool:
    """Settled with a result for its current spec: Ready, so it must be held if an upstream changes."""
    view = job(obj)
    return not view.meta.deleting and state_of(obj).ready


@dataclass(frozen=True)
class Hold:
    message: str
    reason: str = p.REASON_UPSTREAM_CHANGED


def hold(obj: Mapping[str, Any], states: Mapping[Ref, JobState]) -> Hold | None:
    """Hold `obj` back if it is Ready and an upstream it uses is not (an upstream that is
    gone is not: results outlive jobs, the downstream keeps what it has)."""
    if not holdable(obj):
        return None
    namespace = job(obj).meta.namespace
    for name, upstream in from_job_inputs(obj):
        state = states.get(upstream)
        if state is None or state.ready:
            continue
        what = f"is being recomputed (generation {state.generation})" if not state.current or state.phase not in \
            p.TERMINAL else f"is not Ready (phase {state.phase})"
        return Hold(f"input '{name}': upstream ComputeJob '{_label(namespace, upstream)}' {what}")
    return None


@dataclass(frozen=True)
class EarlyCutoff:
    """The held job resolved to the key it had (or cannot be resolved, its upstream gone):
    Succeeded again with its result."""

    message: str
    reason: str = p.REASON_EARLY_CUTOFF


@dataclass(frozen=True)
class Changed:
    """The held job resolved to another key: resolve it as a new key; say what changed."""

    message: str


def release(obj: Mapping[str, Any], key: str, input_digests: Mapping[str, str]) -> EarlyCutoff | Changed:
    """A held job resolved again to `key`, its inputs' content digests `input_digests`.
    (An upstream's status.result.digest names its result manifest, provenance included, so
    a recomputed upstream always has a new one: what its downstream jobs use is the value,
    whose digest is the input's.)"""
    view = job(obj)
    namespace = view.meta.namespace
    upstreams = dict(from_job_inputs(obj))
    if key == view.status.cache_key and view.status.result_digest:
        same = [f"input '{name}': upstream '{_label(namespace, up)}' recomputed to the same value "
                f"{_short(input_digests.get(name))}" for name, up in upstreams.items()]
        return EarlyCutoff("; ".join(same or ["inputs unchanged"]) + "; nothing re-ran")
    changes = _changes(obj, input_digests)
    return Changed("; ".join(changes) or f"cache key changed {_short(view.status.cache_key)} -> {_short(key)}")


def _changes(obj: Mapping[str, Any], input_digests: Mapping[str, str], only_known: bool = False) -> list[str]:
    """Each input whose digest is not the one status.inputDigests says the key used
    (`only_known`: of the inputs that status names)."""
    view = job(obj)
    upstreams = dict(from_job_inputs(obj))
    before = view.status.raw.get("inputDigests")
    before = before if isinstance(before, Mapping) else {}
    changes = []
    for name, digest in input_digests.items():
        if before.get(name) == digest or (only_known and name not in before):
            continue
        source = f" (upstream '{_label(view.meta.namespace, upstreams[name])}')" if name in upstreams else ""
        changes.append(f"input '{name}'{source} changed {_short(before.get(name))} -> {_short(digest)}")
    return changes


def kept(obj: Mapping[str, Any], reason: str, message: str) -> EarlyCutoff | None:
    """A held job that fails to resolve because an input no longer exists (its upstream was
    deleted while being recomputed) keeps the result it had: results outlive jobs."""
    if held(obj) and reason == p.REASON_NOT_FOUND and job(obj).status.result_digest:
        return EarlyCutoff(f"{message}; it keeps its previous result", p.REASON_UPSTREAM_GONE)
    return None


def stale_inputs(obj: Mapping[str, Any], from_job_digests: Mapping[str, str]) -> Hold | None:
    """A Ready job whose fromJob inputs, resolved now (`from_job_digests`), are not what its
    key used: an upstream was recomputed while it ran, or while the operator was down. Hold it."""
    if not holdable(obj):
        return None
    changes = _changes(obj, from_job_digests, only_known=True)
    return Hold("; ".join(changes) + " since it was resolved") if changes else None


def needs_check(obj: Mapping[str, Any]) -> bool:
    """A Ready job with fromJob inputs whose digests its status records: check them when it settles."""
    view = job(obj)
    digests = view.status.raw.get("inputDigests")
    return holdable(obj) and not view.spec.map_over and isinstance(digests, Mapping) and \
        any(name in digests for name, _ in from_job_inputs(obj))


class EdgeIndex:
    """fromJob edges and job states of every watched job. Not thread-safe: the reconciler
    holds its lock around every call."""

    def __init__(self) -> None:
        self._inputs: dict[Ref, tuple[Edge, ...]] = {}
        self._downstream: dict[Ref, set[Ref]] = {}
        self._states: dict[Ref, JobState] = {}

    def observe(self, obj: Mapping[str, Any]) -> None:
        ref = job(obj).ref
        self._unlink(ref)
        edges = from_job_inputs(obj)
        if edges:
            self._inputs[ref] = edges
        for _, upstream in edges:
            self._downstream.setdefault(upstream, set()).add(ref)
        self._states[ref] = state_of(obj)

    def forget(self, ref: Ref) -> None:
        """A deleted job: its own edges and state go; edges naming it stay (its downstream
        jobs still name it)."""
        self._unlink(ref)
        self._states.pop(ref, None)

    def replace(self, items: list[dict[str, Any]]) -> None:
        """A full list: the jobs are exactly these."""
        self._inputs, self._downstream, self._states = {}, {}, {}
        for obj in items:
            self.observe(obj)

    def _unlink(self, ref: Ref) -> None:
        for _, upstream in self._inputs.pop(ref, ()):
            users = self._downstream.get(upstream)
            if users is not None:
                users.discard(ref)
                if not users:
                    del self._downstream[upstream]

    def downstream(self, ref: Ref) -> list[Ref]:
        return sorted(self._downstream.get(ref, ()))

    def to_hold(self, ref: Ref) -> list[Ref]:
        """The Ready jobs that use `ref`'s result, when `ref` is not Ready: to be held."""
        state = self._states.get(ref)
        if state is None or state.ready:
            return []
        return [d for d in self.downstream(ref) if (s := self._states.get(d)) is not None and s.ready]

    def hold(self, obj: Mapping[str, Any]) -> Hold | None:
        return hold(obj, self._states)
