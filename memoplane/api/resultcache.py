"""ResultCache: where results live, how long, who may read and write them."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator, model_validator

from ..trust.keys import KEYID_PATTERN
from .common import (
    AGE_COLUMN,
    API_VERSION,
    BucketName,
    Conditions,
    Duration,
    K8sModel,
    KindInfo,
    Name,
    NamespaceName,
    ObjectMetaLite,
    PrinterColumn,
    Quantity,
    StatusModel,
    cel,
    validations,
)

MAX_NAMESPACES = 256


NAMESPACE_SET_MESSAGE = "set exactly one of namespaces or namespaceSelector"
QUOTA_EMPTY_MESSAGE = "quota bounds nothing: set quota.maxBytes, quota.maxEntries or both"


class StoreSpec(K8sModel):
    """Bucket and key prefix; endpoint and credentials default to the chart's."""

    bucket: BucketName
    prefix: str = Field(default="", max_length=512, description=(
        "Key prefix in the bucket. In the default bucket a namespace owns <namespace>/ and below; elsewhere the "
        "namespace of the oldest cache there owns the location. Another namespace's location is read and "
        "written only as its owner's spec.sharing grants."))
    read_only: bool = Field(default=False, description=(
        "Only read this location: the jobs' results are written to their namespace's home "
        "(bucket memoplane, prefix <namespace>/) instead (default false)."))


class RetentionSpec(K8sModel):
    """Entries are evicted by last use (a write or a hit), never by write time; the operator's sweep
    then frees their data. Roots (results of ComputeJobs that exist, GMemSeed overlays) and anything
    written or used within the grace period (MEMOPLANE_RETENTION_GRACE_SECONDS) are kept."""

    max_age: Duration | None = Field(default=None, description="Evict entries not used (written or hit) for "
                                                               "this long: a Go duration, e.g. 720h.")
    max_bytes: Quantity | None = Field(default=None, description="Evict the least recently used entries until "
                                                                 "the logical bytes of the rest fit, e.g. 50Gi.")


class QuotaSpec(K8sModel):
    """An upper bound on what the cache keeps, as its status counts it (status.entries, status.logicalBytes).
    At the limit nothing is evicted: jobs through the cache still compute and succeed, but their results
    are not cached (a Warning Event QuotaExceeded on the job says so); hits are still served."""

    model_config = ConfigDict(json_schema_extra=validations(
        cel("has(self.maxBytes) || has(self.maxEntries)", QUOTA_EMPTY_MESSAGE)))

    max_bytes: Quantity | None = Field(default=None, description=(
        "New results are not cached once the entries' logical bytes (status.logicalBytes) reach this, e.g. 50Gi."))
    max_entries: int | None = Field(default=None, ge=1, description=(
        "New results are not cached once the cache holds this many entries (status.entries)."))

    @model_validator(mode="after")
    def _bounds_something(self) -> QuotaSpec:
        if self.max_bytes is None and self.max_entries is None:
            raise ValueError(QUOTA_EMPTY_MESSAGE)
        return self


class SelectorRequirement(K8sModel):
    key: str = Field(min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = None


class LabelSelector(K8sModel):
    match_labels: dict[str, str] | None = None
    match_expressions: list[SelectorRequirement] | None = None


class _NamespaceSet(K8sModel):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("has(self.namespaces) != has(self.namespaceSelector)", NAMESPACE_SET_MESSAGE)
        )
    )

    namespaces: list[NamespaceName] | None = Field(
        default=None, max_length=MAX_NAMESPACES, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    namespace_selector: LabelSelector | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> _NamespaceSet:
        if (self.namespaces is None) == (self.namespace_selector is None):
            raise ValueError(NAMESPACE_SET_MESSAGE)
        if self.namespaces is not None and len(set(self.namespaces)) != len(self.namespaces):
            raise ValueError("a namespace is listed twice in namespaces")
        return self


class Readers(_NamespaceSet):
    """Namespaces whose jobs may read this cache's location (and below): their hits come from it."""


class Writers(_NamespaceSet):
    """Namespaces whose jobs may write results into this cache's location (and below)."""


class SharingSpec(K8sModel):
    """Other namespaces allowed to use this cache's location, by name or by a selector over Namespace labels
    (label changes count from the operator's next full resync). A namespace not listed is never served from
    it and never writes into it."""

    readers: Readers | None = Field(default=None, description="Namespaces served hits from this location.")
    writers: Writers | None = Field(default=None, description="Namespaces whose results are stored here "
                                                              "(a writer that is not a reader only adds).")


class SecretRef(K8sModel):
    name: Name


class ConfigMapRef(K8sModel):
    name: Name


MAX_TRUSTED_KEYS = 64
MAX_REVOKED = 256
MAX_MIN_SIGNATURES = 16
KEY_SOURCE_MESSAGE = "set exactly one of publicKey, secretRef or configMapRef"
NO_KEYS_MESSAGE = "trusts no key: add trust.keys or set trust.clusterAgents: true"
TIERS_MESSAGE = "more than one tier is not supported yet: keep one ({after, store})"
TIER_READ_ONLY_MESSAGE = "a tier is written by demotion: remove store.readOnly"
TIER_OVERLAP_MESSAGE = ("the tier's store overlaps spec.store (one location contains the other): "
                        "give the tier another bucket or a prefix outside spec.store.prefix")
SIGNING_MESSAGE = ("signing was replaced by trust: move the key to trust.keys (publicKey, secretRef or "
                   "configMapRef holding <keyid>.pub entries)")

# The same grammar without Python's group names (the schema's regex dialect is Go's).
KeyId = Annotated[str, Field(pattern=re.sub(r"\?P<\w+>", "", KEYID_PATTERN.pattern), min_length=3, max_length=73)]
# A field the API names only to refuse it with a message (kept in the schema, so that the
# API server does not silently prune it).
Refused = Annotated[Any, WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})]


