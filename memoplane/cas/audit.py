"""The audit log (DESIGN §11): an append-only, hash-chained record, in the store, of every ref
write, attestation, revocation, dispute and eviction (and every object a read quarantined).

Layout (the store's; nothing else names these objects):
- audit/records/<seq, 12 digits>: canonical JSON {v, seq, time, kind, by, prev, ...subject fields};
  `prev` is the digest (b3) of record seq-1's bytes, GENESIS for record 1.
- audit/checkpoints/<seq, 12 digits>.<keyid>: a signed statement that record seq has a given
  digest (memoplane.trust.audit signs and checks them; the store only keeps them).

Many writers (agents on many nodes, the operator, the CLI) append to one chain: each claims the
next number with Backend.create, an atomic create-if-absent (os.link on a filesystem, a PUT with
If-None-Match: * on S3/MinIO), so exactly one record ever holds a number and the chain cannot fork.
A writer that loses a number reads the record that won it and tries the next one.

What the chain proves: a record that is edited, dropped or reordered breaks it at the next record
(whose `prev` no longer matches) or at a signed checkpoint; records after the newest checkpoint can
still be cut off or rewritten by whoever can write the store, so the head is signed periodically.
Writers append after the write they record succeeded: a crash in between loses that one record,
never the chain.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..canonical import canonical_json
from ..errors import InputError, MemoplaneError, NotFound
from .backend import Backend
from .digests import b3

RECORDS = "audit/records/"
CHECKPOINTS = "audit/checkpoints/"
SEQ_DIGITS = 12
GENESIS = "b3:" + "0" * 64  # what record 1 names as its predecessor
RECORD_VERSION = 1
MAX_RECORD_BYTES = 64 * 1024
RECHECK_SECONDS = 60.0  # how often a writer that found no log looks again (someone may start one)
MAX_ATTEMPTS = 10_000   # numbers a writer may lose in a row before it gives up

# Kinds the store writes itself; callers add others (REVOCATION and DISPUTE: memoplane.trust).
REF = "ref"                    # key, result, attestations: a ref was written
REF_DELETED = "ref-deleted"    # key
ATTESTATION = "attestation"    # key, result, attestation (the envelope's digest): a new one was stored
EVICTION = "eviction"          # key, result: retention removed a ref
QUARANTINE = "quarantine"      # object, quarantined_as, reason: a read found damage and moved it aside
REVOCATION = "revocation"      # keyid: a signing key epoch stopped counting
DISPUTE = "dispute"            # whatever shows what differed (job, key, digests, node)
SHARED_READ = "shared-read"    # key, result, reader (namespace), cache: a hit served to another namespace
START = "audit-start"          # record 1 when the log is started on purpose
API_CALL = "api-call"          # key, team, verb, method, path, sandbox, status, sizes, digest, seconds: one API call
RESERVED = ("v", "seq", "time", "kind", "by", "prev")
_KIND = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


def record_name(seq: int) -> str:
    return f"{RECORDS}{seq:0{SEQ_DIGITS}d}"


def checkpoint_name(seq: int, keyid: str) -> str:
    return f"{CHECKPOINTS}{seq:0{SEQ_DIGITS}d}.{keyid}"


def seq_of_name(name: str) -> int | None:
    """The number in a record's or checkpoint's name; None if the name is not one we write."""
    tail = name.rsplit("/", 1)[-1].split(".", 1)[0]
    return int(tail) if len(tail) == SEQ_DIGITS and tail.isdigit() else None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Record:
    seq: int
    digest: str            # b3 of `data`: what record seq+1 names as `prev`
    data: bytes
    body: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Problem:
    """One way the log is not what its writers wrote; `seq` names the record (or checkpoint)."""

    seq: int
    text: str

    def __str__(self) -> str:
        return self.text


def parse_record(data: bytes) -> dict[str, Any]:
    """A record's body; ValueError unless it is a canonical JSON object with the fields we write."""
    body = json.loads(data)
    if not isinstance(body, dict) or canonical_json(body) != data:
        raise ValueError("not canonical JSON")
    if body.get("v") != RECORD_VERSION or not isinstance(body.get("seq"), int) \
            or not isinstance(body.get("kind"), str) or not isinstance(body.get("prev"), str):
        raise ValueError("not a record of this version")
    return body


