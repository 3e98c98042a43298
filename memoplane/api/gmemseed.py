"""GMemSeed: a deterministic procedural dataset over a 2^64 address space.

Only the API lives here; the engine is memoplane.gmem. Seeds are int64 on the
wire (Kubernetes integers are signed 64-bit), so they range over [0, 2^63).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field

from .common import (
    AGE_COLUMN,
    API_VERSION,
    Conditions,
    Digest,
    K8sModel,
    KindInfo,
    ObjectMetaLite,
    PrinterColumn,
    StatusModel,
)

MAX_SEED = 2**63 - 1
MAX_LAYERS = 16
Dtype = Literal["float32", "float64", "uint64"]


def _fits_int64(seed: int) -> int:
    if seed > MAX_SEED:
        raise ValueError(f"{seed} does not fit a Kubernetes integer (int64): use a seed below 2^63")
    return seed


# No `maximum` in the schema: kube-apiserver stores bounds as float64 and refuses 2^63-1;
# the int64 format is enforced by the API server's decoder anyway.
Seed = Annotated[int, Field(ge=0, json_schema_extra={"format": "int64"}), AfterValidator(_fits_int64)]


class Layer(K8sModel):
    """A further generator mixed into the base with `weight`."""

    seed: Seed
    weight: float


class GMemSeedSpec(K8sModel):
    """Parameters of the generator; any change gives a new digest."""

    seed: Seed
    dtype: Dtype = "float64"
    layers: list[Layer] = Field(default_factory=list, max_length=MAX_LAYERS)


class OverlayBlob(StatusModel):
    """Written overrides as one content-addressed blob: what a fromSeed input carries."""

    digest: Digest | None = None
    size: int | None = Field(default=None, ge=0)


class GMemSeedStatus(StatusModel):
    """Written by the operator."""

    digest: Digest | None = Field(default=None, description="Covers parameters and overlay.")
    version: int | None = Field(default=None, ge=0)
    overlay_entries: int | None = Field(default=None, ge=0)
    store: str | None = Field(default=None, max_length=1024,
                              description="Where the overlay lives: s3://bucket/prefix.")
    overlay_blob: OverlayBlob | None = Field(
        default=None, description="The overlay as jobs receive it (a blob in the store); absent while empty.")
    conditions: Conditions = Field(default_factory=list)
    observed_generation: int | None = Field(default=None, ge=0)


class GMemSeed(K8sModel):
    model_config = ConfigDict(extra="ignore")

    api_version: Literal["memoplane.io/v1alpha1"] = API_VERSION
    kind: Literal["GMemSeed"] = "GMemSeed"
    metadata: ObjectMetaLite
    spec: GMemSeedSpec
    status: GMemSeedStatus = Field(default_factory=GMemSeedStatus)


GMEMSEED = KindInfo(
    kind="GMemSeed",
    plural="gmemseeds",
    short_names=("gseed",),
    spec_model=GMemSeedSpec,
    status_model=GMemSeedStatus,
    description="A deterministic procedural dataset: values computed from a seed, plus an overlay.",
    columns=(
        PrinterColumn("Seed", ".spec.seed", "integer"),
        PrinterColumn("Dtype", ".spec.dtype", "string"),
        PrinterColumn("Version", ".status.version", "integer"),
        PrinterColumn("Entries", ".status.overlayEntries", "integer", "Overlay entries."),
        AGE_COLUMN,
    ),
)
