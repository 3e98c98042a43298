"""`memoplane gmem create | fetch | write | stats | compact`: generative memory in
the embedded store. A seed's parameters are bound to its name at `create`; later
commands read them back, so a name can never silently change its values.
With --cluster or -n NS, create/fetch/write/stats act on a GMemSeed (gmem_cluster)."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..cas import Store, open_store
from ..errors import InputError, NotFound
from ..gmem import GMemParams, GMemStore, Layer, StoredGMem
from ..gmem.transfer import overlay_npy
from ..jobs import BlobInput, SeedInput

PRINT_LIMIT = 10_000  # values printed as JSON; more go to --out FILE.npy


def _on_cluster(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "cluster", False) or getattr(args, "namespace", None))


def _local_dir(store: Store) -> Path:
    if store.local_root is None:
        raise InputError("gmem needs a local directory for its active log", "use a directory store (--store DIR)")
    return store.local_root / "gmem-active"


@contextlib.contextmanager
def opened(args: argparse.Namespace, params: GMemParams | None = None) -> Iterator[StoredGMem]:
    """The named seed, opened under an exclusive lock (one writer per name)."""
    with open_store(args.store) as store, open_named(store, args.name, params) as seed:
        yield seed


@contextlib.contextmanager
def open_named(store: Store, name: str, params: GMemParams | None = None) -> Iterator[StoredGMem]:
    gstore = GMemStore.of(store, _local_dir(store))
    lock_path = _local_dir(store) / f"{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        seed, _ = gstore.open(name, params or _bound_params(gstore, store, name))
        try:
            yield seed
        finally:
            seed.close()


def seed_input(store: Store, name: str, offset: int, count: int) -> SeedInput:
    """`memoplane run --input x=@seed:NAME:OFFSET:COUNT`: the seed's digest (parameters and
    overrides) and its overrides as a blob; the values are generated in the sandbox."""
    with open_named(store, name) as seed:
        data = overlay_npy(seed.gmem.overlay)
        digest, params = seed.digest(), seed.params.to_json()
    blob = store.put_bytes(data) if data is not None else None
    return SeedInput(params, digest, offset, count, BlobInput(blob.digest, blob.size) if blob else None)


def _bound_params(gstore: GMemStore, store: Store, name: str) -> GMemParams:
    params = gstore.bound_params(name)
    if params is None:
        raise NotFound(f"gmem {name!r} does not exist in {store.describe()}",
                       f"create it: memoplane gmem create {name} --seed N")
    return params


def _layer(text: str) -> Layer:
    seed, _, weight = text.partition(":")
    try:
        return Layer(int(seed, 0), float(weight or 1.0))
    except ValueError:
        raise InputError(f"--layer {text!r} is not SEED[:WEIGHT]", "write e.g. --layer 7:0.5") from None


def create_command(args: argparse.Namespace) -> int:
    params = GMemParams(args.seed, args.dtype, tuple(_layer(x) for x in args.layer))
    if _on_cluster(args):
        from . import gmem_cluster  # the cluster's clients load only when used

        return gmem_cluster.create(args, params)
    with opened(args, params) as seed:
        print(json.dumps({"name": args.name, **params.to_json(), **seed.status()}, sort_keys=True))
    return 0


def fetch_command(args: argparse.Namespace) -> int:
    if _on_cluster(args):
        from . import gmem_cluster  # the cluster's clients load only when used

        values = gmem_cluster.fetch(args)
    else:
        with opened(args) as seed:
            if args.addr:
                values = seed.gmem.fetch_many(np.array([int(a, 0) for a in args.addr], dtype=np.uint64))
            else:
                values = seed.gmem.fetch_range(args.offset, args.count)
    if args.out:
        np.save(args.out, values, allow_pickle=False)
        print(f"wrote {len(values)} values to {args.out}", file=sys.stderr)
    elif len(values) > PRINT_LIMIT:
        raise InputError(f"{len(values)} values are too many to print", "save them with --out FILE.npy")
    else:
        print(json.dumps(values.tolist()))
    return 0


def write_command(args: argparse.Namespace) -> int:
    addrs, values = [], []
    for pair in args.pairs:
        addr, sep, value = pair.partition("=")
        if not sep:
            raise InputError(f"{pair!r} is not ADDR=VALUE", "write e.g. 42=0.5")
        try:
            addrs.append(int(addr, 0))
            values.append(float(value) if any(c in value for c in ".eE") or value in ("nan", "inf") else int(value, 0))
        except ValueError:
            raise InputError(f"{pair!r}: address or value is not a number", "write e.g. 42=0.5 or 0x2a=7") from None
    if _on_cluster(args):
        from . import gmem_cluster  # the cluster's clients load only when used

        return gmem_cluster.write(args, addrs, values)
    with opened(args) as seed:
        seed.gmem.write_many(np.array(addrs, dtype=np.uint64), np.array(values))
        print(json.dumps(seed.status(), sort_keys=True))  # durable: write_many fsyncs its batch
    return 0


def stats_command(args: argparse.Namespace) -> int:
    if _on_cluster(args):
        from . import gmem_cluster  # the cluster's clients load only when used

        return gmem_cluster.stats(args)
    with opened(args) as seed:
        print(json.dumps({"name": args.name, **seed.params.to_json(), **seed.status()}, sort_keys=True))
    return 0


def compact_command(args: argparse.Namespace) -> int:
    with opened(args) as seed:
        snapshot = seed.compact()
        print(json.dumps({**seed.status(), "snapshot": snapshot}, sort_keys=True))
    return 0
