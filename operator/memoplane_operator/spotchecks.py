"""trust.reexecute on the reconciler (decisions: memoplane.cluster.spotcheck).

After a hit is served from a cache with `reexecute`, `spot_check` may start a re-execution of
it on a node that does not attest the served result (a replica ComputeJob, `<job>-check`).
When that check settles, `judge` compares: agreement adds the checker's attestation to the ref
and lengthens the attesting nodes' streaks; a disagreement withdraws the ref (the result is no
longer served), marks the served job Disputed with what differs, posts an Event naming the
nodes, appends an audit record of kind dispute, and sends every other plain job still showing
the result back to resolution (the next resync pass recomputes it). A check that failed changes
nothing. The verdict is written on the check (an annotation), so each is judged once.

A spec.map element served from the cache (mapper.py) is drawn the same way; its check is the
element's job (`<map>-<key digest>-check`, owned by the map). A dispute marks the map Disputed if
its result lists the element, and sends every other map listing it back to resolution.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from memoplane.cas import Hit, Store
from memoplane.cas import audit as audit_log
from memoplane.cas.digests import b3
from memoplane.cluster import decide, mapping
from memoplane.cluster import protocol as p
from memoplane.cluster import replicas as rp
from memoplane.cluster import spotcheck as sc
from memoplane.cluster import status as st
from memoplane.cluster.views import job
from memoplane.errors import MemoplaneError
from memoplane.trust import TrustPolicy, judge

from .caches import Target
from .context import Conflict, Context
from .replicas import outputs_of

log = logging.getLogger("memoplane.operator.spotchecks")


def spot_check(ctx: Context, served: Mapping[str, Any], hit: Hit, target: Target, name: str | None = None) -> None:
    """`served` was just answered with `hit`: re-execute it elsewhere if its cache asks and the draw says so
    (not a hit from another location than the job writes to: the check is judged where it writes)."""
    wanted = ctx.caches.reexecute_for(served)
    if wanted is None or target.lookup_url != target.url:
        return
    store, policy = target.store, target.policy
    try:
        _maybe_start(ctx, served, hit, store, policy, wanted, name)
    except (MemoplaneError, ApiException) as exc:  # the hit stands: it is attested under the policy
        log.warning("%s: spot check of %s not started: %s", job(served).meta.name, hit.digest[:15], exc)


def spot_check_element(ctx: Context, parent: Mapping[str, Any], element: Any, hit: Hit, target: Target) -> None:
    """A map parent (mapper.py) was served `hit` for `element`: drawn and checked as a plain hit is,
    by a check of its own (the element's spec, owned by the parent, one per element key). A dispute
    withdraws the element's result and the parent is not Ready on it (`_disputed`)."""
    served = {**parent, "spec": mapping.child_spec(parent, element)}
    spot_check(ctx, served, hit, target, sc.element_check_name(job(parent).meta.name, hit.key))


def _maybe_start(ctx: Context, served: Mapping[str, Any], hit: Hit, store: Store, policy: TrustPolicy,
                 wanted: sc.Reexecute, name: str | None) -> None:
    view, runtime = job(served), hit.result.provenance.runtime
    nodes = rp.attesting_nodes(policy, hit.key, hit.digest, store.attestations(hit.key, hit.digest))
    if not set(rp.capable_nodes(ctx.fleet.nodes, view.spec.profile, runtime)) - nodes:
        return  # every node that could re-execute it attests it already
    pairs = [sc.pair(node, runtime) for node in nodes]
    if not sc.should_check(wanted, ctx.streaks.of(store), pairs, sc.seed_of(served, hit.key)):
        return
    manifest = sc.check_manifest(served, hit.digest, nodes, name)
    if ctx.kube.create(p.COMPUTEJOBS, view.meta.namespace, manifest) is None:
        return  # a check of this job exists (an earlier generation's): one at a time
    ctx.metrics.spot_checks.labels("started").inc()
    ctx.event(served, sc.REASON_SPOT_CHECK, f"re-executing on a node other than {', '.join(sorted(nodes)) or '?'} "
                                            f"to check {hit.digest[:15]}… ({manifest['metadata']['name']})")


# -- judging a settled check --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Checked:
    check: Mapping[str, Any]
    served: dict[str, Any] | None
    store: Store
    policy: TrustPolicy
    key: str
    digest: str            # the served result
    runtime: str | None
    original: list[str]    # the nodes that attest it
    checker: str

    @property
    def pairs(self) -> list[str]:
        return [sc.pair(node, self.runtime) for node in self.original] if self.runtime else []


def judge_check(ctx: Context, check: dict[str, Any]) -> None:
    view = job(check)
    digest, namespace = str(sc.checked_digest(check)), view.meta.namespace
    found = ctx.caches.store_for(check)
    if isinstance(found, decide.Wait):
        log.warning("%s/%s: spot check not judged: %s", namespace, view.meta.name, found.message)
        return
    runtime, expected = _normalised(found.store, digest)
    name = sc.served_name(check)
    checked = _Checked(check, ctx.kube.get(p.COMPUTEJOBS, namespace, name) if name else None, found.store,
                       found.policy, str(view.status.cache_key or ""), digest, runtime, sorted(sc.avoided(check)),
                       sc.checker(check))
    verdict = sc.verdict(check, expected) if checked.key else sc.FAILED
    if verdict == sc.AGREED:
        _agreed(ctx, checked)
    elif verdict == sc.DISPUTED:
        _disputed(ctx, checked, str(view.status.result_digest))
    else:
        _failed(ctx, checked)
    ctx.metrics.spot_checks.labels(verdict).inc()
    ctx.patch_meta(check, annotations={sc.JUDGED_ANNOTATION: verdict})


def _normalised(store: Store, digest: str) -> tuple[str | None, str | None]:
    """(runtime, digest as a replica stores it) of the served result; (None, None) if it cannot be read."""
    try:
        result = store.get_result(digest)
    except MemoplaneError:
        return None, None
    return result.provenance.runtime, rp.replica_result(result).digest


def _agreed(ctx: Context, c: _Checked) -> None:
    one = dataclasses.replace(c.policy, min_signatures=1)
    mine = [b3(e) for e in c.store.attestations(c.key, c.digest)
            if any(a.builder == c.checker for a in judge(one, c.key, c.digest, [e]).attested)]
    if mine and c.store.read_ref(c.key) == c.digest:  # agreement grows with use
        c.store.set_ref(c.key, c.digest, attestations=mine)
    ctx.streaks.update(c.store, c.pairs, sc.agreed)
    if c.served is not None:
        vouch = "now attested by " + ", ".join([*c.original, c.checker]) if mine else "its attestation is not trusted"
        ctx.event(c.served, sc.REASON_AGREED, f"re-executed on {c.checker}: the same result {c.digest[:15]}…; {vouch}")


def _failed(ctx: Context, c: _Checked) -> None:
    why, detail = job(c.check).status.failure_summary()
    if c.served is not None:
        ctx.event(c.served, sc.REASON_FAILED, f"the spot check {job(c.check).meta.name} did not finish "
                                              f"({why}{': ' + detail if detail else ''}): nothing was judged",
                  warning=True)


def _disputed(ctx: Context, c: _Checked, other: str) -> None:
    lines = _difference(c.store, c.digest, other, (", ".join(c.original) or "served", c.checker))
    message = dispute_message(c, other, lines)
    served = job(c.served).meta.name if c.served is not None else None
    outcomes: list[dict[str, Any]] = [{"job": served, "node": ", ".join(c.original) or None, "digest": c.digest},
                                      {"job": job(c.check).meta.name, "node": c.checker, "digest": other}]
    target = c.served if c.served is not None and (sc.still_served(c.served, c.digest) or
                                                   _map_shows(c.store, c.served, c.key)) else None
    if target is not None:
        view = job(target)
        key = str(view.status.cache_key) if mapping.is_map(target) else c.key   # a map keeps its own key
        target = ctx.patch(target, st.disputed(view.status.raw, view.meta.generation, key, outcomes,
                                               "; ".join(lines), message, datetime.now(UTC), rp.REASON_DISPUTED))
    c.store.withdraw_ref(c.key, c.digest, f"disputed by a spot check on {c.checker}")
    ctx.maps.clear()   # map parents remember element results (mapper.py): they look their keys up again
    c.store.audit(audit_log.DISPUTE, namespace=job(c.check).meta.namespace, job=served, key=c.key,
                  result=c.digest, nodes=c.original, checker=c.checker, other=other, difference="; ".join(lines))
    ctx.streaks.update(c.store, c.pairs, sc.disputed)
    ctx.event(target or c.served or c.check, rp.REASON_DISPUTED, message, warning=True)
    log.warning("%s: %s", job(c.check).meta.namespace, message)
    _resolve_again(ctx, c)


def _map_shows(store: Store, served: Mapping[str, Any], key: str, unreadable: bool = True) -> bool:
    """`served` is a map parent whose result lists the element of `key` (provenance.inputs: each
    element's key). The map the check was made for counts as showing it when its result cannot be
    read (never Ready unverified); another map (`unreadable` False) whose result is not in this
    store does not (it was assembled from another cache)."""
    view = job(served)
    if not mapping.is_map(served) or not view.settled or view.status.phase != p.SUCCEEDED:
        return False
    try:
        return key in store.get_result(str(view.status.result_digest)).provenance.inputs.values()
    except (MemoplaneError, ValueError):
        return unreadable


def dispute_message(c: _Checked, other: str, lines: Sequence[str]) -> str:
    what = "; ".join(lines) if lines else "the results differ"
    element = f"element key {c.key[:15]}…: " if c.served is not None and mapping.is_map(c.served) else ""
    return (f"spot check: {element}{c.checker} ({job(c.check).meta.name}) re-executed the result served from "
            f"{', '.join(c.original) or 'the cache'} and got another: {what}; digests {c.digest} (served) and "
            f"{other} ({c.checker}); the result is no longer served")


def _difference(store: Store, served: str, other: str, names: tuple[str, str]) -> list[str]:
    try:
        mine = outputs_of(store, served)
        mine = dataclasses.replace(mine, meta={k: v for k, v in mine.meta.items() if k != "isolation"})
        return rp.difference(mine, outputs_of(store, other), names)
    except (MemoplaneError, ValueError) as exc:
        return [f"(the results could not be compared: {exc})"]


def _resolve_again(ctx: Context, c: _Checked) -> None:
    """Every other plain job still showing the disputed result, and every other map parent whose
    result lists it, resolves again (the next resync pass; a map looks its elements up again)."""
    namespace = job(c.check).meta.namespace
    listed, _ = ctx.kube.list(p.COMPUTEJOBS, namespace)
    served = job(c.served).meta.name if c.served is not None else None
    for other in listed:
        view = job(other)
        shows = _map_shows(c.store, other, c.key, unreadable=False) if mapping.is_map(other) \
            else sc.still_served(other, c.digest)
        if view.meta.name == served or not shows or rp.is_replica(other) or rp.is_replicated(other):
            continue
        try:
            ctx.patch(other, st.pending(view.status.raw, view.meta.generation, rp.REASON_DISPUTED,
                                        f"the result {c.digest[:15]}… it was given is disputed by a spot check on "
                                        f"{c.checker}: resolving again", datetime.now(UTC)))
        except Conflict:
            continue  # it changed meanwhile: it is decided on its own
