"""The `memoplane gmem ...` argument parser, apart from the commands so that building
the CLI's parser never imports numpy (the commands live in memoplane.commands.gmem)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], lazy: Any, store_flag: Any) -> None:
    gmem = sub.add_parser("gmem", help="generative memory: values computed from a seed, with durable overrides")
    commands = gmem.add_subparsers(dest="gmem_command", required=True, metavar="COMMAND")

    def command(name: str, handler: str, text: str, cluster: bool = True) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=text)
        p.add_argument("name", help="the seed's name")
        store_flag(p)
        if cluster:
            p.add_argument("--cluster", action="store_true",
                           help="the GMemSeed NAME on the current kubeconfig's cluster (store: MEMOPLANE_S3_*)")
            p.add_argument("-n", "--namespace", help="the GMemSeed's namespace (implies --cluster)")
            p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                           help="with --cluster: how long to wait for the operator (default 120)")
        p.set_defaults(handler=lazy("memoplane.commands.gmem", handler))
        return p

    p = command("create", "create_command", "bind a name to a seed, dtype and layers")
    p.add_argument("--seed", type=lambda s: int(s, 0), required=True)
    p.add_argument("--dtype", choices=["float64", "float32", "uint64"], default="float64")
    p.add_argument("--layer", action="append", default=[], metavar="SEED[:WEIGHT]")
    p = command("fetch", "fetch_command", "values at a range of addresses or at given ones")
    p.add_argument("--offset", type=lambda s: int(s, 0), default=0)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--addr", action="append", default=[], help="an address (repeatable; overrides --offset)")
    p.add_argument("--out", metavar="FILE.npy", help="save the values as a numpy file")
    p = command("write", "write_command", "override values: ADDR=VALUE ... (durable when it returns)")
    p.add_argument("pairs", nargs="+", metavar="ADDR=VALUE")
    command("stats", "stats_command", "digest, version and overlay entries")
    command("compact", "compact_command", "snapshot the overlay into the store and drop the logs it covers",
            cluster=False)  # on a cluster the operator compacts