class AuditLog:
    """The audit log of the store on `backend`; records say they were written `by` whom."""

    def __init__(self, backend: Backend, by: str | None = None) -> None:
        self.backend = backend
        self.by = by or socket.gethostname()
        self._lock = threading.Lock()
        self._tail: tuple[int, str] | None = None  # (seq, digest) of the last record seen: a hint
        self._started = False
        self._looked_at = -RECHECK_SECONDS  # monotonic time of the last look for record 1

    # -- writing -------------------------------------------------------------------

    def started(self) -> bool:
        """Whether the store keeps an audit log (record 1 exists). Once seen it stays so; a "no" is
        looked at again after RECHECK_SECONDS, so writers pick up a log started meanwhile."""
        if not self._started and time.monotonic() - self._looked_at >= RECHECK_SECONDS:
            self._looked_at = time.monotonic()
            self._started = self.backend.exists(record_name(1))
        return self._started

    def append(self, kind: str, fields: Mapping[str, Any]) -> Record:
        """Add a record of `kind` with `fields` at the end of the chain; returns it."""
        if not _KIND.match(kind):
            raise InputError(f"audit record kind {kind!r} is not a kind", "use lowercase letters, digits and -")
        clash = sorted(set(fields) & set(RESERVED))
        if clash:
            raise InputError(f"audit record field {clash[0]!r} is reserved", f"name it otherwise than {RESERVED}")
        with self._lock:
            seq, prev = self._tail if self._tail is not None else self._find_tail(0)
            for _ in range(MAX_ATTEMPTS):
                body = {**fields, "v": RECORD_VERSION, "seq": seq + 1, "time": _now(), "kind": kind,
                        "by": self.by, "prev": prev}
                data = canonical_json(body)
                if len(data) > MAX_RECORD_BYTES:
                    raise InputError(f"an audit record of kind {kind} is {len(data)} bytes",
                                     f"keep records under {MAX_RECORD_BYTES} bytes (name big things by digest)")
                if self.backend.create(record_name(seq + 1), data) or self._is(seq + 1, data):
                    self._tail = (seq + 1, b3(data))
                    self._started = True
                    return Record(seq + 1, b3(data), data, body)
                seq, prev = self._find_tail(seq + 1)  # another writer took the number
        raise MemoplaneError(f"could not append to the audit log of {self.backend.describe()} in "
                             f"{MAX_ATTEMPTS} attempts", "check for a writer stuck in a loop")

    def _is(self, seq: int, data: bytes) -> bool:
        """Whether record seq holds `data` (a retried create whose first attempt went through)."""
        try:
            return self.backend.get(record_name(seq)) == data
        except NotFound:
            return False

    def _find_tail(self, known: int) -> tuple[int, str]:
        """(seq, digest) of the last record, searching forward from `known` (0, or a number that
        exists): doubling steps, then bisection, so a writer far behind needs O(log gap) probes."""
        lo, step = known, 1
        while self.backend.exists(record_name(lo + step)):
            lo, step = lo + step, step * 2
        hi = lo + step
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.backend.exists(record_name(mid)) else (lo, mid)
        if lo == 0:
            return 0, GENESIS
        try:
            return lo, b3(self.backend.get(record_name(lo)))
        except NotFound:  # removed meanwhile (tampering): chain to what is left
            return self._find_tail(0) if known else (0, GENESIS)

    # -- reading -------------------------------------------------------------------------

    def names(self) -> list[tuple[int | None, str]]:
        """(seq, name) of every object under audit/records/, in order (None: not a record name)."""
        return [(seq_of_name(info.name), info.name) for info in self.backend.list(RECORDS)]

    def read(self, since: int = 1) -> Iterator[tuple[int, bytes]]:
        """(seq, bytes) of the records numbered `since` or more, in order; unchecked."""
        for seq, name in self.names():
            if seq is not None and seq >= since:
                try:
                    yield seq, self.backend.get(name)
                except NotFound:  # removed while listing
                    continue

    def put_checkpoint(self, seq: int, keyid: str, envelope: bytes) -> bool:
        """Keep a signed checkpoint of record seq; an existing one is never replaced."""
        return self.backend.create(checkpoint_name(seq, keyid), envelope)

    def checkpoints(self) -> Iterator[tuple[int | None, str, bytes]]:
        """(seq, name, bytes) of every stored checkpoint, in order."""
        for info in self.backend.list(CHECKPOINTS):
            try:
                yield seq_of_name(info.name), info.name, self.backend.get(info.name)
            except NotFound:
                continue


