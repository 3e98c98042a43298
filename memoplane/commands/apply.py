"""`memoplane apply -f FILE|DIR|-`: ComputeJob manifests run embedded, with the keys a cluster
derives for them (memoplane.commands.pipeline), one line per job as it finishes."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..canonical import canonical_json
from ..cas import open_store
from ..errors import InputError
from ..execute import SandboxRunner
from ..trust.local import Keyring
from . import manifests as mf
from .pipeline import Context, Outcome, apply, label

PREVIEW_CHARS = 120   # a JSON value up to this long is shown in the text output


def parse_objects(items: list[str]) -> dict[tuple[str, str], Path]:
    out = {}
    for item in items:
        where, sep, path = item.partition("=")
        bucket, slash, key = where.partition("/")
        if not sep or not slash or not bucket or not key or not path:
            raise InputError(f"--object {item!r} is not BUCKET/KEY=PATH", "e.g. --object data/t.parquet=./t.parquet")
        if not Path(path).is_file():
            raise InputError(f"--object {item!r}: {path} is not a file", "give the path of a local copy")
        out[(bucket, key)] = Path(path)
    return out


def load_all(sources: list[str]) -> mf.Manifests:
    merged = mf.Manifests()
    for source in sources:
        got = mf.load(source)
        for attr in ("jobs", "config_maps", "seeds"):
            mine, theirs = getattr(merged, attr), getattr(got, attr)
            twice = sorted(set(mine) & set(theirs))
            if twice:
                raise InputError(f"{source}: '{twice[0][1]}' in namespace '{twice[0][0]}' is also in an earlier -f",
                                 "give each object once")
            mine.update(theirs)
    return merged


@contextlib.contextmanager
def _pools(allow_unisolated: bool) -> Iterator[Callable[[str], Callable[[], SandboxRunner]]]:
    """One sandbox pool per runtime profile, started at the first job that misses."""
    pools: dict[str, Any] = {}

    def for_profile(profile: str) -> Callable[[], SandboxRunner]:
        def start() -> SandboxRunner:
            if profile not in pools:
                from ..sandbox import SandboxPool

                pools[profile] = SandboxPool(profile=profile, size=0, require_isolation=not allow_unisolated)
            pool: SandboxRunner = pools[profile]
            return pool
        return start

    try:
        yield for_profile
    finally:
        for pool in pools.values():
            pool.close()


def apply_command(args: argparse.Namespace) -> int:
    manifests = load_all(args.filename)
    objects = parse_objects(args.object)
    keyring = Keyring()
    with open_store(args.store) as store, _pools(args.allow_unisolated) as sandbox:
        ctx = Context(manifests, store, keyring.policy(), keyring.signer(), sandbox, objects)
        outcomes = apply(ctx, on_done=(lambda _: None) if args.json else _print_outcome)
        if args.json:
            print(json.dumps(report_json(outcomes), sort_keys=True))
        else:
            print(summary(outcomes, store.describe()))
    return 0 if all(o.ok for o in outcomes) else 1


def outcome_json(o: Outcome) -> dict[str, Any]:
    return {"namespace": o.ref[0], "name": o.ref[1], "state": o.state, "cacheKey": o.key, "result": o.result,
            "valueDigest": o.value_digest, "value": _jsonable(o.value), "runId": o.run_id,
            "upstreamChanged": o.changed, "earlyCutoff": bool(o.early_cutoff), "cutoffUpstreams": o.early_cutoff,
            "why": o.why, "message": o.message, "attempts": o.attempts, "map": o.map}


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"bytes": len(value)}
    try:
        canonical_json(value)
    except (TypeError, ValueError):
        return {"type": type(value).__name__}
    return value


def report_json(outcomes: list[Outcome]) -> dict[str, Any]:
    states = [o.state for o in outcomes]
    return {"jobs": [outcome_json(o) for o in outcomes],
            **{state: states.count(state) for state in ("computed", "cached", "failed", "skipped")}}


def _print_outcome(o: Outcome) -> None:
    print("\n".join(outcome_lines(o)), flush=True)


def outcome_lines(o: Outcome) -> list[str]:
    name = label(o.ref, mf.DEFAULT_NAMESPACE)
    if not o.ok:
        return [f"{name:<16} {o.state:<9} {o.message}"]
    head = f"{name:<16} {o.state:<9} key {_short(o.key)}  result {_short(o.result)}  run {o.run_id or '-'}"
    lines = [head]
    if o.early_cutoff:
        lines.append(f"  early cutoff: {', '.join(o.early_cutoff)} recomputed, its value unchanged: nothing ran")
    if o.changed:
        lines.append(f"  upstream changed: {', '.join(o.changed)}")
    if o.map:
        lines.append(f"  map: {o.map['total']} elements, {o.map['computed']} sub-tasks computed, "
                     f"{o.map['cached']} cached")
    lines += [f"  why: {why}" for why in o.why if o.state == "computed"]
    preview = json.dumps(_jsonable(o.value), sort_keys=True)
    if len(preview) <= PREVIEW_CHARS:   # a longer value: --json or `memoplane result` shows it
        lines.append(f"  value: {preview}")
    return lines


def _short(digest: str | None) -> str:
    return (digest or "-")[:15]


def summary(outcomes: list[Outcome], where: str) -> str:
    counts = report_json(outcomes)
    parts = [f"{counts[s]} {s}" for s in ("computed", "cached", "failed", "skipped") if counts[s]]
    return f"memoplane apply: {len(outcomes)} jobs: {', '.join(parts)} (store {where})"
