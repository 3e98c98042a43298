"""Signed checkpoints of the store's audit log, and verifying the whole log (DESIGN §11).

The record chain lives in the store (memoplane.cas.audit); what it cannot prove alone is where
it ends. A checkpoint is a DSSE envelope, signed with an Ed25519 key (trust.keys), of
{seq, digest of record seq}: once record seq is checkpointed, dropping it or anything before it,
or editing any of them, is detected even without a later record. The operator signs the head
periodically (`sign_head`); `verify` checks the chain and every checkpoint.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..canonical import canonical_json
from ..cas import Store
from ..cas.audit import AuditLog, ChainReport, Problem, extend_chain, verify_chain
from ..errors import StoreCorrupted
from .attestation import pae
from .keys import KEYID_PATTERN, PublicKey, SigningKey

CHECKPOINT_TYPE = "application/vnd.memoplane.audit-checkpoint+json"
CHECKPOINT_KIND = "memoplane-audit-checkpoint/v1"


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    digest: str
    keyid: str
    signed_at: float


def checkpoint_envelope(seq: int, digest: str, signer: SigningKey, signed_at: float) -> bytes:
    payload = canonical_json({"_type": CHECKPOINT_KIND, "seq": seq, "digest": digest, "signedAt": signed_at})
    signature = signer.sign(pae(CHECKPOINT_TYPE, payload))
    return canonical_json({
        "payload": base64.b64encode(payload).decode(),
        "payloadType": CHECKPOINT_TYPE,
        "signatures": [{"keyid": signer.keyid, "sig": base64.b64encode(signature).decode()}],
    })


def sign_head(store: Store, signer: SigningKey, now: float) -> Checkpoint | None:
    """Sign the newest record of `store`'s audit log (None: the log is empty). A broken chain is
    never signed (StoreCorrupted names its first problem): a signature would bless the damage.
    Only the records after `signer`'s own newest checkpoint are read (the whole log the first time),
    so signing every few minutes costs the records written meanwhile."""
    log = store.audit_log
    mine = [c for c in (_holding(data, name, seq, signer) for seq, name, data in log.checkpoints()) if c]
    chain = extend_chain(log, mine[-1].seq, mine[-1].digest) if mine else verify_chain(log)
    if chain.problems:
        raise StoreCorrupted(f"the audit log of {store.describe()} is broken: {chain.problems[0]}",
                             "run `memoplane audit verify`; the head is not signed until that is explained")
    if not chain.last or (mine and chain.last == mine[-1].seq):
        return mine[-1] if mine else None
    seq, digest = chain.last, chain.digests[chain.last]
    log.put_checkpoint(seq, signer.keyid, checkpoint_envelope(seq, digest, signer, now))
    return Checkpoint(seq, digest, signer.keyid, now)


def _holding(data: bytes, name: str, seq: int | None, signer: SigningKey) -> Checkpoint | None:
    """The checkpoint in `data` if `signer` made it (its signature verifies) for the record it names."""
    try:
        checkpoint, payload, signature = read_checkpoint(data)
    except _Unreadable:
        return None
    if checkpoint.keyid != signer.keyid or checkpoint.seq != seq or \
            not signer.public.verify(signature, pae(CHECKPOINT_TYPE, payload)):
        return None
    return checkpoint


class _Unreadable(ValueError):
    pass


def read_checkpoint(data: bytes) -> tuple[Checkpoint, bytes, bytes]:
    """(what it says, the signed payload, the signature); _Unreadable if it is not a checkpoint."""
    try:
        envelope = json.loads(data)
        (sig,) = envelope["signatures"]
        if envelope["payloadType"] != CHECKPOINT_TYPE or not KEYID_PATTERN.match(sig["keyid"]):
            raise ValueError("not a checkpoint")
        payload = base64.b64decode(envelope["payload"], validate=True)
        body = json.loads(payload)
        if body["_type"] != CHECKPOINT_KIND or not isinstance(body["seq"], int) \
                or not isinstance(body["digest"], str) or not isinstance(body["signedAt"], int | float):
            raise ValueError("not a checkpoint of this version")
        return (Checkpoint(body["seq"], body["digest"], sig["keyid"], float(body["signedAt"])), payload,
                base64.b64decode(sig["sig"], validate=True))
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as e:
        raise _Unreadable(str(e)) from None


@dataclass
class AuditReport:
    chain: ChainReport
    checkpoints: list[Checkpoint] = field(default_factory=list)  # those that hold (signature checked if keys)
    signed: int = 0  # checkpoints whose signature verified with a given key, holding or not
    problems: list[Problem] = field(default_factory=list)
    signatures_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def newest_checkpoint(self) -> int:
        return max((c.seq for c in self.checkpoints), default=0)


def verify(log: AuditLog, keys: Mapping[str, PublicKey] | None) -> AuditReport:
    """The chain and every checkpoint. With `keys`, a checkpoint counts only if one of them signed
    it, and a log without such a checkpoint is a problem (nothing proves where it ends)."""
    report = AuditReport(verify_chain(log), signatures_checked=keys is not None)
    for seq, name, data in log.checkpoints():
        problem = _check_checkpoint(report, seq, name, data, keys)
        if problem is not None:
            report.problems.append(problem)
    if keys is not None and not report.signed and report.chain.records:
        report.problems.append(Problem(0, "no checkpoint signed by a given key: nothing proves where the log ends"))
    report.problems = sorted(report.chain.problems + report.problems, key=lambda p: p.seq)
    return report


def _check_checkpoint(report: AuditReport, seq: int | None, name: str, data: bytes,
                      keys: Mapping[str, PublicKey] | None) -> Problem | None:
    try:
        checkpoint, payload, signature = read_checkpoint(data)
    except _Unreadable:
        return Problem(seq or 0, f"{name}: not a signed checkpoint (edited or planted)")
    if seq != checkpoint.seq or not name.endswith("." + checkpoint.keyid):
        return Problem(seq or 0, f"{name}: signs record {checkpoint.seq} by {checkpoint.keyid} (moved)")
    if keys is not None:
        public = keys.get(checkpoint.keyid)
        if public is None:
            return Problem(seq, f"checkpoint {seq}: signed by {checkpoint.keyid}, not a given key (forged?)")
        if not public.verify(signature, pae(CHECKPOINT_TYPE, payload)):
            return Problem(seq, f"checkpoint {seq}: its signature does not verify with {checkpoint.keyid} (forged)")
        report.signed += 1
    stored = report.chain.digests.get(seq)
    if stored is None:
        return Problem(seq, f"record {seq}: missing, though checkpoint {seq} ({checkpoint.keyid}) signed it "
                            f"(the log was cut at {report.chain.last})")
    if stored != checkpoint.digest:
        return Problem(seq, f"record {seq}: not what checkpoint {seq} ({checkpoint.keyid}) signed (edited)")
    report.checkpoints.append(checkpoint)
    return None
