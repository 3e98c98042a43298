"""Admitting a resolved ComputeJob: serve it from the cache, let it wait for the job
computing the same key (single flight, memoplane.cluster.flight), or schedule it to a node
(memoplane.cluster.schedule); and reschedule a started job whose node was lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from memoplane.cluster import flight, schedule
from memoplane.cluster import protocol as p
from memoplane.cluster import status as st
from memoplane.cluster.index import key_topic
from memoplane.cluster.retry import retry_at

from .hits import served, verified_hit

if TYPE_CHECKING:
    from .reconciler import Reconciler

log = logging.getLogger("memoplane.operator")


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def admit(r: Reconciler, obj: dict[str, Any], looked_up: bool = False) -> None:
    """Serve from the cache, wait for the job computing the same key, or schedule.
    `looked_up`: this pass already found the key missing from the cache."""
    meta, status = _meta(obj), obj.get("status") or {}
    namespace, name = str(meta["namespace"]), str(meta["name"])
    generation = int(meta.get("generation") or 0)
    now = datetime.now(UTC)
    not_before = retry_at(status, base=r.cfg.backoff_base)
    if not_before is not None and now < not_before:
        return  # backing off; a later resync schedules it
    key = str(status["cacheKey"])
    url = str((meta.get("annotations") or {})[p.STORE_ANNOTATION])
    store = r.stores.by_url(url)
    cache = flight.cache_of(obj)
    policy = flight.policy_of(obj)
    memo = r.memo
    if policy == "Use" and not looked_up and not (memo and (url, key) in memo.misses):
        # A stored result is served whoever else computes the key: no flight to consult.
        looked = time.monotonic()
        hit = verified_hit(store, key)
        if hit is not None:
            ms = int((time.monotonic() - looked) * 1000)
            done = r.patch(obj, st.cache_hit(status, generation, hit.digest, hit.result, ms, now))
            served(r, done, hit)
            return
        if memo:
            memo.misses.add((url, key))
    group = memo.groups.get((namespace, key)) if memo else None
    if group is None:
        group, _ = r.kube.list(p.COMPUTEJOBS, namespace, f"{p.KEY_LABEL}={p.key_label(key)}")
        if memo:
            memo.groups[(namespace, key)] = group
    lead = flight.leader(obj, group)
    if _meta(lead).get("uid") != meta.get("uid"):
        r.wait_on(obj, [key_topic(namespace, key)])  # woken when the leader settles
        r.wait(obj, p.REASON_IN_FLIGHT, f"waiting for ComputeJob '{_meta(lead).get('name')}', "
                                        "which computes the same key")
        return
    job = r.manifests.job_of(obj, store)
    current = schedule.runtime_for(r.nodes, job.profile)
    if current is not None and current != job.runtime:
        # The agents now run another runtime for this profile: the key must be derived again.
        r.patch(obj, st.pending(status, generation, p.REASON_RUNTIME_MISMATCH,
                                f"agents now run profile '{job.profile}' as {current[:15]}…", now))
        return
    previous = (meta.get("labels") or {}).get(p.NODE_LABEL)
    node = schedule.pick_node(r.nodes, job.profile, str(job.runtime), r.load, avoid=previous)
    if node is None:
        r.wait(obj, p.REASON_NO_NODE, f"no live agent serves profile '{job.profile}' at runtime "
                                      f"{str(job.runtime)[:15]}…")
        return
    # Re-put the manifest (refreshes its age): a job that waited long must not find it collected.
    r.manifests.refresh(store, obj, job)
    attempts = int(status.get("attempts") or 0) + 1
    if memo:
        memo.groups.pop((namespace, key), None)  # this key's flight has a started job now
    labelled = r.patch_meta(obj, labels={p.NODE_LABEL: node})
    reason = p.REASON_SCHEDULED if attempts == 1 else "Rescheduled"
    message = f"assigned to node {node} (attempt {attempts})"
    done = r.patch(labelled, st.scheduled(status, generation, node, attempts, now, reason=reason, message=message))
    r.load[node] += 1
    r.metrics.cache_misses.inc()
    r.caches.count_miss(namespace, cache)
    r.kube.event(done, p.REASON_SCHEDULED, message)
    log.info("%s/%s: key %s -> node %s (attempt %d)", namespace, name, key[3:15], node, attempts)


def check_node(r: Reconciler, obj: dict[str, Any]) -> None:
    """A Scheduled or Running job whose node lost its lease: reschedule it, or fail it past
    its backoff limit."""
    lost = schedule.lost(obj, r.nodes)
    if lost is None:
        return
    generation = int(_meta(obj).get("generation") or 0)
    now = datetime.now(UTC)
    r.metrics.reassigned.inc()
    if lost.exhausted:
        r.fail(obj, p.REASON_BACKOFF_LIMIT, f"{lost.what} during attempt {lost.attempts}; "
                                            f"backoffLimit {lost.backoff_limit} reached")
        return
    updated = r.patch(obj, st.pending(obj.get("status") or {}, generation, p.REASON_REASSIGNED,
                                      f"{lost.what} (attempt {lost.attempts}): rescheduling", now))
    r.kube.event(updated, p.REASON_REASSIGNED, f"{lost.what}: rescheduling", warning=True)
    admit(r, updated)
