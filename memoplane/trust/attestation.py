"""Who vouches for a result: an in-toto Statement v1 with a SLSA provenance v1 predicate,
in a DSSE envelope signed with Ed25519 (DESIGN §11).

The statement's subject is the result manifest's digest; its external parameters are the
cache key's canonical manifest (KeyParts.components()), whose digest *is* the cache key, so
a signature binds the result to exactly the computation it answers. Code, inputs and runtime
are listed again as resolved dependencies for readers that know SLSA but not memoplane.

An envelope is stored as canonical JSON bytes; `read_envelope` takes any bytes and either
returns a checked `Attested` or says, in one word, why not (see REFUSALS).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..canonical import canonical_json
from ..keys import digest_value
from .keys import KEYID_PATTERN, PublicKey, SigningKey

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://memoplane.io/ComputeJob/v1"
BUILDER_PREFIX = "https://memoplane.io/builder/"
SUBJECT_NAME = "memoplane-result"
DIGEST_ALGORITHM = "blake3"  # in-toto DigestSet: lowercase algorithm name -> hex

# Why an attestation does not count (Verdict.refusals name these).
MALFORMED = "malformed"            # not a DSSE envelope of an in-toto statement we write
BAD_SIGNATURE = "bad-signature"    # the signature does not verify with the named key
UNKNOWN_KEY = "unknown-key"        # signed by a key the reader does not trust
REVOKED_KEY = "revoked-key"        # signed by a revoked epoch
OTHER_KEY = "other-cache-key"      # it vouches for another cache key
OTHER_RESULT = "other-result"      # it vouches for another result of this key
KEY_MISMATCH = "key-manifest-mismatch"  # its key manifest does not hash to the key it names


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _hex(digest: str) -> str:
    return digest.removeprefix("b3:")


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def statement(key: str, key_manifest: Mapping[str, Any], result_digest: str, builder: str,
              started_at: float, finished_at: float) -> dict[str, Any]:
    """The in-toto statement that `builder` computed `result_digest` for cache key `key`."""
    inputs = key_manifest.get("inputs") or {}
    # A map parent's key manifest lists its children's keys and has no code or runtime of its own.
    dependencies = [{"name": name, "digest": {DIGEST_ALGORITHM: _hex(str(key_manifest[name]))}}
                    for name in ("code", "runtime") if name in key_manifest]
    dependencies += [{"name": f"input:{name}", "digest": {DIGEST_ALGORITHM: _hex(str(entry).rsplit(":", 1)[-1])}}
                     for name, entry in sorted(inputs.items())]
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": SUBJECT_NAME, "digest": {DIGEST_ALGORITHM: _hex(result_digest)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"cacheKey": key, "keyManifest": dict(key_manifest)},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": BUILDER_PREFIX + builder},
                "metadata": {"invocationId": key, "startedOn": _rfc3339(started_at),
                             "finishedOn": _rfc3339(finished_at)},
            },
        },
    }


def sign_statement(body: Mapping[str, Any], signer: SigningKey) -> bytes:
    """A DSSE envelope (canonical JSON bytes) holding `body`, signed by `signer`."""
    payload = canonical_json(body)
    signature = signer.sign(pae(PAYLOAD_TYPE, payload))
    return canonical_json({
        "payload": base64.b64encode(payload).decode(),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [{"keyid": signer.keyid, "sig": base64.b64encode(signature).decode()}],
    })


def attest(key: str, key_manifest: Mapping[str, Any], result_digest: str, signer: SigningKey, builder: str,
           started_at: float, finished_at: float) -> bytes:
    return sign_statement(statement(key, key_manifest, result_digest, builder, started_at, finished_at), signer)


@dataclass(frozen=True)
class Signed:
    """An envelope's parts, parsed but not yet checked against anyone's keys."""

    keyid: str
    signature: bytes
    payload: bytes
    body: Mapping[str, Any]


@dataclass(frozen=True)
class Attested:
    """What a verified envelope says."""

    keyid: str
    key: str
    result: str
    builder: str
    started_on: str
    finished_on: str


class Refused(Exception):
    def __init__(self, reason: str, keyid: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.keyid = reason, keyid


def parse_envelope(data: bytes) -> Signed:
    """An envelope with exactly one signature and an in-toto statement inside; Refused(MALFORMED) else."""
    try:
        envelope = json.loads(data)
        signatures = envelope["signatures"]
        if envelope["payloadType"] != PAYLOAD_TYPE or not isinstance(signatures, list) or len(signatures) != 1:
            raise ValueError("not one in-toto signature")
        keyid = signatures[0]["keyid"]
        if not isinstance(keyid, str) or not KEYID_PATTERN.match(keyid):
            raise ValueError("bad keyid")
        payload = base64.b64decode(envelope["payload"], validate=True)
        signature = base64.b64decode(signatures[0]["sig"], validate=True)
        body = json.loads(payload)
        if not isinstance(body, dict) or body.get("_type") != STATEMENT_TYPE \
                or body.get("predicateType") != PREDICATE_TYPE:
            raise ValueError("not an in-toto SLSA provenance statement")
    except (ValueError, KeyError, TypeError, IndexError, binascii.Error, RecursionError):
        raise Refused(MALFORMED) from None
    return Signed(keyid, signature, payload, body)


def check(signed: Signed, public: PublicKey, key: str, result_digest: str) -> Attested:
    """`signed` verified with `public` and saying that it computed `result_digest` for `key`."""
    if not public.verify(signed.signature, pae(PAYLOAD_TYPE, signed.payload)):
        raise Refused(BAD_SIGNATURE, signed.keyid)
    try:
        build = signed.body["predicate"]["buildDefinition"]
        params = build["externalParameters"]
        subject = signed.body["subject"]
        run = signed.body["predicate"]["runDetails"]
        named_key, manifest = params["cacheKey"], params["keyManifest"]
        digests = [s["digest"].get(DIGEST_ALGORITHM) for s in subject if s.get("name") == SUBJECT_NAME]
        builder = str(run["builder"]["id"]).removeprefix(BUILDER_PREFIX)
        started, finished = str(run["metadata"]["startedOn"]), str(run["metadata"]["finishedOn"])
    except (KeyError, TypeError, AttributeError):
        raise Refused(MALFORMED, signed.keyid) from None
    if named_key != key:
        raise Refused(OTHER_KEY, signed.keyid)
    if not isinstance(manifest, dict) or digest_value(manifest) != key:
        raise Refused(KEY_MISMATCH, signed.keyid)
    if digests != [_hex(result_digest)]:
        raise Refused(OTHER_RESULT, signed.keyid)
    return Attested(signed.keyid, key, result_digest, builder, started, finished)
