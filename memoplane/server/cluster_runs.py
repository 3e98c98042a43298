"""/v1/run on Kubernetes: the namespace's ResultCache is the memory, and a miss is a ComputeJob.

The caller's API key names the namespaces it may compute in (`apikey create --namespace`); the
request's `namespace` picks one when it names several. A call looks the job's key up in that
namespace's ResultCache store first (the key of a ComputeJob: the runtime digest is the one the
live agents advertise, as the operator takes it), so a hit costs no object; a miss creates a
ComputeJob there (as the API's ServiceAccount), waits for it up to the request's deadline, and
answers with its result. Every result, hit or computed, is read from the store and judged by the
cache's own trust policy (its spec.trust and the agents' keys the operator remembered): whoever
can write the store is not trusted, and neither is a status that points at a result. The embedded
server's team store namespaces are not involved: on Kubernetes a namespace shares its cache.

A hit must be cheap, so the hit path keeps between calls what it would otherwise read each time:
the caches' stores stay open (the last KEPT_STORES used, closed at shutdown), and a namespace's
ResultCache with its trust policy, and the runtime the agents advertise, are reused for KEPT_SECONDS
(a TTL, no watch): a revoked key or a new minSignatures is in force for hits at most KEPT_SECONDS
after the API server has it. A miss's result is judged by the policy read afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

from ..api.specs import SpecError, computejob_manifest
from ..cas import Hit, Store, open_store
from ..cluster import agentkeys as ak
from ..cluster import protocol as p
from ..cluster import trust as tr
from ..cluster.views import cache
from ..commands.cluster import cache_store
from ..commands.run import report_json
from ..embedded import hit_report
from ..jobs import CommandCode, Job, JsonInput, Policy
from ..trust import TrustPolicy, judge_stored, trusted_hit
from ..trust.local import refused_note
from .auth import Caller
from .errors import ApiError
from .objects import TEAM_LABEL, label_value
from .placement import Placement

MANAGED_BY = {"app.kubernetes.io/managed-by": "memoplane-api"}
KEY_ANNOTATION = f"{p.GROUP}/api-key"   # the API key whose /v1/run made the job
RESULT_CACHE = "default"                # the cache a job of /v1/run uses (spec.cache.resultCache's default)
SCHEDULING_SLACK_S = 60.0   # waited beyond the job's own timeout: the operator's and an agent's turn
POLL_S = 0.2
KEPT_SECONDS = 2.0   # how long a hit reuses a ResultCache, its trust policy and the agents' runtime (the README says)
KEPT_STORES = 16     # the caches' stores a hit keeps open
KEPT_ENTRIES = 1024  # namespaces and profiles whose reads are kept (the oldest dropped)


class Recent:
    """Values read for a key, each reused for `seconds` from just before it was read (so no value is
    used longer than that after the read began). None (nothing there yet: no cache, no agent) and a read
    that raised are not kept: what appears is seen by the next call."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self._clock = seconds, clock
        self._values: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, read: Callable[[], Any]) -> Any:
        began = self._clock()
        with self._lock:
            kept = self._values.get(key)
            if kept is not None and began - kept[0] < self.seconds:
                return kept[1]
        value = read()
        if value is None:
            return None
        with self._lock:
            self._values[key] = (began, value)
            self._values.move_to_end(key)
            while len(self._values) > KEPT_ENTRIES:
                self._values.popitem(last=False)
        return value


class OpenStores:
    """The caches' stores, each opened once and kept while among the last `size` used; one pushed out is
    closed once no call reads it, all of them at close()."""

    def __init__(self, size: int = KEPT_STORES, opener: Callable[[dict[str, Any]], Store] = cache_store) -> None:
        self.size, self._opener = size, opener
        self._open: OrderedDict[Hashable, Store] = OrderedDict()
        self._readers: Counter[Store] = Counter()
        self._retired: list[Store] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrowed(self, rc: Mapping[str, Any]) -> Iterator[Store]:
        """The ResultCache's store (with its cold tier), open for as long as the block runs."""
        view = cache(rc)
        tier = view.cold_tier
        where = (view.store_url, (tier.url, tier.after) if tier is not None else None)
        with self._lock:
            store = self._open.get(where)
            if store is None:
                store = self._open[where] = self._opener(dict(rc))
                while len(self._open) > self.size:
                    self._retired.append(self._open.popitem(last=False)[1])
            self._open.move_to_end(where)
            self._readers[store] += 1
        try:
            yield store
        finally:
            self._put_back(store)

    def _put_back(self, store: Store) -> None:
        with self._lock:
            self._readers[store] -= 1
            unread = [s for s in self._retired if self._readers[s] <= 0]
            self._retired = [s for s in self._retired if s not in unread]
            for s in unread:
                del self._readers[s]
        for s in unread:
            s.close()

    def close(self) -> None:
        with self._lock:
            stores, self._retired = [*self._open.values(), *self._retired], []
            self._open.clear()
        for store in stores:
            store.close()


