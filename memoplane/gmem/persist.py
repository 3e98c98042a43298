"""Where a named GMem's overlay lives: snapshots and sealed logs in the store.

Object stores cannot append, so the active log segment is a local file (appended and
fsynced per batch, see `log`), and only immutable objects go through the `Backend`:
    gmem/<name>/params.json               canonical parameters the name is bound to
    gmem/<name>/log-<seq, 16 digits>      a sealed segment, byte for byte
    gmem/<name>/snapshot-<version>        the whole overlay as of sealed segment <version>
`version` is the number of the last sealed segment. Opening loads the newest snapshot,
applies the sealed segments after it in order, then recovers the local active segment.
Every step is ordered so that a crash between two of them loses nothing:
    seal:    put log-<seq> -> remove the local file -> start segment seq + 1
    compact: seal -> put snapshot-<version> -> delete the logs and snapshots it covers
A local segment whose seq is already sealed (a crash after the put) is discarded.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from ..canonical import canonical_json
from ..cas.backend import Backend
from ..cas.store import Store
from ..errors import InputError, NotFound, StoreCorrupted
from .engine import DTYPES, GMem, GMemParams, Layer, from_bits, to_bits
from .log import DTYPE_CODES, LogHeader, OverlayLog, Replay, Sync, parse
from .mixer import U64Array
from .overlay import Overlay

MIXER_ID = "gmem-v1"  # names the value function; bump if mixer.py ever changes
SNAP_MAGIC = b"MPGMSNP1"
SNAP_HEADER = struct.Struct("<8sHBBIQQ32s32s")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,251}[a-z0-9])?$")


def params_document(params: GMemParams) -> bytes:
    """What a name's params.json holds for `params`: two documents differ iff the parameters do."""
    return canonical_json({"mixer": MIXER_ID, **params.to_json()})


def params_digest(params: GMemParams) -> bytes:
    return blake3.blake3(params_document(params)).digest()


def _body(keys: U64Array, bits: U64Array) -> bytes:
    return keys.astype("<u8").tobytes() + bits.astype("<u8").tobytes()


def overlay_digest(overlay: Overlay) -> str | None:
    """blake3 of the overlay's state (sorted keys, then value bits); None if empty."""
    keys, values = overlay.to_arrays()
    if keys.shape[0] == 0:
        return None
    return "b3:" + blake3.blake3(_body(keys, to_bits(values))).hexdigest()


def seed_digest(params: GMemParams, overlay: Overlay | None = None) -> str:
    """The content identity of a seed: parameters, value function and overrides.

    It depends on the overlay's state, not its history: the same overrides written in
    another order, batched differently or compacted give the same digest.
    """
    doc = {"v": 1, "mixer": MIXER_ID, "params": params.to_json()}
    doc["overlay"] = overlay_digest(overlay) if overlay is not None else None
    return "b3:" + blake3.blake3(canonical_json(doc)).hexdigest()


def encode_snapshot(params: GMemParams, version: int, keys: U64Array, bits: U64Array) -> bytes:
    body = _body(keys, bits)
    head = SNAP_HEADER.pack(
        SNAP_MAGIC, 1, DTYPE_CODES[params.dtype], 0, 0, version, keys.shape[0],
        params_digest(params), blake3.blake3(body).digest(),
    )  # fmt: skip
    return head + body


def decode_snapshot(data: bytes, params: GMemParams, where: str) -> tuple[int, U64Array, U64Array]:
    """(version, keys, bits), verified against its checksum and the parameters."""
    if len(data) < SNAP_HEADER.size or data[:8] != SNAP_MAGIC:
        raise StoreCorrupted(f"{where}: not a gmem snapshot", "restore it from a replica or delete it")
    _m, fmt, code, _f, _r, version, count, pdig, bdig = SNAP_HEADER.unpack_from(data)
    body = data[SNAP_HEADER.size :]
    if fmt != 1 or len(body) != 16 * count or blake3.blake3(body).digest() != bdig:
        raise StoreCorrupted(f"{where}: snapshot checksum mismatch", "restore it from a replica or delete it")
    if pdig != params_digest(params) or code != DTYPE_CODES[params.dtype]:
        raise StoreCorrupted(f"{where}: snapshot was written for other parameters", "check params.json")
    keys = np.frombuffer(body, dtype="<u8", count=count).astype(np.uint64)
    bits = np.frombuffer(body, dtype="<u8", offset=8 * count).astype(np.uint64)
    return version, keys, bits


@dataclass(frozen=True)
class OpenReport:
    """What opening found: useful for logs and the resource's status."""

    snapshot_version: int
    sealed_segments: int
    active_records: int
    dropped_records: int  # whole records of a torn final batch in the active segment
    dropped_bytes: int


