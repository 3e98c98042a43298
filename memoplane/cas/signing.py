"""Signing results, so a reader can refuse entries it did not (or a peer did not) write.

A signer signs a result's digest (blake3 of its canonical body, which includes
the cache key), so a valid signature binds the content to the key it answers.
"""

from __future__ import annotations

import hmac
from typing import Protocol, runtime_checkable

import blake3

from ..errors import InputError, StoreCorrupted

_CONTEXT = "memoplane result signing v1"


@runtime_checkable
class Signer(Protocol):
    def sign(self, message: bytes) -> str: ...

    def verify(self, message: bytes, signature: str) -> bool: ...


class SignatureInvalid(StoreCorrupted):
    """A result's signature is missing or wrong for this store's key.

    Not quarantined: a reader configured with the wrong key must not destroy
    entries that are valid for everyone else; it sees misses instead.
    """


class Blake3MacSigner:
    """A MAC with blake3's keyed mode (the HMAC role; blake3 needs no HMAC nesting
    since it has no length extension). The 32-byte key is derived from a secret
    of any length, so a Kubernetes Secret's bytes can be used as they are."""

    PREFIX = "b3mac:"

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise InputError("signing secret is shorter than 16 bytes", "use a random secret of 32 bytes or more")
        self._key = blake3.blake3(secret, derive_key_context=_CONTEXT).digest()

    def sign(self, message: bytes) -> str:
        return self.PREFIX + blake3.blake3(message, key=self._key).hexdigest()

    def verify(self, message: bytes, signature: str) -> bool:
        return hmac.compare_digest(self.sign(message), signature)
