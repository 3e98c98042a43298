"""Ed25519 signing keys named with an epoch (DESIGN §11).

A key's id is its name and epoch, `node-a-1`: rotating makes `node-a-2`, and revoking names
one epoch, so what `node-a-1` signed stops counting while `node-a-2` keeps working. A public
key travels as PEM (SubjectPublicKeyInfo) or as the 32 raw bytes in base64; a private key is
PKCS#8 PEM, never encrypted (it sits in a 0600 file or a Secret).
"""

from __future__ import annotations

import base64
import binascii
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import InputError

KEYID_PATTERN = re.compile(r"^(?P<name>[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)-(?P<epoch>[1-9][0-9]{0,8})$")
KEYID_RULE = "a lowercase name and an epoch, e.g. node-a-1"


def check_keyid(keyid: object, field: str = "keyid") -> str:
    if not isinstance(keyid, str) or not KEYID_PATTERN.match(keyid):
        raise InputError(f"{field} {keyid!r} is not a key id", f"name keys as {KEYID_RULE}")
    return keyid


def split_keyid(keyid: str) -> tuple[str, int]:
    """`node-a-3` -> ("node-a", 3)."""
    match = KEYID_PATTERN.match(check_keyid(keyid))
    assert match is not None
    return match["name"], int(match["epoch"])


def next_keyid(keyid: str) -> str:
    """The id of the key that replaces `keyid` when it rotates."""
    name, epoch = split_keyid(keyid)
    return f"{name}-{epoch + 1}"


@dataclass(frozen=True)
class PublicKey:
    keyid: str
    raw: bytes  # the 32-byte Ed25519 public key

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    def pem(self) -> str:
        key = Ed25519PublicKey.from_public_bytes(self.raw)
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    @property
    def base64(self) -> str:
        return base64.b64encode(self.raw).decode()

    @classmethod
    def parse(cls, keyid: str, text: str | bytes, field: str = "publicKey") -> PublicKey:
        """From PEM or from the raw 32 bytes in base64."""
        data = text.encode() if isinstance(text, str) else text
        check_keyid(keyid, f"{field} key id")
        if b"-----BEGIN" in data:
            try:
                key = serialization.load_pem_public_key(data)
            except ValueError:
                raise InputError(f"{field} of {keyid} is not a PEM public key", "paste the .pub file as it is") \
                    from None
            if not isinstance(key, Ed25519PublicKey):
                raise InputError(f"{field} of {keyid} is not an Ed25519 key", "use an Ed25519 key") from None
            return cls(keyid, key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        try:
            raw = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise InputError(f"{field} of {keyid} is neither PEM nor 32 bytes in base64",
                             "paste the .pub file (PEM) or the raw Ed25519 key in base64")
        return cls(keyid, raw)


@dataclass(frozen=True)
class SigningKey:
    keyid: str
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls, keyid: str) -> SigningKey:
        return cls(check_keyid(keyid), Ed25519PrivateKey.generate())

    @property
    def public(self) -> PublicKey:
        raw = self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return PublicKey(self.keyid, raw)

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)

    def pem(self) -> bytes:
        return self.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())

    @classmethod
    def parse(cls, keyid: str, pem: bytes, where: str = "private key") -> SigningKey:
        check_keyid(keyid, f"{where} key id")
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise InputError(f"{where} of {keyid} is not an unencrypted PEM private key",
                             "create keys with `memoplane keys create`") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InputError(f"{where} of {keyid} is not an Ed25519 key", "use an Ed25519 key") from None
        return cls(keyid, key)


def read_signing_key(path: Path, keyid: str, where: str, fix: str) -> SigningKey:
    """The private key of `keyid` in the file `path`, which only its owner may read: a key
    others can read may have leaked. `where` starts each error, `fix` says what to do when
    the file cannot be read."""
    try:
        mode = path.stat().st_mode
        pem = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{where}cannot read {path} ({exc.strerror})", fix) from None
    if mode & 0o077:
        raise InputError(f"{where}{path} is open to group or others (mode {stat.S_IMODE(mode):04o})",
                         f"chmod 600 {path}")
    return SigningKey.parse(keyid, pem, str(path))