# -- verifying the chain ------------------------------------------------------------------


@dataclass
class ChainReport:
    records: int = 0
    last: int = 0                                             # the highest record number present
    digests: dict[int, str] = field(default_factory=dict)     # seq -> digest of what is stored
    problems: list[Problem] = field(default_factory=list)


def verify_chain(log: AuditLog) -> ChainReport:
    """Every record checked against its name and its predecessor: one Problem per break."""
    report = ChainReport()
    expected, prev = 1, GENESIS
    for seq, name in log.names():
        if seq is None:
            report.problems.append(Problem(0, f"{name}: not a record name (planted)"))
            continue
        try:
            data = log.backend.get(name)
        except NotFound:
            continue
        if seq > expected:
            missing = f"record {expected}" if seq == expected + 1 else f"records {expected}-{seq - 1}"
            report.problems.append(Problem(expected, f"{missing} missing (dropped)"))
        digest = b3(data)
        report.records, report.last, report.digests[seq] = report.records + 1, seq, digest
        try:
            body = parse_record(data)
        except (ValueError, RecursionError):
            report.problems.append(Problem(seq, f"record {seq}: not a record memoplane writes (edited)"))
        else:
            if body["seq"] != seq:
                report.problems.append(Problem(seq, f"record {seq}: says it is record {body['seq']} (reordered)"))
            elif seq == expected and body["prev"] != prev:
                report.problems.append(Problem(seq, f"record {seq}: " + (
                    "does not start the chain (replaced)" if seq == 1 else
                    f"does not chain to record {seq - 1} (record {seq - 1} edited or replaced, or reordered)")))
        expected, prev = seq + 1, digest
    return report


def extend_chain(log: AuditLog, seq: int, digest: str) -> ChainReport:
    """The records after record seq (known to have `digest`), read one by one up to the first
    absent number: what a periodic signer checks, without listing or re-reading the whole log.
    (A record dropped after seq looks like the end here; a full verify_chain names it.)"""
    report = ChainReport(last=seq, digests={seq: digest})
    try:
        if seq and b3(log.backend.get(record_name(seq))) != digest:
            report.problems.append(Problem(seq, f"record {seq}: not what was checked before (edited)"))
            return report
    except NotFound:
        report.problems.append(Problem(seq, f"record {seq}: missing, though it was checked before (dropped)"))
        return report
    while True:
        try:
            data = log.backend.get(record_name(seq + 1))
        except NotFound:
            return report
        seq += 1
        try:
            body = parse_record(data)
            fits = body["seq"] == seq and body["prev"] == digest
        except (ValueError, RecursionError):
            fits = False
        if not fits:
            report.problems.append(Problem(seq, f"record {seq}: does not chain to record {seq - 1} (edited or planted)"))
            return report
        digest = b3(data)
        report.records, report.last, report.digests[seq] = report.records + 1, seq, digest
