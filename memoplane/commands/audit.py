"""`memoplane audit start | show | verify | sign`: the store's audit log (memoplane.cas.audit).

Key files are named after their key id: node-a-1.pub (public, PEM or raw base64) to verify,
node-a-1.pem (private, PKCS#8 PEM) to sign. The parser is built without importing the store,
so `memoplane --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..errors import InputError, StoreCorrupted


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], lazy: Any, store_flag: Any) -> None:
    audit = sub.add_parser("audit", help="the store's append-only, hash-chained log of ref writes, "
                                         "attestations, revocations, disputes and evictions")
    commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")

    def command(name: str, handler: str, text: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=text)
        store_flag(p)
        p.set_defaults(handler=lazy("memoplane.commands.audit", handler))
        return p

    command("start", "start_command", "start the log: from now on every writer of the store appends to it")
    p = command("show", "show_command", "print the records")
    p.add_argument("--since", type=int, default=1, metavar="N", help="from record N on (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per record")
    p.add_argument("--team", metavar="T", help="only the API calls of team T (`memoplane serve`)")
    p = command("verify", "verify_command", "check the chain and its signed checkpoints; exit 3 on any problem")
    p.add_argument("--key", action="append", default=[], metavar="PUBFILE",
                   help="a public key whose checkpoints count, in a file named KEYID.pub (repeatable)")
    p.add_argument("--json", action="store_true")
    p = command("sign", "sign_command", "sign the newest record (a checkpoint)")
    p.add_argument("--key", required=True, metavar="KEYFILE", help="a private key in a file named KEYID.pem")
    p.add_argument("--json", action="store_true")


def keyid_of_file(path: Path) -> str:
    from ..trust.keys import check_keyid

    keyid = path.name.split(".", 1)[0]
    try:
        return check_keyid(keyid)
    except InputError:
        raise InputError(f"--key {path}: {keyid!r} is not a key id", "name the key file KEYID.pub or KEYID.pem, "
                         "e.g. node-a-1.pub") from None


def read_key_file(path: str) -> tuple[str, bytes]:
    try:
        return keyid_of_file(Path(path)), Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"--key {path}: cannot read it ({e.strerror})", "pass a readable key file") from None


def start_command(args: argparse.Namespace) -> int:
    from ..cas import open_store
    from ..cas.audit import START

    with open_store(args.store) as store:
        if store.audit_log.started():
            print(f"the audit log of {store.describe()} is already started")
            return 0
        record = store.audit_log.append(START, {})
        print(f"started the audit log of {store.describe()} (record {record.seq})")
    return 0


def show_command(args: argparse.Namespace) -> int:
    from ..cas import open_store
    from ..cas.audit import API_CALL, parse_record
    from ..cas.digests import b3

    with open_store(args.store) as store:
        for seq, data in store.audit_log.read(args.since):
            try:
                body: dict[str, Any] = parse_record(data)
            except (ValueError, RecursionError):
                body = {"seq": seq, "unreadable": data[:200].decode("utf-8", "replace")}
            if args.team is not None and not (body.get("kind") == API_CALL and body.get("team") == args.team):
                continue
            if args.json:
                print(json.dumps({**body, "digest": b3(data)}, sort_keys=True))
            else:
                print(_line(seq, body))
    return 0


def _line(seq: int, body: dict[str, Any]) -> str:
    if "unreadable" in body:
        return f"{seq:>6}  UNREADABLE {body['unreadable']!r}"
    head = ("v", "seq", "time", "kind", "by", "prev")
    rest = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(body.items())
                    if k not in head)
    return f"{seq:>6}  {body.get('time', '?')}  {body.get('kind', '?'):<12} by={body.get('by', '?')}  {rest}".rstrip()


def verify_command(args: argparse.Namespace) -> int:
    from ..cas import open_store
    from ..trust import PublicKey
    from ..trust.audit import verify

    keys = None
    if args.key:
        keys = {}
        for path in args.key:
            keyid, text = read_key_file(path)
            keys[keyid] = PublicKey.parse(keyid, text, f"--key {path}")
    with open_store(args.store) as store:
        report = verify(store.audit_log, keys)
        if args.json:
            print(json.dumps({"ok": report.ok, "records": report.chain.records, "last": report.chain.last,
                              "newest_checkpoint": report.newest_checkpoint,
                              "signatures_checked": report.signatures_checked,
                              "problems": [{"seq": p.seq, "problem": p.text} for p in report.problems]},
                             sort_keys=True))
        else:
            for problem in report.problems:
                print(problem)
            checked = "" if report.signatures_checked else " (signatures not checked: pass --key)"
            unsigned = report.chain.last - report.newest_checkpoint
            print(f"{report.chain.records} record(s) in {store.describe()}, newest checkpoint at record "
                  f"{report.newest_checkpoint}{checked}; {unsigned} record(s) after it not yet signed")
            print("ok" if report.ok else f"{len(report.problems)} problem(s)")
    return 0 if report.ok else StoreCorrupted.exit_code


def sign_command(args: argparse.Namespace) -> int:
    from ..cas import open_store
    from ..trust import SigningKey
    from ..trust.audit import sign_head

    keyid, pem = read_key_file(args.key)
    signer = SigningKey.parse(keyid, pem, f"--key {args.key}")
    with open_store(args.store) as store:
        checkpoint = sign_head(store, signer, time.time())
        if args.json:
            print(json.dumps(None if checkpoint is None else
                             {"seq": checkpoint.seq, "digest": checkpoint.digest, "keyid": checkpoint.keyid},
                             sort_keys=True))
        elif checkpoint is None:
            print(f"the audit log of {store.describe()} is empty: nothing to sign")
        else:
            print(f"signed record {checkpoint.seq} ({checkpoint.digest}) with {checkpoint.keyid}")
    return 0
