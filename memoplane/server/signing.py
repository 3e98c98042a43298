"""Signed requests: HMAC-SHA256 over the key id, a timestamp, a nonce, the method, the path (with
its query) and the body's SHA-256 — what the server checks (access.py) and clients send (client.py).

Headers: X-Memoplane-Key, X-Memoplane-Timestamp (Unix seconds), X-Memoplane-Nonce (unique per
request: the server refuses one it saw within the clock window), X-Memoplane-Content-Sha256 (hex)
and X-Memoplane-Signature (hex).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_HEADER = "x-memoplane-key"
TIMESTAMP_HEADER = "x-memoplane-timestamp"
NONCE_HEADER = "x-memoplane-nonce"
BODY_HEADER = "x-memoplane-content-sha256"
SIGNATURE_HEADER = "x-memoplane-signature"
VERSION = "memoplane-hmac-v1"


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def string_to_sign(keyid: str, timestamp: str, nonce: str, method: str, target: str, digest: str) -> bytes:
    """`target` is the path as sent, with `?query` when there is one."""
    return "\n".join((VERSION, keyid, timestamp, nonce, method.upper(), target, digest)).encode()


def signature(key: bytes, message: bytes) -> str:
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(keyid: str, key: bytes, method: str, target: str, body: bytes, now: float,
         nonce: str | None = None) -> dict[str, str]:
    """The headers that sign one request."""
    timestamp, nonce = str(int(now)), nonce or secrets.token_hex(16)
    digest = body_digest(body)
    return {KEY_HEADER: keyid, TIMESTAMP_HEADER: timestamp, NONCE_HEADER: nonce, BODY_HEADER: digest,
            SIGNATURE_HEADER: signature(key, string_to_sign(keyid, timestamp, nonce, method, target, digest))}