class ClusterRuns:
    """/v1/run's computations in the callers' namespaces (the agents' Leases and remembered keys are in
    the placement's namespace)."""

    def __init__(self, placement: Placement) -> None:
        self.kube, self.placement = placement.kube, placement
        self.stores = OpenStores()
        self._caches = Recent(KEPT_SECONDS)     # namespace -> (its ResultCache, its trust policy)
        self._runtimes = Recent(KEPT_SECONDS)   # profile -> the runtime the live agents advertise

    def close(self) -> None:
        self.stores.close()

    async def run(self, job: Job, policy: Policy, caller: Caller, asked: str | None) -> dict[str, Any]:
        """/v1/run's answer: a trusted hit of the namespace's cache, else its ComputeJob's result. Calls to
        the API server and the store go to threads; the wait for the job does not hold one."""
        namespace = namespace_for(caller, asked)
        if policy == "Bypass":
            raise ApiError(400, "policy Bypass is not supported yet for /v1/run on Kubernetes: an agent does not "
                           "attest a Bypass result, so the API cannot verify what it would answer",
                           'use "Refresh" to recompute and replace the stored result')
        started = time.perf_counter()
        if policy == "Use":
            hit = await asyncio.to_thread(self._hit, namespace, job, started)
            if hit is not None:
                return hit
        name = await asyncio.to_thread(self._create, job, policy, caller, namespace)
        status = await self._settled(namespace, name, job.limits.timeout_s + SCHEDULING_SLACK_S)
        return await asyncio.to_thread(self._computed, namespace, name, status, started)

    def _hit(self, namespace: str, job: Job, started: float) -> dict[str, Any] | None:
        """The answer of a trusted hit of the job's key (with the runtime the live agents advertise) in the
        namespace's cache; None: a miss."""
        runtime = self._runtimes.get(job.profile, lambda: self.placement.runtime(job.profile))
        kept = self._caches.get(namespace, lambda: self._cache_and_policy(namespace))
        if runtime is None or kept is None:   # no agent (the job will wait); the operator makes the cache
            return None
        rc, policy = kept
        with self.stores.borrowed(rc) as store:
            found = trusted_hit(store, dataclasses.replace(job, runtime=runtime).key, policy)
            if found.hit is None:
                return None
            return _answer(store, found.hit, started, cached=True, computejob=None)

    def _cache_and_policy(self, namespace: str) -> tuple[dict[str, Any], TrustPolicy] | None:
        rc = self.kube.get(p.RESULTCACHES, namespace, RESULT_CACHE)
        return None if rc is None else (rc, self._policy(rc))

    def _create(self, job: Job, policy: Policy, caller: Caller, namespace: str) -> str:
        """A new ComputeJob of `job` in `namespace`, made by the caller's team and key: its name."""
        try:
            manifest = computejob_manifest("placeholder", namespace, job_spec(job, policy),
                                           labels={**MANAGED_BY, TEAM_LABEL: label_value(caller.team)})
        except SpecError as e:
            raise ApiError(400, str(e)) from None
        meta = manifest["metadata"]
        del meta["name"]
        meta["generateName"] = "run-"
        meta["annotations"] = {KEY_ANNOTATION: caller.key_id}
        created = self.kube.create(p.COMPUTEJOBS, namespace, manifest)
        assert created is not None   # a generated name never exists
        return str(created["metadata"]["name"])

    async def _settled(self, namespace: str, name: str, seconds: float) -> dict[str, Any]:
        """The job's status once it settled for its current spec (504 after `seconds`: it keeps running)."""
        deadline = time.monotonic() + seconds
        while True:
            obj = await asyncio.to_thread(self.kube.get, p.COMPUTEJOBS, namespace, name)
            if obj is None:
                raise ApiError(409, f"ComputeJob {namespace}/{name} was deleted before it settled", "call again")
            status = obj.get("status") or {}
            if status.get("phase") in p.TERMINAL and \
                    status.get("observedGeneration") == obj["metadata"].get("generation"):
                return dict(status)
            if time.monotonic() > deadline:
                raise ApiError(504, f"ComputeJob {namespace}/{name} is still {status.get('phase') or 'Pending'} "
                               f"after {seconds:.0f}s", f"call /v1/run again later (a hit once it succeeds); "
                               f"kubectl describe cjob {name} -n {namespace} says why it waits")
            await asyncio.sleep(POLL_S)

    def _computed(self, namespace: str, name: str, status: Mapping[str, Any], started: float) -> dict[str, Any]:
        if status.get("phase") == p.FAILED:
            failure = status.get("failure") or {}
            raise ApiError(422, f"ComputeJob {namespace}/{name} failed ({failure.get('reason', 'Failed')}): "
                           f"{failure.get('message') or status.get('message', '')} (nothing was cached)")
        store, found = self._verified(namespace, name, status)
        with store:
            return _answer(store, found, started, cached=bool(status.get("cached")), computejob=f"{namespace}/{name}")

    def _verified(self, namespace: str, name: str, status: Mapping[str, Any]) -> tuple[Store, Hit]:
        """The job's result as its status names it, read from the store and judged by the cache's policy."""
        result = status.get("result") or {}
        key, digest, url = status.get("cacheKey"), result.get("digest"), result.get("store")
        if not (isinstance(key, str) and isinstance(digest, str) and isinstance(url, str)):
            raise ApiError(502, f"ComputeJob {namespace}/{name} succeeded without a stored result in its status")
        rc = self.kube.get(p.RESULTCACHES, namespace, RESULT_CACHE)
        if rc is None:
            raise ApiError(502, f"ComputeJob {namespace}/{name}'s ResultCache is gone", "call again")
        policy = self._policy(rc)
        with contextlib.ExitStack() as unless_kept:
            # A hit the operator served from a cache shared with this namespace is in that cache's store.
            store = unless_kept.enter_context(cache_store(rc) if url == cache(rc).store_url else open_store(url))
            verdict = judge_stored(store, policy, key, digest, ())
            if not verdict.trusted:
                raise ApiError(502, f"ComputeJob {namespace}/{name}'s result {digest[:19]} is not trusted by "
                               f"ResultCache {namespace}/{cache(rc).meta.name}: {refused_note(verdict)}")
            found = Hit(key, digest, store.get_result(digest))
            unless_kept.pop_all()
            return store, found

    def _policy(self, rc: Mapping[str, Any]) -> TrustPolicy:
        """The cache's trust policy as the operator builds it, with the agents' keys it remembered."""
        view = cache(rc)
        objects = {source: self._key_object(view.meta.namespace, source) for source in tr.key_sources(rc)}
        remembered, _ = ak.remembered(self.kube.get_config_map(self.placement.namespace, p.AGENT_KEYS_CONFIG_MAP))
        agents = ak.ClusterKeys(None, tuple(remembered[k] for k in sorted(remembered)))
        policy = tr.effective_policy(rc, objects, agents)
        if isinstance(policy, tr.Unusable):
            raise ApiError(503, f"ResultCache {view.meta.namespace}/{view.meta.name}: {policy.message}")
        return policy

    def _key_object(self, namespace: str, source: tr.KeySource) -> dict[str, Any] | None:
        if source.kind == tr.SECRET:
            return self.kube.get_secret(namespace, source.name)
        return self.kube.get_config_map(namespace, source.name)


