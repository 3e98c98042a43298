"""`memoplane result | verify | gc | cache stats`: the store from the command line."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from ..cas import Hit, Store, check_digest, namespaces, open_namespace, open_store
from ..cas.store import output_directory, write_new_file
from ..errors import InputError, NotFound, StoreCorrupted, Untrusted
from ..history.roots import kept_roots
from ..sandbox.types import VALUE_FILE_NAMES
from ..trust import TrustPolicy, judge_stored, trusted_hit, untrusted_refs
from ..trust.local import Keyring
from .render import render_value

UNTRUSTED_SHOWN = 5  # untrusted refs `verify` names in text; --json lists them all

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, flag: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise InputError(f"{flag} {text!r} is not a duration", "write e.g. 90s, 30m, 720h or 7d")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def find_result(store: Store, ref: str, policy: TrustPolicy) -> Hit:
    """A stored result by cache key (through its ref, only if `policy` trusts it) or by result digest
    (content-addressed: exactly what was asked for, whoever made it)."""
    check_digest(ref, "KEY_OR_DIGEST")
    found = trusted_hit(store, ref, policy)
    if found.hit is not None:
        return found.hit
    if found.refused and found.verdict is not None:
        raise Untrusted(f"the stored result of {ref} is not trusted ({found.verdict.reason})",
                        "run the job again to recompute it, or `memoplane trust add` its signer's key")
    try:
        result = store.get_result(ref)
    except NotFound:
        raise NotFound(f"{ref} is neither a cache key nor a result digest in {store.describe()}",
                       "check the value (memoplane run --json prints both), or the --store") from None
    return Hit(result.key, ref, result)


def result_command(args: argparse.Namespace) -> int:
    """`memoplane result KEY_OR_DIGEST`: a result in the local store (a job's name: commands.cluster)."""
    with open_store(args.store) as store:
        policy = Keyring().policy()
        hit = find_result(store, args.ref, policy)
        signers = judge_stored(store, policy, hit.key, hit.digest, hit.attestations).signers
        value = store.load_value(hit.result.value)
        if args.output:
            written = materialize_result(store, hit, value, Path(args.output))
        else:
            written = []
        shown = {"cache_key": hit.key, "result_digest": hit.digest,
                 "result": render_value(hit.result.value, value), "value_kind": hit.result.value.kind,
                 "compute_seconds": hit.result.provenance.duration_s, "node": hit.result.provenance.node,
                 "signers": list(signers), "written": written}
        if args.json:
            print(json.dumps(shown, sort_keys=True))
        else:
            if hit.result.value.kind != "none":
                print(json.dumps(shown["result"], indent=2, sort_keys=True))
            for path in written:
                print(f"wrote {path}")
            if not signers:
                print(f"memoplane: note: no key you trust signed {hit.digest[:15]}... (asked for by digest)",
                      file=sys.stderr)
    return 0




def materialize_result(store: Store, hit: Hit, value: Any, dest: Path) -> list[str]:
    """Output files into `dest`, plus the return value as return.json / .bin / .npy; every
    file is created new (O_EXCL | O_NOFOLLOW), so nothing is overwritten or written through
    a link. Returns the paths written."""
    written: list[str] = []
    outputs: set[str] = set()
    if hit.result.output_tree is not None:
        store.materialize(hit.result.output_tree.digest, dest)
        outputs = set(store.get_tree(hit.result.output_tree.digest).entries)
        written += [str(dest / rel) for rel in outputs]
    kind = hit.result.value.kind
    if kind in VALUE_FILE_NAMES:
        name = VALUE_FILE_NAMES[kind]
        data = json.dumps(value, sort_keys=True).encode() if kind == "json" else value
        try:
            with output_directory(dest) as dest_fd:
                write_new_file(dest_fd, name, [data])
        except FileExistsError:
            if name in outputs:
                raise InputError(f"the job wrote an output file named {name}, the name of the return value's file;"
                                 f" the output files are in {dest}", "print the return value without -o") from None
            raise InputError(f"{dest / name} already exists", "pass a new directory to -o") from None
        written.append(str(dest / name))
    return sorted(written)


def verify_command(args: argparse.Namespace) -> int:
    """Every object against its address, then every ref against the local trust policy."""
    with open_store(args.store) as store:
        report = store.verify()
        judged, untrusted = untrusted_refs(store, Keyring().policy())
        if args.json:
            out = report.to_dict()
            out["ok"] = report.ok and not untrusted
            out["trust"] = {"judged": judged, "untrusted": [
                {"key": u.key, "result": u.result, "reason": u.verdict.reason} for u in untrusted]}
            print(json.dumps(out, sort_keys=True))
        else:
            checked = ", ".join(f"{n} {kind}" for kind, n in sorted(report.checked.items())) or "nothing"
            print(f"checked {checked} in {store.describe()}; judged {judged} ref(s) by your trust policy")
            for damage in report.damaged:
                print(f"  DAMAGED {damage.name}: {damage.reason}")
            for u in untrusted[:UNTRUSTED_SHOWN]:
                print(f"  UNTRUSTED {u.key}: {u.verdict.reason}")
            if len(untrusted) > UNTRUSTED_SHOWN:
                print(f"  ... and {len(untrusted) - UNTRUSTED_SHOWN} more (--json lists them all)")
            if not report.ok:
                print(f"{len(report.damaged)} damaged object(s) quarantined; affected jobs recompute on their next run")
            if untrusted:
                print(f"{len(untrusted)} ref(s) not trusted (never served: they recompute on their next run); "
                      "`memoplane trust list` shows whom you trust")
            if report.ok and not untrusted:
                print("ok")
    if not report.ok:
        return StoreCorrupted.exit_code
    return Untrusted.exit_code if untrusted else 0


def gc_command(args: argparse.Namespace) -> int:
    from ..inputs import parse_bytes

    max_age = parse_duration(args.max_age, "--max-age") if args.max_age else None
    max_bytes = parse_bytes(args.max_bytes, "--max-bytes") if args.max_bytes else None
    with open_store(args.store) as store:
        out = _collect(store, args.grace, max_age, max_bytes)
        teams = namespaces(store)
    # Each namespace (a team of `memoplane serve`) is a store of its own: the store's sweep never
    # looks inside one, so each is collected in turn, its kept snapshots and history its roots.
    out["namespaces"] = {}
    for name in teams:
        with open_namespace(args.store, name) as namespace:
            out["namespaces"][name] = _collect(namespace, args.grace, max_age, max_bytes)
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    _print_collected(out, args.grace)
    for name, collected in out["namespaces"].items():
        print(f"namespace {name}:")
        _print_collected(collected, args.grace)
    return 0


def _collect(store: Store, grace: float, max_age: float | None, max_bytes: int | None) -> dict[str, Any]:
    evicted = store.evict(max_age=max_age, max_bytes=max_bytes) if (max_age or max_bytes) else None
    results, blobs = kept_roots(store)  # versions in history stay readable
    report = store.gc(grace_seconds=grace, results=results, blobs=blobs)
    moved = store.demote()   # after the sweep: nothing dead is moved
    return {"gc": report.to_dict(), "evict": evicted.to_dict() if evicted else None,
            "tier": moved.to_dict() if moved else None}


def _print_collected(out: dict[str, Any], grace: float) -> None:
    evicted, report, packs, moved = out["evict"], out["gc"], out["gc"]["packs"], out["tier"]
    if evicted:
        print(f"evicted {len(evicted['evicted'])} ref(s); {evicted['remaining']} remain")
    print(f"deleted {report['deleted']} object(s), {report['deleted_bytes']} bytes; "
          f"kept {report['live']} live and {report['kept_young']} younger than {grace:.0f} s")
    print(f"packs: {packs['packs_deleted']} deleted, {packs['packs_condemned']} condemned, "
          f"{packs['chunks_repacked']} chunk(s) repacked; {packs['bytes_reclaimed']} bytes reclaimed")
    if moved:
        print(f"moved {moved['moved']} object(s), {moved['bytes_moved']} bytes, not read for "
              f"{moved['after']:.0f} s to the cold tier {moved['cold']}; {moved['kept_hot']} kept hot"
              + (f"; {moved['failed']} did not copy back equal and stayed" if moved['failed'] else ""))


def stats_command(args: argparse.Namespace) -> int:
    with open_store(args.store) as store:
        stats = store.stats()
        if args.json:
            print(json.dumps({**stats.to_dict(), "store": store.describe()}, sort_keys=True))
            return 0
        print(f"store          {store.describe()}")
        print(f"entries        {stats.entries}")
        print(f"logical bytes  {stats.logical_bytes}")
        print(f"unique bytes   {stats.unique_bytes}")
        print(f"stored bytes   {stats.stored_bytes}")
        print(f"dedup ratio    {stats.dedup_ratio:.2f}x (logical / unique)")
        print(f"storage ratio  {stats.storage_ratio:.2f}x (logical / stored, with compression)")
    return 0
