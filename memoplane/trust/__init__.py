"""Who vouches for a result, and whom a reader believes (DESIGN §11).

Whoever can write the store is not trusted; keys are. A computed result is attested by the
key of whoever computed it (attestation: an in-toto statement in a DSSE envelope, Ed25519),
and a reader serves a ref only if its trust policy accepts enough of those attestations
(policy.judge). `trusted_hit` is the one way a reader looks a key up.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cas import Hit, Store
from .keys import PublicKey, SigningKey, check_keyid, next_keyid, split_keyid
from .policy import Refusal, TrustPolicy, Verdict, judge

__all__ = ["Lookup", "PublicKey", "Refusal", "SigningKey", "TrustPolicy", "Verdict", "check_keyid", "judge",
           "next_keyid", "split_keyid", "trusted_hit"]


@dataclass(frozen=True)
class Lookup:
    hit: Hit | None          # served only when the policy trusts it
    verdict: Verdict | None  # None: no ref (or a broken one) — nothing to judge

    @property
    def refused(self) -> bool:
        """A stored result was found and not trusted."""
        return self.verdict is not None and not self.verdict.trusted


def trusted_hit(store: Store, key: str, policy: TrustPolicy, *, deep: bool = False) -> Lookup:
    """A hit that `policy` trusts, or a miss with the verdict that refused it.

    The attestations the ref lists are judged first (cached by address: a repeated hit costs
    no extra read); if they are not enough, every stored attestation of the result is."""
    hit = store.get_ref(key, deep=deep)
    if hit is None:
        return Lookup(None, None)
    verdict = judge(policy, key, hit.digest, store.attestations(key, hit.digest, hit.attestations))
    if not verdict.trusted:
        verdict = judge(policy, key, hit.digest, store.attestations(key, hit.digest))
    return Lookup(hit if verdict.trusted else None, verdict)