def namespace_for(caller: Caller, asked: str | None) -> str:
    """The namespace the caller's job goes to: the one asked for, among its key's; refused otherwise."""
    if not caller.namespaces:
        who = "a caller without an API key" if caller.key_id == Caller().key_id else f"API key {caller.key_id}"
        raise ApiError(403, f"{who} has no namespace: on Kubernetes /v1/run computes as a "
                       "ComputeJob in a namespace the key is scoped to",
                       "use a key made with `memoplane apikey create --verb run --namespace NS`")
    if asked is None:
        if len(caller.namespaces) == 1:
            return caller.namespaces[0]
        raise ApiError(400, f"API key {caller.key_id} is scoped to namespaces {', '.join(caller.namespaces)}: "
                       "the request's namespace must say which", f'send "namespace": "{caller.namespaces[0]}"')
    if asked not in caller.namespaces:
        raise ApiError(403, f"API key {caller.key_id} is not scoped to namespace {asked[:63]!r} (only "
                       f"{', '.join(caller.namespaces)})", f"use a key made with --namespace {asked[:63]}")
    return asked


def job_spec(job: Job, policy: Policy) -> dict[str, Any]:
    """The ComputeJob spec whose key is `job`'s (code, JSON inputs, env, salt; the runtime the agents
    advertise for its profile), with its timeout."""
    code: dict[str, Any]
    if isinstance(job.code, CommandCode):
        code = {"command": list(job.code.argv)}
    else:
        code = {"python": {"source": job.code.source, "entrypoint": job.code.entrypoint}}
    inputs = [{"name": name, "value": value.value} for name, value in job.inputs.items()
              if isinstance(value, JsonInput)]
    assert len(inputs) == len(job.inputs), "/v1/run's inputs are JSON values"
    spec = {**code, "inputs": inputs, "runtime": {"profile": job.profile},
            "cache": {"policy": policy, "version": job.salt},
            "resources": {"timeoutSeconds": max(1, math.ceil(job.limits.timeout_s))}}
    if job.env:
        spec["env"] = dict(job.env)
    return spec


def _answer(store: Store, hit: Hit, started: float, *, cached: bool, computejob: str | None) -> dict[str, Any]:
    report = hit_report(store, hit, started, cached=cached, explain=[], notes=[])
    return {**report_json(report, store), "shared_by": None, "computejob": computejob}