class PublicKeySpec(K8sModel):
    """An Ed25519 public key: PEM (SubjectPublicKeyInfo) or the 32 raw bytes in base64."""

    key_id: KeyId = Field(description="The key's name and epoch, e.g. team-ml-1.")
    key: str = Field(min_length=1, max_length=4096)


class TrustedKey(K8sModel):
    """One trusted public key, or a Secret/ConfigMap in the cache's namespace whose entries
    `<keyid>.pub` hold PEM public keys."""

    model_config = ConfigDict(json_schema_extra=validations(cel(
        "[has(self.publicKey), has(self.secretRef), has(self.configMapRef)].filter(x, x).size() == 1",
        KEY_SOURCE_MESSAGE)))

    public_key: PublicKeySpec | None = None
    secret_ref: SecretRef | None = None
    config_map_ref: ConfigMapRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> TrustedKey:
        if [self.public_key, self.secret_ref, self.config_map_ref].count(None) != 2:
            raise ValueError(KEY_SOURCE_MESSAGE)
        return self


class ReexecuteSpec(K8sModel):
    """Re-execute a fraction of this cache's hits on another node than those that attest the served
    result: agreement adds the node's attestation to the ref, a disagreement disputes the result
    (no longer served; the served job is Disputed)."""

    fraction: float = Field(gt=0.0, le=1.0, description="The share of hits re-executed (0 < fraction <= 1).")
    adaptive: bool = Field(default=True, description="Re-check a (node, runtime) pair less often while its "
                                                     "results keep agreeing, as BOINC's adaptive replication "
                                                     "(default true).")


class TrustSpec(K8sModel):
    """Whose attestations make a stored result a hit: at least minSignatures distinct trusted,
    unrevoked keys must attest the same result for the same key; anything else is recomputed."""

    model_config = ConfigDict(json_schema_extra=validations(
        cel("!has(self.clusterAgents) || self.clusterAgents || (has(self.keys) && size(self.keys) > 0)",
            NO_KEYS_MESSAGE)))

    keys: list[TrustedKey] | None = Field(default=None, max_length=MAX_TRUSTED_KEYS)
    revoked: list[KeyId] | None = Field(default=None, max_length=MAX_REVOKED,
                                        description="Key ids (name and epoch) whose attestations no longer count.",
                                        json_schema_extra={"x-kubernetes-list-type": "set"})
    min_signatures: int = Field(default=1, ge=1, le=MAX_MIN_SIGNATURES,
                                description="Distinct trusted signers a result needs (default 1).")
    cluster_agents: bool = Field(default=True, description="Trust the keys of this cluster's agents "
                                                           "(default true).")
    reexecute: ReexecuteSpec | None = Field(default=None, description="Spot checks: re-execute a fraction of "
                                                                      "hits on another node.")

    @model_validator(mode="after")
    def _trusts_someone(self) -> TrustSpec:
        if not self.cluster_agents and not self.keys:
            raise ValueError(NO_KEYS_MESSAGE)
        return self


class TierSpec(K8sModel):
    """A colder, cheaper location behind spec.store: content not read for `after` moves there (pack
    files; manifests, results, refs and indexes stay in spec.store); a hit on moved content reads it
    back through spec.store (verified as every read) and moves it back. The operator's maintenance
    moves it. Endpoint and credentials are the chart's, as for spec.store."""

    model_config = ConfigDict(json_schema_extra=validations(
        cel("!has(self.store.readOnly) || !self.store.readOnly", TIER_READ_ONLY_MESSAGE, field_path=".store")))

    after: Duration = Field(description="Move content not read (nor written) for this long: a Go duration, "
                                        "e.g. 720h.")
    store: StoreSpec = Field(description="The tier's bucket and prefix: outside spec.store's location.")

    @field_validator("store")
    @classmethod
    def _written(cls, store: StoreSpec) -> StoreSpec:
        if store.read_only:
            raise ValueError(TIER_READ_ONLY_MESSAGE)
        return store


