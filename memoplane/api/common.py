"""Types shared by the memoplane custom resources.

Each constrained type carries both its Python check and its OpenAPI schema, so
the CLI/operator and the API server reject the same values. CRD-only markers
(`x-kubernetes-*`) ride along in the JSON schema and `crd.py` keeps them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    model_serializer,
)
from pydantic.alias_generators import to_camel

from ..inputs import ENV_NAME_FIX, ENV_NAME_PATTERN, ENV_VALUE_FIX, RESERVED_ENV_PREFIX, env_name_problem
from ..quantity import QUANTITY_PATTERN, _check_quantity
from ..quantity import parse_quantity as parse_quantity  # re-exported: memoplane.cluster imports it from here

GROUP = "memoplane.io"
VERSION = "v1alpha1"
# f"{GROUP}/{VERSION}" spelled out: the models' apiVersion fields have this literal type.
API_VERSION: Literal["memoplane.io/v1alpha1"] = "memoplane.io/v1alpha1"
CATEGORY = "memoplane"

# Kubernetes quantity grammar without a sign: a negative size or CPU is always a mistake.
# Go's time.ParseDuration units, as used by retention.maxAge ("720h", "1h30m").
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Inputs are keyword arguments of the entrypoint and file names under $MEMOPLANE_IN.
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
CONFIGMAP_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"

class K8sModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown spec fields are typos."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=False
    )

    # Fields whose explicit null is a value (a JSON input of null), not "unset".
    _keep_null: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _restore_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in self._keep_null:
            if name in self.model_fields_set and getattr(self, name) is None:
                data[type(self).model_fields[name].alias or name] = None
        return data

    def to_k8s(self) -> dict[str, Any]:
        """The wire form for a manifest: camelCase keys, only the fields that were given."""
        return self.model_dump(by_alias=True, exclude_unset=True, exclude_none=True, mode="json")


class StatusModel(K8sModel):
    """Status is written by controllers; tolerate fields a newer writer added."""

    model_config = ConfigDict(extra="ignore")

    def to_k8s(self) -> dict[str, Any]:
        """Status keeps explicit defaults (cached: false is information)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(
    rule: str,
    message: str,
    *,
    message_expression: str | None = None,
    field_path: str | None = None,
    reason: str | None = None,
) -> dict[str, str]:
    """One `x-kubernetes-validations` entry (a CEL rule evaluated by the API server)."""
    entry = {"rule": rule, "message": message}
    if message_expression:
        entry["messageExpression"] = message_expression
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """`json_schema_extra` carrying CEL rules for a model's schema node."""
    return {"x-kubernetes-validations": list(rules)}


QUANTITY_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "pattern": QUANTITY_PATTERN,
    "minimum": 0,
    "x-kubernetes-int-or-string": True,
}
Quantity = Annotated[int | str, PlainValidator(_check_quantity), WithJsonSchema(QUANTITY_SCHEMA)]

Duration = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=64)]
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    """A Duration in seconds: `"1h30m"` -> 5400.0; raises ValueError on a bad one."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a Go duration: write e.g. 90s, 30m or 720h")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in re.findall(r"([0-9.]+)(ns|us|µs|ms|s|m|h)", text))
Name = Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, min_length=1, max_length=253)]
NamespaceName = Annotated[str, Field(pattern=DNS_LABEL_PATTERN, min_length=1, max_length=63)]
Identifier = Annotated[str, Field(pattern=IDENTIFIER_PATTERN, min_length=1, max_length=63)]
BucketName = Annotated[str, Field(pattern=BUCKET_PATTERN, min_length=3, max_length=63)]
# Digests look like "b3:<64 hex>"; kept loose so a new algorithm needs no CRD change.
Digest = Annotated[str, Field(max_length=128)]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


# A free JSON value (inputs[].value, status.result.value): any type, null included.
JsonValue = Annotated[
    Any,
    WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True, "nullable": True}),
]

MAX_ENV = 128
ENV_VALUE_PATTERN = r"^[^\x00]*$"
_BAD_ENV_NAME = f"!k.matches('{ENV_NAME_PATTERN}') || k.startsWith('{RESERVED_ENV_PREFIX}')"
ENV_NAME_MESSAGE = f"is not a valid variable name: {ENV_NAME_FIX}"


def _check_env(env: dict[str, str]) -> dict[str, str]:
    """The CRD's rules for spec.env, with the same messages (names: memoplane.inputs)."""
    for name, value in env.items():
        if env_name_problem(name):
            raise ValueError(f"'{name}' {ENV_NAME_MESSAGE}")
        if "\0" in value:
            raise ValueError(f"the value of {name} contains a NUL character: {ENV_VALUE_FIX}")
    return env


# spec.env: names by the one definition in memoplane.inputs (a CEL rule on the keys, since
# a CRD schema cannot constrain map keys), values without NUL (a pattern).
EnvMap = Annotated[
    dict[str, Annotated[str, Field(json_schema_extra={"pattern": ENV_VALUE_PATTERN})]],
    Field(max_length=MAX_ENV, json_schema_extra=validations(cel(
        f"!self.exists(k, {_BAD_ENV_NAME})",
        f"a key {ENV_NAME_MESSAGE}",
        message_expression=f"\"'\" + self.filter(k, {_BAD_ENV_NAME})[0] + \"' {ENV_NAME_MESSAGE}\"",
    ))),
    AfterValidator(_check_env),
]

ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    """A metav1.Condition: kstatus reads Ready, Reconciling and Stalled."""

    type: str = Field(pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                      r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$", max_length=316)
    status: ConditionStatus
    observed_generation: int | None = Field(default=None, ge=0)
    last_transition_time: Timestamp
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field(default="", max_length=32768)


def list_map(*keys: str) -> dict[str, Any]:
    """A list keyed by `keys`: the API server rejects duplicate keys; SSA merges by key."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


Conditions = Annotated[list[Condition], Field(json_schema_extra=list_map("type"))]


class ObjectMetaLite(K8sModel):
    """The metadata fields memoplane reads; everything else passes through untouched."""

    model_config = ConfigDict(extra="ignore")

    name: str
    namespace: str | None = None
    generation: int | None = None
    uid: str | None = None
    resource_version: str | None = None
    creation_timestamp: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str  # string | integer | number | boolean | date
    description: str = ""
    priority: int = 0  # 1 = only with -o wide


AGE_COLUMN = PrinterColumn("Age", ".metadata.creationTimestamp", "date")


@dataclass(frozen=True)
class KindInfo:
    """What the CRD generator needs besides the schema: names and columns."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    spec_model: type[K8sModel]
    status_model: type[StatusModel]
    columns: tuple[PrinterColumn, ...]
    description: str
    scope: str = "Namespaced"
    categories: tuple[str, ...] = field(default=(CATEGORY,))

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"
