"""Read-only typed views of Kubernetes objects as the API server sends them (plain dicts).

One way to read a ComputeJob's or a ResultCache's metadata, spec, status and assignment:
a missing section reads as empty, a missing field as the default the pydantic API models
(memoplane.api) give it, so no default is typed twice. The views copy nothing: they read
the body they wrap, which stays what writes take and return.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..api.common import duration_seconds
from ..api.computejob import CacheSpec, ComputeJobSpec, RuntimeSpec, VerifySpec
from . import protocol as p

Body = Mapping[str, Any]
Ref = tuple[str, str]   # (namespace, name)

_EMPTY: Mapping[str, Any] = {}


def _default(model: Any, field: str) -> Any:
    return model.model_fields[field].default


DEFAULT_POLICY: str = _default(CacheSpec, "policy")
DEFAULT_RESULT_CACHE: str = p.DEFAULT_RESULT_CACHE
DEFAULT_PROFILE: str = _default(RuntimeSpec, "profile")
DEFAULT_BACKOFF_LIMIT: int = _default(ComputeJobSpec, "backoff_limit")
DEFAULT_REPLICAS: int = _default(VerifySpec, "replicas")


def section(obj: Mapping[str, Any] | None, name: str) -> Mapping[str, Any]:
    """`obj[name]` as a mapping: empty when missing or null."""
    value = (obj or _EMPTY).get(name)
    return value if isinstance(value, Mapping) else _EMPTY


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True)
class Meta:
    raw: Mapping[str, Any]

    @property
    def name(self) -> str:
        return str(self.raw.get("name") or "")

    @property
    def namespace(self) -> str:
        return str(self.raw.get("namespace") or "")

    @property
    def uid(self) -> str:
        return str(self.raw.get("uid") or "")

    @property
    def generation(self) -> int:
        return _int(self.raw.get("generation"))

    @property
    def resource_version(self) -> str | None:
        rv = self.raw.get("resourceVersion")
        return None if rv is None else str(rv)

    @property
    def creation_timestamp(self) -> str:
        return str(self.raw.get("creationTimestamp") or "")

    @property
    def deleting(self) -> bool:
        return bool(self.raw.get("deletionTimestamp"))

    @property
    def labels(self) -> Mapping[str, str]:
        return section(self.raw, "labels")

    @property
    def annotations(self) -> Mapping[str, str]:
        return section(self.raw, "annotations")


def meta_of(obj: Body | None) -> Meta:
    return Meta(section(obj, "metadata"))


def ref_of(obj: Body) -> Ref:
    meta = meta_of(obj)
    return meta.namespace, meta.name


# -- ComputeJob ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    raw: Mapping[str, Any]

    @property
    def cache(self) -> Mapping[str, Any]:
        return section(self.raw, "cache")

    @property
    def policy(self) -> str:
        return str(self.cache.get("policy") or DEFAULT_POLICY)

    @property
    def result_cache(self) -> str:
        return str(self.cache.get("resultCache") or DEFAULT_RESULT_CACHE)

    @property
    def profile(self) -> str:
        return str(section(self.raw, "runtime").get("profile") or DEFAULT_PROFILE)

    @property
    def backoff_limit(self) -> int:
        return _int(self.raw.get("backoffLimit"), DEFAULT_BACKOFF_LIMIT)

    @property
    def map_over(self) -> str | None:
        over = section(self.raw, "map").get("over")
        return str(over) if over else None

    @property
    def replicas(self) -> int:
        """spec.verify.replicas: distinct nodes that must compute it and agree."""
        return _int(section(self.raw, "verify").get("replicas"), DEFAULT_REPLICAS)

    @property
    def inputs(self) -> list[Mapping[str, Any]]:
        return [i for i in self.raw.get("inputs") or () if isinstance(i, Mapping)]


@dataclass(frozen=True)
class JobStatus:
    raw: Mapping[str, Any]

    @property
    def phase(self) -> str | None:
        phase = self.raw.get("phase")
        return None if phase is None else str(phase)

    @property
    def reason(self) -> str | None:
        reason = self.raw.get("reason")
        return None if reason is None else str(reason)

    @property
    def message(self) -> str:
        return str(self.raw.get("message") or "")

    @property
    def cache_key(self) -> str | None:
        key = self.raw.get("cacheKey")
        return str(key) if key else None

    @property
    def cold_tier(self) -> p.ColdTier | None:
        """The job's store's cold tier (None: none named, or a malformed one: reads stay hot)."""
        text = self.raw.get("coldTier")
        try:
            return p.ColdTier.parse(str(text)) if text else None
        except ValueError:
            return None

    @property
    def attempts(self) -> int:
        return _int(self.raw.get("attempts"))

    @property
    def observed_generation(self) -> int | None:
        observed = self.raw.get("observedGeneration")
        return None if observed is None else _int(observed)

    @property
    def node(self) -> str | None:
        node = self.raw.get("node")
        return str(node) if node else None

    @property
    def cached(self) -> bool:
        return bool(self.raw.get("cached"))

    @property
    def result(self) -> Mapping[str, Any]:
        return section(self.raw, "result")

    @property
    def result_digest(self) -> str | None:
        digest = self.result.get("digest")
        return str(digest) if digest else None

    @property
    def compute_seconds_saved(self) -> float:
        return float(self.raw.get("computeSecondsSaved") or 0.0)

    @property
    def map(self) -> Mapping[str, Any] | None:
        value = self.raw.get("map")
        return value if isinstance(value, Mapping) else None

    def failure_summary(self) -> tuple[str, str]:
        """(reason, message) of the failure, as `failure` or the status itself tells it."""
        failure = section(self.raw, "failure")
        why = failure.get("reason") or self.raw.get("reason") or "failed"
        return str(why), str(failure.get("message") or self.raw.get("message") or "")


@dataclass(frozen=True)
class Assigned:
    """What the operator wrote in the metadata when it resolved the job (see protocol)."""

    meta: Meta

    @property
    def node(self) -> str | None:
        node = self.meta.labels.get(p.NODE_LABEL)
        return str(node) if node else None

    @property
    def job_digest(self) -> str | None:
        digest = self.meta.annotations.get(p.JOB_DIGEST_ANNOTATION)
        return str(digest) if digest else None

    @property
    def store_url(self) -> str | None:
        url = self.meta.annotations.get(p.STORE_ANNOTATION)
        return str(url) if url else None

    @property
    def present(self) -> bool:
        """Anything of an assignment is written (a label or an annotation)."""
        return any(name in self.meta.labels for name in (p.NODE_LABEL, p.KEY_LABEL)) or \
            any(name in self.meta.annotations for name in p.ASSIGNMENT_ANNOTATIONS)

    @property
    def cache_result(self) -> bool:
        """Set a ref for the result (false: the cache was at its quota when the job was resolved)."""
        return self.meta.annotations.get(p.CACHE_RESULT_ANNOTATION) != "false"

    @property
    def generation(self) -> str | None:
        generation = self.meta.annotations.get(p.JOB_GENERATION_ANNOTATION)
        return None if generation is None else str(generation)


@dataclass(frozen=True)
class JobView:
    """A ComputeJob body, read-only."""

    body: Body

    @property
    def meta(self) -> Meta:
        return meta_of(self.body)

    @property
    def spec(self) -> JobSpec:
        return JobSpec(section(self.body, "spec"))

    @property
    def status(self) -> JobStatus:
        return JobStatus(section(self.body, "status"))

    @property
    def assigned(self) -> Assigned:
        return Assigned(self.meta)

    @property
    def ref(self) -> Ref:
        return ref_of(self.body)

    @property
    def result_store_url(self) -> str | None:
        """The store holding status.result: status.result.store (the assignment's, for a
        result written before the status named its store)."""
        url = self.status.result.get("store")
        return str(url) if url else self.assigned.store_url

    @property
    def resolved_for_current_generation(self) -> bool:
        return self.assigned.generation == str(self.meta.raw.get("generation"))

    @property
    def settled(self) -> bool:
        """Final for its current spec: nothing to do until the spec changes."""
        return self.status.phase in p.TERMINAL and \
            self.status.raw.get("observedGeneration") == self.meta.raw.get("generation")


def job(obj: Body) -> JobView:
    return JobView(obj)


# -- ResultCache ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheView:
    """A ResultCache body, read-only."""

    body: Body

    @property
    def meta(self) -> Meta:
        return meta_of(self.body)

    @property
    def status(self) -> Mapping[str, Any]:
        return section(self.body, "status")

    @property
    def bucket(self) -> str:
        return str(section(section(self.body, "spec"), "store").get("bucket") or p.DEFAULT_BUCKET)

    @property
    def prefix(self) -> str:
        return str(section(section(self.body, "spec"), "store").get("prefix") or "")

    @property
    def store_url(self) -> str:
        return p.store_url(self.bucket, self.prefix)

    @property
    def cold_tier(self) -> p.ColdTier | None:
        """spec.tiers[0] (None: no tier; the API refuses a malformed one)."""
        tiers = section(self.body, "spec").get("tiers") or ()
        if not tiers or not isinstance(tiers[0], Mapping):
            return None
        tier, store = tiers[0], section(tiers[0], "store")
        return p.ColdTier(str(store.get("bucket") or ""), str(store.get("prefix") or "").strip("/"),
                          duration_seconds(str(tier.get("after"))))

    @property
    def read_only(self) -> bool:
        """spec.store.readOnly: the cache's jobs only read its location."""
        return bool(section(section(self.body, "spec"), "store").get("readOnly"))

    @property
    def revoked(self) -> list[str]:
        """spec.trust.revoked: key ids whose attestations no longer count."""
        return [str(k) for k in section(section(self.body, "spec"), "trust").get("revoked") or ()]

    @property
    def quota(self) -> Mapping[str, Any]:
        """spec.quota ({}: none)."""
        return section(section(self.body, "spec"), "quota")

    @property
    def revocations_recorded(self) -> list[str]:
        """status.revocationsRecorded: those already appended to the store's audit log."""
        return [str(k) for k in self.status.get("revocationsRecorded") or ()]


def cache(obj: Body) -> CacheView:
    return CacheView(obj)
