"""The content-addressed store: blobs, trees, results and refs over a Backend.

Object names: packs/ and index/ (chunks in pack files and the index that finds them: chunks.py and
packs.py), chunks/ (one object per chunk: stores written before packs, still read), blobs/, trees/,
results/ (`<kind>/<2 hex>/<64 hex>`),
refs/<64 hex of the cache key>, attestations/<64 hex of the key>/<64 hex of the result>/<64 hex
of the envelope> (append-only: who vouches for a result, memoplane.trust), quarantine/<name
with / as %>.<ns>, audit/ (the audit log, audit.py), spot-checks/streaks.json (how often re-executing
a hit agreed: memoplane.cluster.spotcheck).

Reads are verified: a chunk is served only if blake3 of its plain bytes equals
its address, a blob only if its content re-hashes to its digest, a manifest
only if its seal and address match. Damaged objects are moved to quarantine/ (a damaged chunk
copy in a pack is recorded there and no longer used: chunks.py) and StoreCorrupted is raised,
so the caller recomputes.

Writes go chunks -> packs and their index segment -> blob manifests -> tree -> result ->
attestation -> (flush) -> ref, each object atomic, so a reader never sees a ref whose data was
not written first; the packs are flushed before any digest leaves the Store (a blob handed to
the caller, a result, a ref). A result manifest also carries the small blobs it names inline
(up to INLINE_RESULT_MAX bytes in all, outside its address, each checked against its digest on
read), so a hit on a small result reads no blob manifest and no pack; those blobs are still
stored as blobs too (GC, and readers that only hold their digest, need them). A ref also
lists the attestations of its result that its writers knew of (a reader's fast path; a
reader that needs more lists them all), and whoever can write the store can write a ref:
a reader trusts a ref only as far as the attestations its trust policy accepts.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import io
import json
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

import blake3

from ..canonical import canonical_json, json_depth_exceeds
from ..errors import InputError, NotFound, StoreCorrupted
from ..tree_limits import MAX_TREE_DEPTH, MAX_TREE_ENTRIES
from . import audit as audit_log
from . import gc as maintenance
from . import tiers
from . import usage as usage_log
from .audit import AuditLog, Record
from .backend import Backend
from .chunking import ChunkDecodeError, ChunkParams, Ingested, Pools, decode_chunk, ingest_buffer, ingest_stream
from .chunks import Chunks
from .digests import attestation_name, b3, check_digest, digest_of_name, object_name, ref_name
from .gc import SNAPSHOTS, EvictReport, GcReport, Stats, VerifyReport
from .records import (
    BlobManifest,
    BlobRef,
    ResultManifest,
    SealError,
    StoredValue,
    TreeEntry,
    TreeManifest,
    ValueKind,
    seal,
    short_path,
    tree_path_problem,
    unseal,
)
from .tiers import TieredBackend, TierReport
from .usage import Entry, UsageIndex, Use

log = logging.getLogger("memoplane.cas")

INLINE_MAX = 4096  # canonical JSON bytes a return value may have and still sit in the result manifest
READ_AHEAD = 16  # concurrent ranged reads a blob read may have in flight (sizes the S3 connection pool)
INLINE_RESULT_MAX = 128 << 10  # bytes of small blobs a result manifest carries inline, in all
INLINE_KEPT_BYTES = 16 << 20  # bytes of small blobs kept in memory, each of _recent and _inline
TREES_KEPT = 8  # output trees remembered from put_tree until their result is put (to inline their files)
READ_WINDOW = 16 << 20  # plain bytes of a blob planned and read together; the next window is read ahead
# (so a blob read holds about two windows: with 32 MiB an agent reading a 200 MB input peaked above 200 MB)
EMPTY_BLOB = b3(b"")
T = TypeVar("T")


class _Damaged(Exception):
    """A check in Store._load found bytes that do not match their name."""


@dataclass(frozen=True)
class Hit:
    key: str
    digest: str  # of the result manifest
    result: ResultManifest
    attestations: tuple[str, ...] = ()  # digests of the attestations the ref lists


@dataclass(frozen=True)
class RefEntry:
    result: str                     # the result manifest's digest
    attestations: tuple[str, ...]   # digests of attestations of it (not necessarily all)


@dataclass(frozen=True)
class SnapshotEntry:
    """A kept snapshot (a sandbox's $HOME as a tree): a GC root until it is dropped."""

    tree: str       # the tree's digest: the snapshot's ID
    size: int       # bytes of its files
    sandbox: str    # the sandbox it was taken of
    created: float  # Unix seconds


SMALL_KEPT = 1024  # verified result manifests and attestations kept in memory, each (small: big values are blobs)


def _keep(memo: OrderedDict[str, Any], name: str, value: Any) -> None:
    memo[name] = value
    while len(memo) > SMALL_KEPT:
        memo.popitem(last=False)


class _SmallBlobs:
    """Verified contents of small blobs by digest, the oldest dropped past INLINE_KEPT_BYTES.
    Not thread-safe: the Store holds its _small_lock."""

    def __init__(self) -> None:
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def keep(self, digest: str, data: bytes) -> None:
        if digest in self._data:
            self._data.move_to_end(digest)
            return
        self._data[digest] = data
        self._bytes += len(data)
        while self._bytes > INLINE_KEPT_BYTES:
            self._bytes -= len(self._data.popitem(last=False)[1])

    def get(self, digest: str) -> bytes | None:
        return self._data.get(digest)

    def __contains__(self, digest: object) -> bool:
        return digest in self._data


class Store:
    """A content-addressed store. Thread-safe; one per process is plenty.

    `audit`: whether ref writes, new attestations, ref deletions and evictions are appended to the
    store's audit log (audit.py). None (default): if the store keeps one, i.e. once anyone started
    it (Store(audit=True), `memoplane audit start`); a store without a log costs one existence
    check per RECHECK_SECONDS. `audit_by`: who the records say wrote them (default: the host name).
    """

    def __init__(self, backend: Backend, *, params: ChunkParams | None = None, workers: int | None = None,
                 audit: bool | None = None, audit_by: str | None = None) -> None:
        self.backend = backend
        self.audit_log = AuditLog(backend, audit_by)
        self._audit = audit
        self.params = params or ChunkParams()
        self._pools = Pools(workers or os.cpu_count() or 2)
        self._readers = Pools(2)  # threads that read a blob's next window ahead (its spans run on _pools)
        self.chunks = Chunks(backend, self._read_legacy_chunk, self._audit_quarantine, lambda: self._pools.get()[0])
        self._recent = _SmallBlobs()  # small blobs put here, for _inline_for
        self._inline = _SmallBlobs()  # blobs verified result manifests carried
        self._trees_put: OrderedDict[str, TreeManifest] = OrderedDict()  # the last TREES_KEPT put_tree made
        # Result manifests read by get_ref and attestations, by address: content-addressed,
        # so a verified copy stays true; the ref is still read, and every chunk's presence
        # checked in the pack index, for each hit.
        self._hit_results: OrderedDict[str, ResultManifest] = OrderedDict()
        self._envelopes: OrderedDict[str, bytes] = OrderedDict()
        self._small_lock = threading.Lock()

    def close(self) -> None:
        self._pools.close()
        self._readers.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def local_root(self) -> Path | None:
        """The directory a filesystem store lives in; None for an object store."""
        root = getattr(self.backend, "root", None)
        return Path(root) if root is not None else None

    def describe(self) -> str:
        return self.backend.describe()

    # -- the audit log -------------------------------------------------------

    def audit(self, kind: str, **fields: Any) -> Record | None:
        """Append a record of `kind` (cas.audit: REF, ATTESTATION, REVOCATION, DISPUTE, ...) with
        `fields` (JSON; name big things by digest) to the audit log, if this store writes one
        (see the class doc); returns it, or None. Revocations and disputes are recorded by whoever
        decides them: `store.audit(REVOCATION, keyid="node-a-1")`."""
        if not (self._audit if self._audit is not None else self.audit_log.started()):
            return None
        return self.audit_log.append(kind, fields)

    # -- blobs ---------------------------------------------------------------

    def _finish_blobs(self, ingested: Iterable[Ingested]) -> list[BlobRef]:
        """Chunks -> packs -> blob manifests: the packs and their index segment are written
        before any manifest names their chunks, and before a digest leaves the Store."""
        self.chunks.flush()
        refs = []
        for ing in ingested:
            manifest = BlobManifest(ing.size, tuple(ing.chunks))
            self.backend.put_if_absent(object_name("blobs", ing.digest), seal(manifest.to_dict()))
            refs.append(BlobRef(ing.digest, ing.size))
        return refs

    def put_bytes(self, data: bytes | bytearray | memoryview) -> BlobRef:
        return self._finish_blobs([self._ingest_bytes(data)])[0]

    def put_stream(self, stream: BinaryIO) -> BlobRef:
        """Store a binary stream without holding it in memory (8 MiB windows)."""
        return self._finish_blobs([self._ingest_stream(stream)])[0]

    def _ingest_bytes(self, data: bytes | bytearray | memoryview) -> Ingested:
        self.chunks.begin_write()
        ing = ingest_buffer(data, self.params, self._pools, self.chunks.put)
        if ing.size <= INLINE_RESULT_MAX:
            self._remember_small(ing.digest, bytes(data))
        return ing

    def _ingest_stream(self, stream: BinaryIO) -> Ingested:
        """A small stream is read whole (so a result can inline it); a larger one streams."""
        head = _read_up_to(stream, INLINE_RESULT_MAX + 1)
        if len(head) <= INLINE_RESULT_MAX:
            return self._ingest_bytes(head)
        self.chunks.begin_write()
        return ingest_stream(cast(BinaryIO, _Prefixed(head, stream)), self.params, self._pools, self.chunks.put)

    def put_file(self, path: str | os.PathLike[str]) -> BlobRef:
        try:
            with open(path, "rb", buffering=0) as f:
                return self.put_stream(f)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise InputError(f"cannot read {path}: {e.strerror}", "pass a readable regular file") from None

    def blob_manifest(self, digest: str) -> BlobManifest:
        """The blob's chunk list (seal checked); NotFound if absent."""
        return self._load(object_name("blobs", digest), lambda data: _sealed(data, BlobManifest.from_dict))

    def iter_blob(self, digest: str, *, stored: bool = False) -> Iterator[bytes]:
        """The blob's content chunk by chunk. Each chunk is verified before it is
        yielded; the whole digest is checked after the last one (StoreCorrupted then).

        A blob a verified result manifest carried inline comes from memory, unless `stored`
        (verify: the stored copy is what is checked). Otherwise the chunks are read a window
        (READ_WINDOW plain bytes) at a time, each window planned as one coalesced read, the
        next window read ahead while this one is consumed."""
        if not stored:
            with self._small_lock:
                inline = self._inline.get(digest)
            if inline is not None:
                yield inline
                return
        manifest = self.blob_manifest(digest)
        work, _ = self._pools.get()
        readers, _ = self._readers.get()
        windows = _windows(manifest.chunks, READ_WINDOW)
        hasher = blake3.blake3()
        pending: Future[dict[str, bytes]] | None = None
        for i, window in enumerate(windows):
            got = pending.result() if pending is not None else self.chunks.read(window, digest, work)
            pending = readers.submit(self.chunks.read, windows[i + 1], digest, work) if i + 1 < len(windows) else None
            last = {c: at for at, c in enumerate(window)}
            for at, c in enumerate(window):
                chunk = got.pop(c) if last[c] == at else got[c]  # let go of each chunk once consumed:
                hasher.update(chunk)  # this window drains while the next one is read ahead
                yield chunk
        if "b3:" + hasher.hexdigest() != digest:
            name = object_name("blobs", digest)
            raise self._quarantine(name, self.backend.get(name), "its chunks do not hash to the blob digest")

    def get_bytes(self, digest: str) -> bytes:
        """The whole blob, verified."""
        return b"".join(self.iter_blob(digest))

    def copy_blob(self, source: Store, digest: str) -> BlobRef:
        """`source`'s blob `digest` stored here, streamed chunk by chunk (never whole in memory);
        every chunk is verified as it is read (StoreCorrupted then)."""
        if source is self:
            return BlobRef(digest, self.blob_manifest(digest).size)
        return self.put_stream(io.BufferedReader(ChunkStream(source.iter_blob(digest))))

    def write_blob(self, digest: str, path: str | os.PathLike[str], *, executable: bool = False) -> None:
        """Write the blob to `path` (replacing it); the file appears only once fully verified."""
        path = Path(path)
        tmp = f".{path.name}.memoplane-tmp-{os.getpid()}-{threading.get_ident()}"
        with open_directory(path.parent) as parent:
            try:
                self.write_blob_at(digest, parent, tmp, executable=executable)
                os.replace(tmp, path.name, src_dir_fd=parent, dst_dir_fd=parent)
            finally:
                _unlink_quietly(parent, tmp)

    def write_blob_at(self, digest: str, dir_fd: int, name: str, *, executable: bool = False) -> None:
        """Create `name` in the directory `dir_fd` with the blob's verified content; never
        through a link and never over an existing file (FileExistsError). A file left
        half-written by a failed read is removed."""
        write_new_file(dir_fd, name, self.iter_blob(digest), executable=executable)

    def _read_legacy_chunk(self, digest: str, blob: str = "") -> bytes:
        """A chunk from its own `chunks/` object (stores written before packs), verified."""
        def check(stored: bytes) -> bytes:
            try:
                plain = decode_chunk(stored)
            except ChunkDecodeError as e:
                raise _Damaged(str(e)) from None
            if b3(plain) != digest:
                raise _Damaged("its content does not hash to its address")
            return plain

        try:
            return self._load(object_name("chunks", digest), check)
        except NotFound:
            raise StoreCorrupted(f"chunk {digest} of blob {blob or '?'} is missing from {self.describe()}",
                                 "the result will be recomputed; run `memoplane verify`") from None

    def _load(self, name: str, check: Callable[[bytes], T]) -> T:
        """Read `name` and return check(bytes); `check` raises _Damaged.

        If the damaged bytes were a node-local cached copy (the backend's optional
        `drop_cached(name, seen) -> bool`, see cached.py), that copy is dropped and the
        object re-read once from the remote before giving up, so a bad local copy
        never quarantines (deletes) a good remote one. Damage that is not local is
        quarantined and raised as StoreCorrupted."""
        data = self.backend.get(name)
        try:
            return check(data)
        except _Damaged as e:
            drop = getattr(self.backend, "drop_cached", None)
            if drop is None or not drop(name, data):
                raise self._quarantine(name, data, str(e)) from None
            log.warning("%s: the cached copy was damaged (%s); re-reading it from the remote", name, e)
        data = self.backend.get(name)
        try:
            return check(data)
        except _Damaged as e:
            raise self._quarantine(name, data, str(e)) from None

    # -- quarantine ------------------------------------------------------------

    def _audit_quarantine(self, name: str, quarantined_as: str, reason: str) -> None:
        self.audit(audit_log.QUARANTINE, object=name, quarantined_as=quarantined_as, reason=reason)

    def _quarantine(self, name: str, seen: bytes, reason: str) -> StoreCorrupted:
        """Move a damaged object aside (unless a writer replaced it meanwhile);
        returns the error for the caller to raise."""
        try:
            current = self.backend.get(name)
        except NotFound:
            current = None
        if current == seen:
            qname = f"quarantine/{name.replace('/', '%')}.{time.time_ns()}"
            self.backend.put(qname, seen)
            self.backend.delete(name)
            log.warning("quarantined %s as %s: %s", name, qname, reason)
            self.audit(audit_log.QUARANTINE, object=name, quarantined_as=qname, reason=reason)
        return StoreCorrupted(f"{name} in {self.describe()} is damaged: {reason}; it was quarantined",
                              "the result will be recomputed; run `memoplane verify` to check the rest")

    # -- the last run of each job identity (embedded mode's `explain`) ------------------

    def last_run(self, identity: str) -> bytes | None:
        """The record set_last_run kept for `identity` (a script and entrypoint, or a command)."""
        try:
            return self.backend.get(_last_run_name(identity))
        except NotFound:
            return None

    def set_last_run(self, identity: str, record: bytes) -> None:
        self.backend.put(_last_run_name(identity), record)

    # -- run records (memoplane.history): one object per run, append-only ----------------

    def put_run_record(self, run_id: str, record: bytes) -> bool:
        """Keep a run's record under its id; False if a record of that id exists (never replaced)."""
        return self.backend.create(RUN_RECORDS + run_id, record)

    def run_record(self, run_id: str) -> bytes | None:
        try:
            return self.backend.get(RUN_RECORDS + run_id)
        except NotFound:
            return None

    def delete_run_record(self, run_id: str) -> None:
        """Drop a run's record (history retention: `memoplane history prune`, a ResultCache's maxAge)."""
        self.backend.delete(RUN_RECORDS + run_id)

    def run_record_ids(self, after: str = "") -> Iterator[str]:
        """Every kept run id, oldest first (ids sort by time), those after `after` only."""
        ids = sorted(info.name[len(RUN_RECORDS):] for info in self.backend.list(RUN_RECORDS))
        return (run_id for run_id in ids if run_id > after)

    # -- the spot checks' agreement streaks (memoplane.cluster.spotcheck) -------------------

    def spot_check_streaks(self) -> bytes | None:
        """The streaks set_spot_check_streaks kept (None: none yet)."""
        try:
            return self.backend.get(SPOT_CHECK_STREAKS)
        except NotFound:
            return None

    def set_spot_check_streaks(self, record: bytes) -> None:
        self.backend.put(SPOT_CHECK_STREAKS, record)

    # -- trees -----------------------------------------------------------------

    def put_tree(self, root: str | os.PathLike[str]) -> BlobRef:
        """Store a directory's regular files (with their exec bit); empty directories are not
        kept. Anything else (a symlink, a device, a FIFO) is refused, and so are trees deeper
        than MAX_TREE_DEPTH or with more than MAX_TREE_ENTRIES entries. Every name is opened
        relative to its directory's descriptor without following links, so a tree changed
        while it is read can never make this read a file outside `root`."""
        try:
            root_fd = os.open(root, _DIR_FLAGS)
        except OSError as e:
            raise InputError(f"output tree {root} is not a directory ({e.strerror})",
                             "pass an existing directory, not a link to one") from None
        files: list[tuple[str, Ingested, bool]] = []
        try:
            for rel, fd in _tree_files(root_fd):
                with os.fdopen(fd, "rb", buffering=0) as f:
                    executable = bool(os.fstat(f.fileno()).st_mode & stat.S_IXUSR)
                    files.append((rel, self._ingest_stream(f), executable))
        finally:
            os.close(root_fd)
        blobs = self._finish_blobs(ing for _, ing, _ in files)  # one pack flush for the whole tree
        tree = TreeManifest({rel: TreeEntry(blob.digest, blob.size, executable)
                             for (rel, _, executable), blob in zip(files, blobs, strict=True)})
        self.backend.put_if_absent(object_name("trees", tree.digest), seal(tree.to_dict()))
        with self._small_lock:
            self._trees_put[tree.digest] = tree
            while len(self._trees_put) > TREES_KEPT:
                self._trees_put.popitem(last=False)
        return BlobRef(tree.digest, tree.size)

    def get_tree(self, digest: str) -> TreeManifest:
        def check(data: bytes) -> TreeManifest:
            tree = _sealed(data, TreeManifest.from_dict)
            if tree.digest != digest:
                raise _Damaged("its content does not hash to its address")
            return tree

        return self._load(object_name("trees", digest), check)

    def materialize(self, digest: str, dest: str | os.PathLike[str]) -> None:
        """Recreate a tree under `dest` (created; must be empty if it exists).

        Every directory is made and opened relative to its parent's descriptor with
        O_NOFOLLOW, every file created with O_EXCL | O_NOFOLLOW, so neither a tampered tree
        nor a link planted in `dest` meanwhile can make this write outside `dest`."""
        with output_directory(dest) as dest_fd:
            if os.listdir(dest_fd):
                raise InputError(f"{dest} is not empty", "materialize into a new or empty directory")
            tree = self.get_tree(digest)
            with _DirChain(dest_fd) as dirs:
                for rel, entry in sorted(tree.entries.items(), key=lambda item: item[0].split("/")):
                    problem = tree_path_problem(rel)
                    if problem:
                        raise StoreCorrupted(f"tree entry {short_path(rel)} {problem}", "the tree was tampered with")
                    parent, _, name = rel.rpartition("/")
                    try:
                        self.write_blob_at(entry.digest, dirs.open(parent), name, executable=entry.exec)
                    except OSError as e:
                        raise InputError(f"cannot write {short_path(rel)} under {dest}: {e.strerror}",
                                         "materialize into a new directory that nothing else writes to") from None

    # -- values ----------------------------------------------------------------

    def put_value(self, value: Any, kind: ValueKind = "json") -> StoredValue:
        """A return value for a ResultManifest: JSON inline when its canonical form is
        at most INLINE_MAX bytes, else a blob; bytes as a blob; "file" is a path."""
        if kind == "none":
            return StoredValue("none")
        if kind == "json":
            data = canonical_json(value)
            return StoredValue("json", inline=value) if len(data) <= INLINE_MAX else \
                StoredValue("json", blob=self.put_bytes(data))
        if kind == "bytes":
            return StoredValue("bytes", blob=self.put_bytes(bytes(value)))
        if kind == "file":
            return StoredValue("file", blob=self.put_file(value))
        raise InputError(f"value kind {kind!r} is unknown", "use json, bytes, file or none")

    def load_value(self, value: StoredValue) -> Any:
        """The JSON value, or bytes for kinds bytes/file; verified."""
        if value.blob is None:
            return value.inline
        data = self.get_bytes(value.blob.digest)
        return _decode_json_value(data, value.blob.digest) if value.kind == "json" else data

    # -- results and refs -------------------------------------------------------

    def put_result(self, result: ResultManifest) -> str:
        """Store a result whose blobs and tree are stored; returns its digest."""
        for d in result.blobs():
            if not self.backend.exists(object_name("blobs", d)):
                raise NotFound(f"blob {d} named by the result is not stored", "put the blob before the result")
        if result.output_tree and not self.backend.exists(object_name("trees", result.output_tree.digest)):
            raise NotFound(f"output tree {result.output_tree.digest} is not stored", "put_tree before the result")
        self.chunks.flush()
        body = result.to_dict()
        inline = self._inline_for(result)
        if inline:
            body["inline"] = {d: base64.b64encode(data).decode() for d, data in inline.items()}
        self.backend.put_if_absent(object_name("results", result.digest), seal(body))
        return result.digest

    def _inline_for(self, result: ResultManifest) -> dict[str, bytes]:
        """The small blobs a result names (value, stdout, stderr, then its tree's files) that this
        Store put and still remembers, up to INLINE_RESULT_MAX bytes in all: a hit then reads
        them from the result manifest, not from packs."""
        blobs = result.blobs()
        if result.output_tree:
            with self._small_lock:
                tree = self._trees_put.get(result.output_tree.digest)
            blobs += [e.digest for _, e in sorted(tree.entries.items())] if tree else []
        inline: dict[str, bytes] = {}
        room = INLINE_RESULT_MAX
        for d in dict.fromkeys(blobs):
            with self._small_lock:
                data = self._recent.get(d)
            if d != EMPTY_BLOB and data is not None and len(data) <= room:
                inline[d] = data
                room -= len(data)
        return inline

    def get_result(self, digest: str) -> ResultManifest:
        """The result, its address checked."""
        def check(data: bytes) -> ResultManifest:
            result, inline = _sealed(data, _result_and_inline)
            if result.digest != digest:
                raise _Damaged("its content does not hash to its address")
            for blob, content in inline.items():
                if b3(content) != blob:
                    raise _Damaged(f"its inline copy of blob {blob} does not hash to that digest")
            self._remember_inline(inline)
            return result

        return self._load(object_name("results", digest), check)

    def _remember_small(self, digest: str, data: bytes) -> None:
        """A small blob this Store just put (hashed here): a result naming it may inline it."""
        with self._small_lock:
            self._recent.keep(digest, data)

    def _remember_inline(self, inline: dict[str, bytes]) -> None:
        """Blobs a verified result manifest carried: reads of them need no request."""
        with self._small_lock:
            for digest, data in inline.items():
                self._inline.keep(digest, data)

    # -- attestations (what they say and whom to believe: memoplane.trust) ----------------

    def put_attestation(self, key: str, result_digest: str, envelope: bytes) -> str:
        """Add an attestation of (key, result); one already stored is never replaced.
        Returns its digest (what a ref lists)."""
        digest = b3(envelope)
        if self.backend.put_if_absent(attestation_name(key, result_digest, digest), envelope):
            self.audit(audit_log.ATTESTATION, key=key, result=result_digest, attestation=digest)
        return digest

    def attestations(self, key: str, result_digest: str, digests: Iterable[str] | None = None) -> list[bytes]:
        """The attestations of (key, result) named by `digests` (None: every one stored),
        each checked against its address; a missing one is skipped, a damaged one quarantined."""
        if digests is None:
            prefix = attestation_name(key, result_digest, None)
            digests = [digest_of_name(info.name) for info in self.backend.list(prefix)]
        found = []
        for digest in dict.fromkeys(digests):
            try:
                found.append(self._attestation(attestation_name(key, result_digest, digest), digest))
            except (NotFound, StoreCorrupted, InputError):
                continue
        return found

    def _attestation(self, name: str, digest: str) -> bytes:
        with self._small_lock:
            data = self._envelopes.get(name)
        if data is not None:
            return data

        def check(data: bytes) -> bytes:
            if b3(data) != digest:
                raise _Damaged("its content does not hash to its address")
            return data

        data = self._load(name, check)
        with self._small_lock:
            _keep(self._envelopes, name, data)
        return data

    # -- snapshots: trees kept by name, GC roots until dropped (gc.mark) -------------------

    def keep_snapshot(self, tree: BlobRef, sandbox: str, now: float | None = None) -> SnapshotEntry:
        """Name a stored tree as a snapshot (after making its data durable, as set_ref does)."""
        entry = SnapshotEntry(check_digest(tree.digest, "snapshot"), tree.size, sandbox,
                              time.time() if now is None else now)
        self.chunks.flush()
        self.backend.flush()
        self.backend.put(object_name(SNAPSHOTS, entry.tree), seal({"v": 1, **dataclasses.asdict(entry)}))
        return entry

    def snapshot(self, digest: str) -> SnapshotEntry | None:
        """The kept snapshot of that tree; None if it is not kept (never taken here, or dropped)."""
        try:
            return _snapshot_entry(self.backend.get(object_name(SNAPSHOTS, digest)), digest)
        except (NotFound, SealError, InputError, KeyError, TypeError, ValueError):
            return None

    def snapshots(self) -> list[SnapshotEntry]:
        """Every kept snapshot, oldest first (a damaged record is left out: its tree is not kept)."""
        kept = (self.snapshot(digest_of_name(info.name)) for info in self.backend.list(SNAPSHOTS + "/"))
        return sorted((e for e in kept if e is not None), key=lambda e: (e.created, e.tree))

    def drop_snapshot(self, digest: str) -> bool:
        """Stop keeping a snapshot: GC deletes its tree after the grace period unless something else
        reaches it. False if it was not kept."""
        name = object_name(SNAPSHOTS, check_digest(digest, "snapshot"))
        if not self.backend.exists(name):
            return False
        self.backend.delete(name)
        return True

    # -- refs ------------------------------------------------------------------------

    def set_ref(self, key: str, result_digest: str, attestations: Iterable[str] = ()) -> None:
        """Point `key` at a stored result (after making its data durable), listing
        `attestations` of it and those the ref already lists for the same result."""
        check_digest(key, "cache key")
        if not self.backend.exists(object_name("results", result_digest)):
            raise NotFound(f"result {result_digest} is not stored", "put_result before set_ref")
        current = self.read_ref_entry(key)
        listed = current.attestations if current is not None and current.result == result_digest else ()
        names = sorted(set(listed) | {check_digest(a, "attestation") for a in attestations})
        self.chunks.flush()
        self.backend.flush()
        body: dict[str, Any] = {"v": 1, "key": key, "result": result_digest}
        if names:
            body["attestations"] = names
        self.backend.put(ref_name(key), seal(body))
        self.audit(audit_log.REF, key=key, result=result_digest, attestations=names)

    def commit(self, result: ResultManifest, attestations: Iterable[bytes] = ()) -> str:
        """put_result, put_attestation of each envelope, then set_ref for its cache key;
        returns the result digest."""
        digest = self.put_result(result)
        signed = [self.put_attestation(result.key, digest, envelope) for envelope in attestations]
        self.set_ref(result.key, digest, signed)
        return digest

    def cache_keys(self) -> Iterator[str]:
        """Every cache key with a ref (in no particular order)."""
        for info in self.backend.list("refs/"):
            yield digest_of_name(info.name)

    def read_ref(self, key: str) -> str | None:
        """The result digest a ref names, unchecked; None if there is no ref."""
        entry = self.read_ref_entry(key)
        return entry.result if entry is not None else None

    def read_ref_entry(self, key: str) -> RefEntry | None:
        """What a ref says, unchecked; None if there is no ref (a malformed one is quarantined)."""
        name = ref_name(key)
        try:
            data = self.backend.get(name)
        except NotFound:
            return None
        try:
            body = unseal(data)
            if body.get("key") != key:
                raise SealError("it names another key")
            listed = body.get("attestations", [])
            if not isinstance(listed, list):
                raise SealError("its attestations are not a list")
            return RefEntry(check_digest(body.get("result"), "ref.result"),
                            tuple(check_digest(a, "ref.attestations") for a in listed))
        except (SealError, InputError) as e:
            self._quarantine(name, data, str(e))
            return None

    def get_ref(self, key: str, *, deep: bool = False) -> Hit | None:
        """A hit only if the result and everything it names is present and intact.

        Returns None (a miss) otherwise — the caller recomputes. A broken ref is
        quarantined (logged). Whether anyone vouches for it is the trust policy's call
        (memoplane.trust.trusted_hit); a reader never serves a bare get_ref.
        `deep=True` also re-hashes every blob instead of checking chunks exist.
        """
        entry = self.read_ref_entry(key)
        if entry is None:
            return None
        digest = entry.result
        try:
            result = self._hit_result(digest)
            if result.key != key:
                raise StoreCorrupted(f"result {digest} answers key {result.key}, not {key}")
            self._check_complete(result, deep)
        except (NotFound, StoreCorrupted) as e:
            log.warning("ref %s not served: %s", key, e)
            self._quarantine_ref(key, digest)
            return None
        return Hit(key, digest, result, entry.attestations)

    def _hit_result(self, digest: str) -> ResultManifest:
        with self._small_lock:
            result = self._hit_results.get(digest)
        if result is None:
            result = self.get_result(digest)
            with self._small_lock:
                _keep(self._hit_results, digest, result)
        return result

    def _quarantine_ref(self, key: str, digest: str) -> None:
        name = ref_name(key)
        try:
            data = self.backend.get(name)
        except NotFound:
            return
        if digest.encode() in data:  # not re-pointed by a writer meanwhile
            self._quarantine(name, data, f"it names {digest}, which is missing or damaged")

    def _check_complete(self, result: ResultManifest, deep: bool) -> None:
        # The empty blob needs no check: its digest names its (empty) content; nor does a blob
        # the (verified) result manifest carried inline.
        blobs = list(dict.fromkeys(result.blobs()))
        if result.output_tree:
            blobs = list(dict.fromkeys(blobs + self.get_tree(result.output_tree.digest).blobs()))
        with self._small_lock:
            blobs = [d for d in blobs if d != EMPTY_BLOB and d not in self._inline]
        if deep:
            for d in blobs:
                for _ in self.iter_blob(d):
                    pass
            return
        # On an object store a manifest read is a round trip: fan them out over the pool (a hit
        # with one small value stays a handful of sequential calls). Chunks are checked against
        # the in-memory pack index, not one by one.
        work, _ = self._pools.get() if len(blobs) > 2 else (None, None)
        manifests = list(work.map(self.blob_manifest, blobs)) if work else [self.blob_manifest(d) for d in blobs]
        owner = {c: d for d, m in zip(blobs, manifests, strict=True) for c, _n in m.chunks}
        missing = self.chunks.missing(owner, self._pools.get()[0])
        if missing:
            raise NotFound(f"chunk {missing[0]} of blob {owner[missing[0]]} is missing")

    def withdraw_ref(self, key: str, result_digest: str, reason: str) -> bool:
        """Stop serving `key` (a dispute): its ref moves to quarantine/ with `reason`, if it still
        names `result_digest` (a writer may have re-pointed it meanwhile). True if it was moved."""
        name = ref_name(key)
        try:
            data = self.backend.get(name)
        except NotFound:
            return False
        entry = self.read_ref_entry(key)
        if entry is None or entry.result != result_digest:
            return False
        self._quarantine(name, data, reason)
        return True

    def delete_ref(self, key: str) -> None:
        self.backend.delete(ref_name(key))
        self.audit(audit_log.REF_DELETED, key=key)

    # -- maintenance (see gc.py) -------------------------------------------------

    def verify(self) -> VerifyReport:
        work, _ = self._pools.get()
        with self._not_uses():
            return maintenance.verify(self, work, self._read_legacy_chunk,
                                      lambda digest: self._check_complete(self.get_result(digest), deep=False),
                                      packed=self.chunks.scrub_checks())

    def gc(self, grace_seconds: float = 3600.0, *, results: Iterable[str] = (),
           blobs: Iterable[str] = ()) -> GcReport:
        """Sweep what no ref reaches; `results` and `blobs` (digests) are roots too."""
        with self._not_uses():   # a repack copying live chunks out of a cold pack does not re-warm it
            return maintenance.gc(self.backend, grace_seconds, results=results, blobs=blobs)

    def _not_uses(self) -> contextlib.AbstractContextManager[None]:
        """Maintenance reads are not uses: under a cold tier nothing they read is re-warmed or
        kept hot (tiers.py `scrub`)."""
        return self.backend.scrub() if isinstance(self.backend, TieredBackend) else contextlib.nullcontext()

    def stats(self) -> Stats:
        self.chunks.refresh()
        return maintenance.stats(self.backend, packed_chunks=len(self.chunks.index))

    def demote(self, now: float | None = None, limit: int | None = None) -> TierReport | None:
        """Move content not read for the cold tier's `after` there (tiers.py); None: no cold tier.
        `now`: the time to judge by (default the tier's clock); `limit`: moves at most."""
        if not isinstance(self.backend, TieredBackend):
            return None
        return tiers.demote(self.backend, now, limit)

    def evict_ref(self, key: str) -> str | None:
        """Retention removes `key`'s ref (its data goes at the next gc); the audit log says so.
        Returns the result it named (None: no ref)."""
        entry = self.read_ref_entry(key)
        if entry is None:
            return None
        self.backend.delete(ref_name(key))
        self.audit(audit_log.EVICTION, key=key, result=entry.result)
        return entry.result

    # -- the usage index (usage.py) -----------------------------------------------

    def record_uses(self, uses: list[Use]) -> None:
        """Append a batch of writes, hits and evictions to the usage log."""
        usage_log.append(self.backend, uses)

    def usage(self, index: UsageIndex | None = None) -> UsageIndex:
        """The usage index: `index` (kept by the caller) or the stored snapshot, with the uses
        logged since applied."""
        if index is None:
            return usage_log.load(self.backend)[0]
        return usage_log.merge(self.backend, index)[0]

    def save_usage(self, index: UsageIndex) -> None:
        """Compact: the snapshot becomes `index`; the batches it merged are deleted."""
        usage_log.save(self.backend, index)

    def refs_to_index(self, index: UsageIndex) -> dict[str, float]:
        """Check `index` against the refs present (one listing): entries whose ref is gone are
        dropped; returns the refs it lacks (key -> the ref's mtime), for index_refs."""
        present = {digest_of_name(i.name): i.mtime for i in self.backend.list("refs/")}
        for key in [k for k in index.entries if k not in present]:
            del index.entries[key]
        index.refs_indexed = False
        return {k: mtime for k, mtime in present.items() if k not in index.entries}

    def index_refs(self, index: UsageIndex, missing: dict[str, float], limit: int) -> int:
        """Add up to `limit` of the `missing` refs to `index` (reading each ref and its result, in
        parallel; last used = written = the ref's mtime, the best known), taking them out of
        `missing`. Returns how many are left (0: `index.refs_indexed` is set)."""
        batch = [k for k in list(missing)[:limit]]
        work, _ = self._pools.get()
        for key, size in zip(batch, work.map(self._logical_size, batch), strict=True):
            if size is not None and key not in index.entries:
                index.entries[key] = Entry(missing[key], missing[key], size)
            del missing[key]
        index.refs_indexed = not missing
        return len(missing)

    def _logical_size(self, key: str) -> int | None:
        """The logical size of what `key`'s ref names (None: no ref, or a damaged one)."""
        digest = self.read_ref(key)
        try:
            return self.get_result(digest).logical_size if digest else None
        except (NotFound, StoreCorrupted, InputError):
            return None

    def stored_bytes(self) -> int:
        """Bytes of every content object, pack, index segment and ref on the backend (a listing:
        nothing is read)."""
        return sum(i.size for prefix in maintenance.STORED for i in self.backend.list(prefix))

    def evict(self, max_age: float | None = None, max_bytes: int | None = None) -> EvictReport:
        def evicted(key: str, result: str) -> None:
            self.audit(audit_log.EVICTION, key=key, result=result)

        self.chunks.refresh()
        return maintenance.evict(self.backend, max_age=max_age, max_bytes=max_bytes, on_evict=evicted,
                                 chunk_bytes=self._packed_bytes())

    def _packed_bytes(self) -> dict[str, int]:
        """Stored bytes of each packed chunk by its `chunks/` name (what gc's marking names)."""
        return {object_name("chunks", d): loc.length for d, loc in self.chunks.index.entries()}


class ChunkStream(io.RawIOBase):
    """A readable binary stream over an iterator of byte strings (a blob's chunks)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks, self._pending = chunks, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _decode_json_value(data: bytes, digest: str) -> Any:
    """A stored JSON return value; canonical_json wrote it, so one that does not decode or
    nests deeper than MAX_JSON_DEPTH was not written by memoplane."""
    try:
        value = json.loads(data)
        if not json_depth_exceeds(value):
            return value
    except (ValueError, RecursionError):
        pass
    raise StoreCorrupted(f"the JSON value in blob {digest} is not JSON memoplane writes (bad or nested too deep)",
                         "recompute the result (memoplane run --policy Refresh)")


SPOT_CHECK_STREAKS = "spot-checks/streaks.json"
RUN_RECORDS = "history/runs/"


def _last_run_name(identity: str) -> str:
    return "runs/" + blake3.blake3(identity.encode()).hexdigest()


def _result_and_inline(body: dict[str, Any]) -> tuple[ResultManifest, dict[str, bytes]]:
    """A stored result and the blobs it carries inline (`inline`: digest -> base64; not part of
    the result's address, which names content only: each copy is checked against its digest)."""
    raw = body.pop("inline", None) or {}
    if not isinstance(raw, dict):
        raise InputError("result.inline is not an object", "recompute the result")
    try:
        inline = {check_digest(d, "result.inline"): base64.b64decode(v, validate=True) for d, v in raw.items()}
    except (TypeError, binascii.Error):
        raise InputError("result.inline holds a value that is not base64", "recompute the result") from None
    return ResultManifest.from_dict(body), inline


def _windows(chunks: Iterable[tuple[str, int]], size: int) -> list[list[str]]:
    """Chunk digests in order, cut into runs of about `size` plain bytes."""
    windows: list[list[str]] = [[]]
    filled = 0
    for digest, n in chunks:
        if filled >= size:
            windows.append([])
            filled = 0
        windows[-1].append(digest)
        filled += n
    return [w for w in windows if w]


def _read_up_to(stream: BinaryIO, limit: int) -> bytes:
    """Up to `limit` bytes of `stream` (fewer only at its end)."""
    parts, got = [], 0
    while got < limit:
        data = stream.read(limit - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


class _Prefixed(io.RawIOBase):
    """`head` followed by the rest of `stream`: a stream whose start was already read."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = memoryview(head)
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, into: Any) -> int:
        if self._head:
            n = min(len(into), len(self._head))
            into[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(into))
        into[:len(data)] = data
        return len(data)


def _snapshot_entry(data: bytes, digest: str) -> SnapshotEntry:
    body = unseal(data)
    entry = SnapshotEntry(check_digest(body["tree"], "snapshot.tree"), int(body["size"]), str(body["sandbox"]),
                          float(body["created"]))
    if entry.tree != digest:
        raise SealError("it names another tree")
    return entry


def _sealed(data: bytes, parse: Callable[[dict[str, Any]], T]) -> T:
    try:
        return parse(unseal(data))
    except (SealError, InputError) as e:
        raise _Damaged(str(e)) from None


_OWN_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_FLAGS = _OWN_DIR_FLAGS | os.O_NOFOLLOW
# O_NONBLOCK: a FIFO swapped in after the lstat must not block the open; fstat refuses it.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def open_directory(path: str | os.PathLike[str]) -> Iterator[int]:
    """A descriptor of the caller's own directory `path` (links in `path` are the caller's
    choice and followed); everything made below it is reached with O_NOFOLLOW."""
    fd = os.open(path, _OWN_DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_directory(path: str | os.PathLike[str]) -> Iterator[int]:
    """open_directory(path), made first if missing; InputError if it cannot be."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, _OWN_DIR_FLAGS)
    except OSError as e:
        raise InputError(f"cannot use {path} as the output directory: {e.strerror}",
                         "pass a new or empty directory") from None
    try:
        yield fd
    finally:
        os.close(fd)


def write_new_file(dir_fd: int, name: str, chunks: Iterable[bytes], *, executable: bool = False) -> None:
    """Create `name` in `dir_fd` (never through a link, never over an existing entry:
    FileExistsError) with mode 0o755 or 0o644, and write `chunks`; a failure removes it."""
    fd = os.open(name, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            for data in chunks:
                f.write(data)
            os.fchmod(f.fileno(), 0o755 if executable else 0o644)  # exact, whatever the umask
    except BaseException:
        _unlink_quietly(dir_fd, name)
        raise


def _unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


class _DirChain:
    """Descriptors of the directories leading to the file being written: consecutive
    files in one directory reuse them, and at most MAX_TREE_DEPTH are open at once."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.chain: list[tuple[str, int]] = []  # (name, fd) from the root down

    def open(self, parent: str) -> int:
        """The descriptor of `parent` (a relative path, "" for the root), made if missing."""
        parts = parent.split("/") if parent else []
        keep = 0
        while keep < min(len(parts), len(self.chain)) and self.chain[keep][0] == parts[keep]:
            keep += 1
        self._close_from(keep)
        for part in parts[keep:]:
            at = self.chain[-1][1] if self.chain else self.root_fd
            try:
                os.mkdir(part, 0o755, dir_fd=at)
            except FileExistsError:
                pass  # made for an earlier file, or planted: the open below refuses a link
            self.chain.append((part, os.open(part, _DIR_FLAGS, dir_fd=at)))
        return self.chain[-1][1] if self.chain else self.root_fd

    def _close_from(self, index: int) -> None:
        while len(self.chain) > index:
            os.close(self.chain.pop()[1])

    def __enter__(self) -> _DirChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_from(0)


def _tree_files(root_fd: int) -> Iterator[tuple[str, int]]:
    """(relative POSIX path, open read descriptor) of every regular file under `root_fd`,
    depth first, without recursion and without following links; the caller closes each
    descriptor. Raises InputError for links, other non-files, non-UTF-8 names, entries that
    change while they are read, and trees deeper than MAX_TREE_DEPTH or larger than
    MAX_TREE_ENTRIES."""
    stack: list[tuple[int, str, Iterator[str]]] = [(root_fd, "", iter(sorted(os.listdir(root_fd))))]
    seen = 0
    try:
        while stack:
            dir_fd, prefix, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                if dir_fd != root_fd:
                    os.close(dir_fd)
                continue
            rel = prefix + name
            seen += 1
            _check_walked(rel, seen, len(stack))
            is_dir, fd = _open_entry(dir_fd, name, rel)
            if is_dir:
                stack.append((fd, rel + "/", iter(sorted(os.listdir(fd)))))
            else:
                yield rel, fd
    finally:
        for dir_fd, _, _ in stack:
            if dir_fd != root_fd:
                os.close(dir_fd)


def _open_entry(dir_fd: int, name: str, rel: str) -> tuple[bool, int]:
    """(is a directory, descriptor) of `name` in `dir_fd`, never through a link."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise _not_a_file(rel, "a symbolic link")
        if stat.S_ISDIR(st.st_mode):
            return True, os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_a_file(rel, "not a regular file")
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as e:  # replaced by a link (ELOOP, ENOTDIR) or removed after the listing
        raise _not_a_file(rel, f"changed while it was read ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_a_file(rel, "changed while it was read (no longer a regular file)")
    return False, fd


def _check_walked(rel: str, seen: int, depth: int) -> None:
    if depth > MAX_TREE_DEPTH:
        raise InputError(f"output {short_path(rel)} is nested more than {MAX_TREE_DEPTH} directories deep",
                         f"keep output files at most {MAX_TREE_DEPTH} directories deep")
    if seen > MAX_TREE_ENTRIES:
        raise InputError(f"the output tree has more than {MAX_TREE_ENTRIES} files and directories",
                         "write fewer, larger files (e.g. one archive)")
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"output file name {short_path(rel)} is not UTF-8", "name output files in UTF-8") from None


def _not_a_file(rel: str, what: str) -> InputError:
    return InputError(f"output {short_path(rel)} is {what}",
                      "write regular files and directories only; stored trees never hold links")
