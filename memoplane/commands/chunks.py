"""`memoplane run SCRIPT --over-chunks NAME --combine FUNC`: a map over one large file's chunks."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..cas import Store
from ..chunkmap.embedded import run_chunk_map
from ..errors import InputError
from ..inputs import parse_bytes
from ..jobs import Job
from ..settings import CHUNK_TASK_BYTES, CHUNK_TASK_BYTES_ENV
from ..trust.local import Keyring


def chunk_flags_problem(args: argparse.Namespace) -> InputError | None:
    over, combine = getattr(args, "over_chunks", None), getattr(args, "combine", None)
    if over and not combine:
        return InputError("--over-chunks needs --combine", "name the script's combine(a, b) function: --combine FUNC")
    if combine and not over:
        return InputError("--combine is used only with --over-chunks", "add --over-chunks NAME (a file input)")
    return None


def task_bytes(args: argparse.Namespace) -> int:
    if args.chunk_bytes:
        return parse_bytes(args.chunk_bytes, "--chunk-bytes")
    return configured_task_bytes()


def configured_task_bytes() -> int:
    """The chunk target from MEMOPLANE_CHUNK_TASK_BYTES, else the default (as the operator reads it)."""
    text = os.environ.get(CHUNK_TASK_BYTES_ENV)
    return parse_bytes(text, CHUNK_TASK_BYTES_ENV) if text else CHUNK_TASK_BYTES


def workers(args: argparse.Namespace) -> int:
    count: int | None = getattr(args, "workers", None)
    if count is None:
        return min(4, os.cpu_count() or 1)
    if count < 1:
        raise InputError(f"--workers {count} is not positive", "give --workers a number of tasks of 1 or more")
    return count


def _once(start: Callable[[], Any]) -> Callable[[], Any]:
    """One sandbox pool for every node of the map, started at the first miss (by whichever thread gets there)."""
    started: list[Any] = []
    lock = threading.Lock()

    def get() -> Any:
        with lock:
            if not started:
                started.append(start())
            return started[0]
    return get


def run_chunks_command(args: argparse.Namespace, store: Store, job: Job, identity: str,
                       sandbox: Callable[[], Any]) -> int:
    keyring = Keyring()
    report = run_chunk_map(job, args.over_chunks, args.combine, store, _once(sandbox), policy=args.policy,
                           identity=identity, trust=keyring.policy(), signer=keyring.signer(),
                           target=task_bytes(args), workers=workers(args))
    value = report.value
    if args.json:
        print(json.dumps({"result": value, "chunks": report.to_json()}, sort_keys=True))
        return 0
    print(f"memoplane: {report.chunks} chunks: {report.leaf_runs} of {report.leaves} leaves and "
          f"{report.combine_runs} of {report.combines} combines computed, the rest served from the cache "
          f"(tree depth {report.depth})", file=sys.stderr)
    print(json.dumps(value, indent=2, sort_keys=True))
    return 0