def locations_overlap(a: StoreSpec, b: StoreSpec) -> bool:
    """One location contains the other (same bucket, one prefix a prefix of the other, by segments)."""
    def segments(prefix: str) -> str:
        return "".join(f"{part}/" for part in prefix.split("/") if part)

    pa, pb = segments(a.prefix), segments(b.prefix)
    return a.bucket == b.bucket and (pa.startswith(pb) or pb.startswith(pa))


def _refused(value: Any, message: str) -> Any:
    if value is not None:
        raise ValueError(message)
    return value


class ResultCacheSpec(K8sModel):
    """A content-addressed result store shared by the jobs allowed to use it."""

    model_config = ConfigDict(json_schema_extra=validations(
        cel("!has(self.tiers) || size(self.tiers) <= 1", TIERS_MESSAGE, field_path=".tiers"),
        cel("!has(self.signing)", SIGNING_MESSAGE, field_path=".signing")))

    store: StoreSpec
    retention: RetentionSpec | None = Field(default=None, description="How long and how much is kept (default: "
                                                                      "everything).")
    trust: TrustSpec | None = Field(default=None, description="Whom this cache trusts (default: the cluster's "
                                                              "agents).")
    sharing: SharingSpec | None = Field(default=None, description="Other namespaces allowed to read or write "
                                                                  "this cache's location.")
    quota: QuotaSpec | None = Field(default=None, description="A bound on the entries or logical bytes kept: at "
                                                              "the limit new results are computed but not cached.")
    tiers: list[TierSpec] | None = Field(default=None, description="A cold tier behind spec.store (one for "
                                                                  "now): content not read for tiers[0].after "
                                                                  "moves there and comes back when read.")
    signing: Refused = None

    @field_validator("tiers")
    @classmethod
    def _one_tier_apart(cls, value: list[TierSpec] | None, info: ValidationInfo) -> list[TierSpec] | None:
        if value is not None and len(value) > 1:
            raise ValueError(TIERS_MESSAGE)
        store = info.data.get("store")
        if store is not None and any(locations_overlap(t.store, store) for t in value or ()):
            raise ValueError(TIER_OVERLAP_MESSAGE)
        return value

    @field_validator("signing", mode="before")
    @classmethod
    def _no_signing(cls, value: Any) -> Any:
        return _refused(value, SIGNING_MESSAGE)


class ResultCacheStatus(StatusModel):
    """Written by the operator."""

    entries: int | None = Field(default=None, ge=0, description="Cache keys with a stored result, from the "
                                                               "store's usage index (kept on write, hit and "
                                                               "eviction).")
    logical_bytes: int | None = Field(default=None, ge=0, description="Sum of the entries' result sizes: what "
                                                                     "storing each in full would take.")
    stored_bytes: int | None = Field(default=None, ge=0, description="An estimate: logicalBytes times the ratio of "
                                                                    "bytes on the store to logical bytes measured "
                                                                    "at the last sweep (or first indexing).")
    dedup_ratio: float | None = Field(default=None, ge=0, description="logicalBytes / storedBytes: deduplication "
                                                                     "and compression together (an estimate).")
    hits: int | None = Field(default=None, ge=0, description="Lookups served from this cache.")
    misses: int | None = Field(default=None, ge=0, description="Lookups that found nothing to serve.")
    evicted_entries: int | None = Field(default=None, ge=0, description="Entries retention evicted so far.")
    last_eviction_time: str | None = Field(default=None, description="When retention last evicted an entry "
                                                                     "(RFC 3339).")
    compute_seconds_saved: float | None = Field(default=None, ge=0)
    revocations_recorded: list[str] | None = Field(
        default=None, description="Key ids of spec.trust.revoked whose revocation the operator appended to the "
                                  "store's audit log (when the store keeps one).")
    conditions: Conditions = Field(default_factory=list)
    observed_generation: int | None = Field(default=None, ge=0)


class ResultCache(K8sModel):
    model_config = ConfigDict(extra="ignore")

    api_version: Literal["memoplane.io/v1alpha1"] = API_VERSION
    kind: Literal["ResultCache"] = "ResultCache"
    metadata: ObjectMetaLite
    spec: ResultCacheSpec
    status: ResultCacheStatus = Field(default_factory=ResultCacheStatus)


RESULTCACHE = KindInfo(
    kind="ResultCache",
    plural="resultcaches",
    short_names=("rcache",),
    spec_model=ResultCacheSpec,
    status_model=ResultCacheStatus,
    description="A store of computed results, with retention and trust rules.",
    columns=(
        PrinterColumn("Entries", ".status.entries", "integer"),
        PrinterColumn("Dedup", ".status.dedupRatio", "number", "logicalBytes / storedBytes."),
        PrinterColumn("Hits", ".status.hits", "integer"),
        PrinterColumn("Misses", ".status.misses", "integer"),
        AGE_COLUMN,
        PrinterColumn("Bucket", ".spec.store.bucket", "string", priority=1),
    ),
)
