"""Digest strings ("b3:<64 hex>") and the object names derived from them."""

from __future__ import annotations

import re

from ..errors import InputError
from ..keys import DIGEST_PATTERN
from ..keys import DIGEST_PREFIX as PREFIX
from ..keys import digest_bytes as b3  # one digest function for keys and store

__all__ = ["PREFIX", "attestation_name", "b3", "check_digest", "digest_of_name", "object_name", "ref_name"]

_DIGEST = re.compile(DIGEST_PATTERN)


def check_digest(value: object, field: str = "digest") -> str:
    """Return `value` if it is a digest string, else raise naming the field."""
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise InputError(
            f"{field}: {value!r} is not a digest",
            'use "b3:" followed by 64 lowercase hex digits',
        )
    return value


def object_name(kind: str, digest: str) -> str:
    """Backend name of a content-addressed object: `<kind>/<2 hex>/<64 hex>`.

    The 2-hex fan-out keeps directories small on filesystems and spreads S3 keys.
    """
    hex_ = check_digest(digest)[3:]
    return f"{kind}/{hex_[:2]}/{hex_}"


def ref_name(key: str) -> str:
    return "refs/" + check_digest(key, "cache key")[3:]


def attestation_name(key: str, result: str, envelope: str | None) -> str:
    """`attestations/<key>/<result>/<envelope>`: an attestation of (key, result); the
    prefix of all of them with `envelope` None."""
    head = f"attestations/{check_digest(key, 'cache key')[3:]}/{check_digest(result, 'result')[3:]}/"
    return head if envelope is None else head + check_digest(envelope, "attestation")[3:]


def digest_of_name(name: str) -> str:
    """Inverse of object_name / ref_name."""
    return PREFIX + name.rsplit("/", 1)[-1]
