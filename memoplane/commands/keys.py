"""`memoplane keys ...` and `memoplane trust ...`: the embedded keyring and whom it trusts (trust.local)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cas import open_store
from ..cas.audit import REVOCATION
from ..errors import InputError
from ..trust.local import Keyring


def keys_list(args: argparse.Namespace) -> int:
    keyring = Keyring()
    keys = keyring.keys()
    if args.json:
        print(json.dumps({"directory": str(keyring.directory), "keys": [k.to_dict() for k in keys]}, sort_keys=True))
        return 0
    print(f"{'KEYID':<40} {'PRIVATE':<8} STATE")
    for k in keys:
        print(f"{k.keyid:<40} {'yes' if k.private else 'no':<8} {k.state}")
    print(f"(in {keyring.directory}; `memoplane keys export` prints your public key for colleagues)")
    return 0


def keys_export(args: argparse.Namespace) -> int:
    key = Keyring().public(args.keyid)
    if args.json:
        print(json.dumps({"keyid": key.keyid, "publicKey": key.pem()}, sort_keys=True))
        return 0
    sys.stdout.write(key.pem())
    print(f"memoplane: a colleague trusts it with: memoplane trust add {key.keyid} FILE", file=sys.stderr)
    return 0


def keys_create(args: argparse.Namespace) -> int:
    key = Keyring().create(args.name)
    return _said(args, {"keyid": key.keyid, "signing": True},
                 f"created {key.keyid}: trusted, and new results are signed with it")


def keys_rotate(args: argparse.Namespace) -> int:
    old, key = Keyring().rotate(args.keyid)
    return _said(args, {"rotated": old, "keyid": key.keyid, "signing": True},
                 f"rotated {old} to {key.keyid}: new results are signed with {key.keyid}; what {old} signed still "
                 f"counts (`memoplane keys revoke {old}` if it leaked)")


def keys_revoke(args: argparse.Namespace) -> int:
    rotated = Keyring().revoke(args.keyid)
    text = f"revoked {args.keyid}: results it signed are no longer trusted and recompute on their next run"
    with open_store() as store:  # the store's audit log, if it keeps one, says when
        store.audit(REVOCATION, keyid=args.keyid)
    if rotated is not None:
        text += f"; it was your signing key, new results are signed with {rotated.keyid}"
    return _said(args, {"revoked": args.keyid, "signing": rotated.keyid if rotated else None}, text)


def trust_add(args: argparse.Namespace) -> int:
    key = Keyring().trust(args.keyid, _public_key_text(args.public_key))
    return _said(args, {"trusted": key.keyid}, f"trusted {key.keyid}: results it signs are hits for you")


def trust_remove(args: argparse.Namespace) -> int:
    Keyring().distrust(args.keyid)
    return _said(args, {"removed": args.keyid}, f"no longer trusting {args.keyid}")


def trust_min_signatures(args: argparse.Namespace) -> int:
    Keyring().require(args.count)
    return _said(args, {"minSignatures": args.count},
                 f"a stored result is a hit only if {args.count} distinct trusted key(s) signed it")


def trust_list(args: argparse.Namespace) -> int:
    keyring = Keyring()
    policy = keyring.policy()
    keys = [k for k in keyring.keys() if k.trusted or k.revoked]
    if args.json:
        print(json.dumps({"minSignatures": policy.min_signatures, "trusted": sorted(policy.keys),
                          "revoked": sorted(policy.revoked), "keys": [k.to_dict() for k in keys]}, sort_keys=True))
        return 0
    print(f"{'KEYID':<40} STATE")
    for k in keys:
        print(f"{k.keyid:<40} {k.state}")
    print(f"a stored result is a hit when {policy.min_signatures} distinct trusted, unrevoked key(s) signed it")
    return 0


def _public_key_text(given: str) -> str:
    """A file holding the key, `-` for stdin, or the key itself (PEM or base64)."""
    if given == "-":
        return sys.stdin.read()
    if "BEGIN" in given or (len(given) == 44 and given.endswith("=")):
        return given
    path = Path(given).expanduser()
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise InputError(f"cannot read the public key file {given} ({reason})",
                         "pass the file `memoplane keys export` wrote, - for stdin, or the PEM itself") from None


def _said(args: argparse.Namespace, out: dict[str, object], text: str) -> int:
    print(json.dumps(out, sort_keys=True) if args.json else text)
    return 0
