"""A reader's trust policy and the decision it makes about a stored result (pure).

A ref is a hit only if at least `min_signatures` distinct trusted, unrevoked keys attest the
same result digest for the same cache key. Anything else is a miss, with the reasons each
attestation was refused, so a poisoned entry is recomputed, never served.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .attestation import REVOKED_KEY, UNKNOWN_KEY, Attested, Refused, check, parse_envelope
from .keys import PublicKey

UNSIGNED = "unsigned"                # no attestation at all
TOO_FEW_SIGNERS = "too-few-signers"  # some trusted signers, fewer than min_signatures


@dataclass(frozen=True)
class TrustPolicy:
    keys: Mapping[str, PublicKey]                      # keyid -> public key
    revoked: frozenset[str] = frozenset()              # keyids (name + epoch)
    min_signatures: int = 1

    def __post_init__(self) -> None:
        if self.min_signatures < 1:
            raise ValueError("min_signatures must be at least 1")

    @classmethod
    def of(cls, keys: Iterable[PublicKey], revoked: Iterable[str] = (), min_signatures: int = 1) -> TrustPolicy:
        return cls({k.keyid: k for k in keys}, frozenset(revoked), min_signatures)

    def public(self, keyid: str) -> PublicKey:
        if keyid in self.revoked:
            raise Refused(REVOKED_KEY, keyid)
        key = self.keys.get(keyid)
        if key is None:
            raise Refused(UNKNOWN_KEY, keyid)
        return key


@dataclass(frozen=True)
class Refusal:
    reason: str
    keyid: str | None = None

    def __str__(self) -> str:
        return f"{self.reason} ({self.keyid})" if self.keyid else self.reason


@dataclass(frozen=True)
class Verdict:
    trusted: bool
    signers: tuple[str, ...] = ()          # distinct trusted keyids that attest it
    refusals: tuple[Refusal, ...] = field(default_factory=tuple)
    attested: tuple[Attested, ...] = ()

    @property
    def reason(self) -> str:
        """One line: why it is not trusted ("" when it is)."""
        if self.trusted:
            return ""
        head = UNSIGNED if not self.signers and not self.refusals else TOO_FEW_SIGNERS
        detail = ", ".join(str(r) for r in self.refusals)
        return f"{head}: {len(self.signers)} trusted signer(s)" + (f"; refused: {detail}" if detail else "")


def judge(policy: TrustPolicy, key: str, result_digest: str, envelopes: Iterable[bytes]) -> Verdict:
    """Whether `envelopes` make (key, result_digest) a hit under `policy`."""
    signers: dict[str, Attested] = {}
    refusals: list[Refusal] = []
    for data in envelopes:
        try:
            signed = parse_envelope(data)
            attested = check(signed, policy.public(signed.keyid), key, result_digest)
        except Refused as refused:
            refusals.append(Refusal(refused.reason, refused.keyid))
            continue
        signers.setdefault(attested.keyid, attested)
    trusted = len(signers) >= policy.min_signatures
    return Verdict(trusted, tuple(sorted(signers)), tuple(refusals), tuple(signers.values()))
