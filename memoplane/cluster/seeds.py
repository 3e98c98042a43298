"""GMemSeed decisions (pure): the spec as engine parameters, where a seed's overlay lives,
when to compact, the status patches, and what a ComputeJob reading the seed receives.

Storage. A seed's overlay lives in the namespace's default store (bucket DEFAULT_BUCKET,
prefix default_store_prefix(namespace)) under gmem/<uid>/ (memoplane.gmem.persist's
layout). The name is the object's uid, not its name: a GMemSeed deleted and created again
is another seed, and an operator that was down during the deletion still never mixes them.

One writer. The operator is the only process that opens a cluster seed for writing.
Anyone else (the CLI) writes by putting a batch under gmem/<uid>/inbox/ — an immutable
object in the log format of memoplane.gmem.log, bound to the parameters' digest, named
<time ns>-<random> so that two writers never collide — and then touching the seed's
WRITE_ANNOTATION so the operator hears of it at once (a periodic resync also finds it).
The operator applies inbox batches in name order, seals them into the next log segment in
the store, updates the status and only then deletes the batches: a crash anywhere replays
them, and applying a batch again leaves the same overlay (the digest is of the state).
Its local active segment is sealed before every status update, so it is never the only
copy of anything: the operator can run on an emptyDir.

Spec changes. The overlay belongs to the parameters it was written over (the log is bound
to their digest). Changing seed, dtype or layers of an existing GMemSeed stalls it
(reason ParametersChanged) and keeps the overlay: restore the spec, or delete and create
the GMemSeed again to start over with an empty overlay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..api.conditions import is_true, mark_ready, mark_reconciling, mark_stalled
from ..api.specs import SpecError, parse_gmemseed
from ..errors import InputError
from ..gmem import GMem, GMemParams, Layer
from ..gmem.log import LogHeader, encode_records
from ..gmem.persist import params_digest
from . import protocol as p
from .views import meta_of, section

Patch = dict[str, Any]

WRITE_ANNOTATION = f"{p.GROUP}/gmem-write"   # touched by a writer: "a batch is in the inbox"
COMPACT_SEGMENTS = 8       # sealed segments after the last snapshot that trigger a compaction
COMPACT_RECORDS = 1 << 20  # or records in them (24 bytes each): reopening replays them all

REASON_READY = "OverlayCurrent"
REASON_APPLYING = "ApplyingWrites"
REASON_PARAMS_CHANGED = "ParametersChanged"
REASON_SEED_NOT_READY = "SeedNotReady"


def location(namespace: str) -> tuple[str, str]:
    """(bucket, prefix) of the store holding the namespace's seeds."""
    return p.DEFAULT_BUCKET, p.default_store_prefix(namespace)


def store_name(uid: str) -> str:
    """The seed's name in memoplane.gmem.GMemStore (a uid is lowercase hex and dashes)."""
    return uid.lower()


def encode_batch(params: GMemParams, addrs: Any, values: Any) -> bytes:
    """A write batch for the inbox: a one-batch log (memoplane.gmem.log) bound to the
    parameters, with the engine's own conversions and checks of addresses and values."""
    batches: list[tuple[Any, Any]] = []

    class Keep:
        def append(self, a: Any, bits: Any) -> None:
            batches.append((a.copy(), bits.copy()))

    GMem(params.seed, params.dtype, params.layers, journal=Keep()).write_many(addrs, values)
    header = LogHeader(seq=0, dtype=params.dtype, params_digest=params_digest(params))
    return header.encode() + b"".join(encode_records(a, bits, header.crc) for a, bits in batches)


def params_of(spec: Any) -> GMemParams:
    """memoplane.api.gmemseed.GMemSeedSpec -> engine parameters (InputError if refused)."""
    return GMemParams(spec.seed, spec.dtype, tuple(Layer(x.seed, x.weight) for x in spec.layers))