class StoredGMem:
    """A GMem whose writes go to a durable log; seal and compact move them to the store."""

    def __init__(
        self, store: GMemStore, name: str, params: GMemParams, overlay: Overlay, version: int, active: OverlayLog
    ) -> None:
        self.store, self.name, self.params, self.version = store, name, params, version
        self._active = active
        self.gmem = GMem(params.seed, params.dtype, params.layers, overlay=overlay, journal=self)

    def append(self, addrs: U64Array, bits: U64Array) -> None:
        """The GMem's journal: log first, then (in GMem) the overlay."""
        self._active.append(addrs, bits)
        if self._active.records >= self.store.segment_records:
            self.seal()

    def seal(self) -> int:
        """Move the active segment into the store as log-<seq>; returns the version."""
        self.gmem.flush()
        if self._active.records == 0:
            return self.version
        seq = self._active.header.seq
        self._active.close()
        self.store.backend.put(self.store.obj(self.name, "log", seq), self._active.path.read_bytes())
        self.store.sync_backend()  # the sealed copy must be durable before the local one goes
        self._active.path.unlink()
        self.version = seq
        self._active = self.store.new_active(self.name, self.params, seq + 1)
        return seq

    def compact(self) -> str:
        """Seal, snapshot the whole overlay, drop what the snapshot covers; its digest."""
        version = self.seal()
        keys, values = self.gmem.overlay.to_arrays()
        data = encode_snapshot(self.params, version, keys, to_bits(values))
        self.store.backend.put(self.store.obj(self.name, "snapshot", version), data)
        self.store.sync_backend()
        for kind, n, obj in list(self.store.objects(self.name)):
            if n < version or (kind == "log" and n == version):
                self.store.backend.delete(obj)
        return "b3:" + blake3.blake3(data[SNAP_HEADER.size :]).hexdigest()

    def digest(self) -> str:
        return seed_digest(self.params, self.gmem.overlay)

    def status(self) -> dict[str, Any]:
        """The GMemSeed status fields (DESIGN §2)."""
        return {"digest": self.digest(), "version": self.version, "overlayEntries": len(self.gmem.overlay)}

    def close(self) -> None:
        self.gmem.flush()
        self._active.close()


