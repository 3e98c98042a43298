"""ResultCache: where results live, how long, who may read and write them."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

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


class StoreSpec(K8sModel):
    """Bucket and key prefix; endpoint and credentials default to the chart's."""

    bucket: BucketName
    prefix: str = Field(default="", max_length=512)


class RetentionSpec(K8sModel):
    """Refs older or beyond the size budget are evicted; GC then frees their data."""

    max_age: Duration | None = Field(default=None, description="Go duration, e.g. 720h.")
    max_bytes: Quantity | None = None


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
    """Namespaces whose jobs may read this cache."""


class Writers(_NamespaceSet):
    """Namespaces whose jobs may write results into this cache."""



class SharingSpec(K8sModel):
    """Other namespaces allowed to use this cache (its own namespace always may)."""

    readers: Readers | None = None
    writers: Writers | None = None


class SecretRef(K8sModel):
    name: Name


class SigningSpec(K8sModel):
    """Entries are signed with the key in this Secret and checked on read."""

    secret_ref: SecretRef


class ResultCacheSpec(K8sModel):
    """A content-addressed result store shared by the jobs allowed to use it."""

    store: StoreSpec
    retention: RetentionSpec | None = None
    sharing: SharingSpec | None = None
    signing: SigningSpec | None = None


class ResultCacheStatus(StatusModel):
    """Written by the operator."""

    entries: int | None = Field(default=None, ge=0)
    logical_bytes: int | None = Field(default=None, ge=0)
    stored_bytes: int | None = Field(default=None, ge=0)
    dedup_ratio: float | None = Field(default=None, ge=0, description="logicalBytes / storedBytes.")
    hits: int | None = Field(default=None, ge=0)
    misses: int | None = Field(default=None, ge=0)
    compute_seconds_saved: float | None = Field(default=None, ge=0)
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
    description="A store of computed results, with retention and sharing rules.",
    columns=(
        PrinterColumn("Entries", ".status.entries", "integer"),
        PrinterColumn("Dedup", ".status.dedupRatio", "number", "logicalBytes / storedBytes."),
        PrinterColumn("Hits", ".status.hits", "integer"),
        PrinterColumn("Misses", ".status.misses", "integer"),
        AGE_COLUMN,
        PrinterColumn("Bucket", ".spec.store.bucket", "string", priority=1),
    ),
)