def parse_seed(obj: Mapping[str, Any]) -> GMemParams | str:
    """The object's parameters, or why the spec is invalid (fields named, like kubectl's)."""
    try:
        seed = parse_gmemseed(obj)
    except SpecError as exc:
        return "; ".join(exc.problems)
    try:
        return params_of(seed.spec)
    except InputError as exc:
        return f"spec: {exc.cause}: {exc.fix}"


def compaction_due(sealed_segments: int, sealed_records: int) -> bool:
    return sealed_segments >= COMPACT_SEGMENTS or sealed_records >= COMPACT_RECORDS


# -- status ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedState:
    digest: str
    version: int
    overlay_entries: int
    store_url: str
    overlay_blob: tuple[str, int] | None  # (digest, size) in the store; None while empty


def _conds(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [dict(c) for c in status.get("conditions") or ()]


def ready(status: Mapping[str, Any], generation: int, state: SeedState, now: datetime) -> Patch:
    message = f"digest {state.digest[:15]}…, version {state.version}, {state.overlay_entries} overlay entries"
    blob = None if state.overlay_blob is None else {"digest": state.overlay_blob[0], "size": state.overlay_blob[1]}
    return {
        "digest": state.digest, "version": state.version, "overlayEntries": state.overlay_entries,
        "store": state.store_url, "overlayBlob": blob,
        "conditions": mark_ready(_conds(status), REASON_READY, message, generation, now),
        "observedGeneration": generation,
    }


def stalled(status: Mapping[str, Any], generation: int, reason: str, message: str, now: datetime) -> Patch:
    return {"conditions": mark_stalled(_conds(status), reason, message, generation, now),
            "observedGeneration": generation}


def reconciling(status: Mapping[str, Any], generation: int, reason: str, message: str, now: datetime) -> Patch:
    return {"conditions": mark_reconciling(_conds(status), reason, message, generation, now),
            "observedGeneration": generation}


def params_changed_message(bound: str) -> str:
    return (f"spec.seed, spec.dtype or spec.layers changed, but the overlay was written over the "
            f"parameters {bound}: restore them, or delete and recreate the GMemSeed "
            "(which starts with an empty overlay)")


def unchanged(status: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    """The patch would change nothing a reader sees (condition timestamps aside)."""
    def key(conds: Any) -> list[tuple[Any, ...]]:
        return [(c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))
                for c in conds or ()]
    return all(status.get(k) == v for k, v in patch.items() if k != "conditions") and \
        key(status.get("conditions")) == key(patch.get("conditions"))


# -- what a job reading the seed receives ----------------------------------------------------


@dataclass(frozen=True)
class SeedView:
    params: dict[str, Any]
    digest: str
    store_url: str
    overlay_blob: tuple[str, int] | None


def seed_view(obj: Mapping[str, Any]) -> SeedView | str:
    """The seed as of its status, if that status is Ready for the current spec; else why not."""
    meta, status = meta_of(obj).raw, section(obj, "status")
    name = meta.get("name")
    params = parse_seed(obj)
    if isinstance(params, str):
        return f"GMemSeed '{name}' is invalid: {params}"
    generation = meta.get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and observed != generation:
        return f"GMemSeed '{name}' is being reconciled (generation {generation})"
    if not is_true(status.get("conditions"), "Ready") or not status.get("digest"):
        why = next((c.get("message") for c in status.get("conditions") or ()
                    if c.get("type") == "Ready" and c.get("message")), "not reconciled yet")
        return f"GMemSeed '{name}' is not Ready: {why}"
    blob = status.get("overlayBlob") or None
    store = str(status.get("store") or p.store_url(*location(str(meta.get("namespace")))))
    return SeedView(params.to_json(), str(status["digest"]), store,
                    (str(blob["digest"]), int(blob["size"])) if blob else None)


def range_problem(offset: int, count: int) -> str | None:
    if offset + count > 1 << 64:
        return f"offset {offset} + count {count} leaves the 2^64 address space: shrink count"
    return None