class GMemStore:
    """Named GMems over a Backend, with active log segments in `local_dir`.

    The only code that knows the store's gmem/ layout: per name, params.json (the
    parameters the overlay was written for), sealed log segments and snapshots,
    and an inbox of write batches queued for the writer (the operator) to apply."""

    def __init__(
        self, backend: Backend, local_dir: Path | str | None, sync: Sync = "batch", segment_records: int = 1 << 22
    ) -> None:
        self.backend, self.sync = backend, sync
        self.local_dir = Path(local_dir) if local_dir is not None else None
        self.segment_records = segment_records

    @classmethod
    def of(cls, store: Store, local_dir: Path | str | None = None) -> GMemStore:
        """Over a Store's backend; `local_dir` (active segments) is needed to open() a name."""
        return cls(store.backend, local_dir)

    # -- parameters --------------------------------------------------------------

    def bound_document(self, name: str) -> bytes | None:
        """The params.json of `name` as stored, or None if it has none yet."""
        try:
            return self.backend.get(self._params_object(name))
        except NotFound:
            return None

    def bound_params(self, name: str) -> GMemParams | None:
        doc = self.bound_document(name)
        if doc is None:
            return None
        data = json.loads(doc)
        return GMemParams(data["seed"], data["dtype"], tuple(Layer(**x) for x in data["layers"]))

    @staticmethod
    def _params_object(name: str) -> str:
        return f"gmem/{name}/params.json"

    # -- the inbox of queued write batches ---------------------------------------------

    @staticmethod
    def _inbox_prefix(name: str) -> str:
        return f"gmem/{name}/inbox/"

    def queue_batch(self, name: str, data: bytes, time_ns: int, token: str) -> str:
        """Queue a write batch for `name`'s writer; returns its object name (applied once gone)."""
        obj = f"{self._inbox_prefix(name)}{time_ns:020d}-{token}"
        self.backend.put(obj, data)
        return obj

    def queued(self, name: str) -> list[str]:
        """The queued batches of `name`, oldest first."""
        return sorted(info.name for info in self.backend.list(self._inbox_prefix(name)))

    def is_queued(self, batch: str) -> bool:
        return self.backend.exists(batch)

    def read_batch(self, batch: str) -> bytes:
        return self.backend.get(batch)

    def unqueue(self, batch: str) -> None:
        """Forget a batch once it is applied and sealed."""
        self.backend.delete(batch)

    # -- segments -------------------------------------------------------------------

    def sync_backend(self) -> None:
        """Make puts durable on backends that defer it (FilesystemBackend "flush")."""
        flush = getattr(self.backend, "flush", None)
        if callable(flush):
            flush()

    def obj(self, name: str, kind: str, n: int) -> str:
        return f"gmem/{name}/{kind}-{n:016d}"

    def objects(self, name: str) -> Iterator[tuple[str, int, str]]:
        """(kind, number, object name) of the name's logs and snapshots."""
        for kind, n, obj, _size in self._segments(name):
            yield kind, n, obj

    def segment_sizes(self, name: str) -> list[tuple[str, int, int]]:
        """(kind, number, size in bytes) of the name's logs and snapshots."""
        return [(kind, n, size) for kind, n, _obj, size in self._segments(name)]

    def _segments(self, name: str) -> Iterator[tuple[str, int, str, int]]:
        for info in self.backend.list(f"gmem/{name}/"):
            m = re.fullmatch(rf"gmem/{re.escape(name)}/(log|snapshot)-(\d{{16}})", info.name)
            if m:
                yield m.group(1), int(m.group(2)), info.name, info.size

    def active_path(self, name: str) -> Path:
        if self.local_dir is None:
            raise ValueError("this GMemStore has no local directory for active segments")
        return self.local_dir / name / "active.log"

    def new_active(self, name: str, params: GMemParams, seq: int) -> OverlayLog:
        header = LogHeader(seq=seq, dtype=params.dtype, params_digest=params_digest(params))
        return OverlayLog.create(self.active_path(name), header, self.sync)

    def open(self, name: str, params: GMemParams) -> tuple[StoredGMem, OpenReport]:
        """Load snapshot + sealed logs + the local active segment (repairing a torn tail)."""
        if not _NAME.match(name):
            raise InputError(f"gmem name {name!r} is not a DNS-style name", "use lowercase letters, digits, - . _")
        self._bind(name, params)
        overlay = Overlay(np.dtype(DTYPES[params.dtype]))
        objs = sorted(self.objects(name), key=lambda t: (t[1], t[0]))
        snaps = [(n, o) for kind, n, o in objs if kind == "snapshot"]
        version = 0
        if snaps:
            version, keys, bits = decode_snapshot(self.backend.get(snaps[-1][1]), params, snaps[-1][1])
            overlay.put_many(keys, from_bits(bits, overlay.dtype))
        snap_version = version
        logs = [(n, o) for kind, n, o in objs if kind == "log" and n > snap_version]
        for n, o in logs:
            if n != version + 1:
                raise StoreCorrupted(f"gmem/{name}: sealed segment {version + 1} is missing", "restore it")
            _apply(overlay, self._sealed(o, params))
            version = n
        active, replay = self._recover_active(name, params, version)
        if replay is not None:
            _apply(overlay, replay)
        overlay.compact()
        report = OpenReport(
            snapshot_version=snap_version,
            sealed_segments=len(logs),
            active_records=active.records,
            dropped_records=replay.dropped_records if replay else 0,
            dropped_bytes=replay.dropped_bytes if replay else 0,
        )
        return StoredGMem(self, name, params, overlay, version, active), report

    def drop(self, name: str) -> None:
        """Forget a name: its queued batches, its objects in the store, its local active segment."""
        for batch in self.queued(name):
            self.unqueue(batch)
        for _kind, _n, obj in list(self.objects(name)):
            self.backend.delete(obj)
        self.backend.delete(self._params_object(name))
        if self.local_dir is not None:
            self.active_path(name).unlink(missing_ok=True)

    def _bind(self, name: str, params: GMemParams) -> None:
        doc = params_document(params)
        stored = self.bound_document(name)
        if stored is None:
            self.backend.put(self._params_object(name), doc)
            return
        if stored != doc:
            raise InputError(
                f"gmem {name!r} holds an overlay for other parameters ({stored.decode()})",
                "open it with those parameters, or drop it first",
            )

    def _sealed(self, obj: str, params: GMemParams) -> Replay:
        replay = parse(self.backend.get(obj), obj)
        if replay.dropped_bytes or replay.header.params_digest != params_digest(params):
            raise StoreCorrupted(f"{obj}: sealed segment is damaged or foreign", "restore it from a replica")
        return replay

    def _recover_active(self, name: str, params: GMemParams, version: int) -> tuple[OverlayLog, Replay | None]:
        path = self.active_path(name)
        if not path.exists():
            return self.new_active(name, params, version + 1), None
        log, replay = OverlayLog.recover(path, self.sync)
        if replay.header.params_digest != params_digest(params):
            log.close()
            raise StoreCorrupted(f"{path}: active segment belongs to other parameters", "move it away")
        if replay.header.seq <= version:  # sealed already; a crash came before the unlink
            log.close()
            path.unlink()
            return self.new_active(name, params, version + 1), None
        if replay.header.seq != version + 1:
            log.close()
            raise StoreCorrupted(f"{path}: segment {replay.header.seq} follows {version}", "restore the gap")
        return log, replay


def _apply(overlay: Overlay, replay: Replay) -> None:
    overlay.put_many(replay.addrs, from_bits(replay.bits, overlay.dtype))
