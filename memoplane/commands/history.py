"""`memoplane history | lineage | diff | stale`, `history prune`, and `explain --cluster`: the
history queries (memoplane.history.queries) over the index of a store's run records.

Embedded (default): the local store (--store). With --cluster: the store of a ResultCache of
the current kubeconfig's cluster (the job's, else the namespace's `default`, or --cache); its
records are synced into a local index (memoplane.settings.history_index_path) first.
The parser is built without importing the store, so `memoplane --help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import InputError

PRUNE = "prune"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], lazy: Any, store_flag: Any) -> None:
    def command(name: str, handler: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        _where(p, store_flag)
        p.set_defaults(handler=lazy("memoplane.commands.history", handler))
        return p

    p = command("history", "history_command", "every run of a job, newest first: key, result, when, cached, "
                                               "and why the key changed; `history prune --older-than 720h` "
                                               "drops old records")
    p.add_argument("job", metavar="JOB", help="a script (embedded), a job label as history shows it, or a "
                                              "ComputeJob's name or ns/name (--cluster)")
    p.add_argument("--entrypoint", "-e", default="main", help="with a script: its entrypoint (default: main)")
    p.add_argument("--older-than", metavar="DURATION", help="with `prune`: drop records older than this, e.g. 720h")

    p = command("lineage", "lineage_command", "the exact runs upstream (that produced) or downstream (that "
                                              "consumed) a run, a result or a job's newest run")
    p.add_argument("direction", choices=["up", "down"])
    p.add_argument("target", metavar="TARGET", help="a run id, a result digest (b3:...) or a job")
    p.add_argument("--depth", type=int, default=20, metavar="N", help="how many steps (default 20)")
    p.add_argument("--entrypoint", "-e", default="main", help="with a script: its entrypoint (default: main)")

    p = command("diff", "diff_command", "what differs between two runs: code lines, inputs, env, runtime, "
                                        "then the outputs (JSON paths, files)")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")

    p = command("stale", "stale_command", "which results would change if an input had this content, "
                                          "before running anything")
    p.add_argument("--input", "-i", required=True, metavar="NAME=@FILE|NAME=JSON", help="the input's new content")
    p.add_argument("--job", metavar="JOB", help="only runs of this job take the new content (default: any)")
    p.add_argument("--entrypoint", "-e", default="main", help="with a script as --job: its entrypoint")


def _where(p: argparse.ArgumentParser, store_flag: Any) -> None:
    store_flag(p)
    p.add_argument("--cluster", action="store_true",
                   help="query the history of a ResultCache on the current kubeconfig's cluster")
    p.add_argument("-n", "--namespace", help="with --cluster: the namespace (default: the context's)")
    p.add_argument("--cache", metavar="RESULTCACHE",
                   help="with --cluster: the ResultCache (default: the job's, else `default`)")


def add_explain_flags(p: argparse.ArgumentParser) -> None:
    """`memoplane explain --cluster JOB`: the embedded parser's flags, plus these."""
    p.add_argument("--cluster", action="store_true",
                   help="SCRIPT is a ComputeJob (name or ns/name): why its newest run missed, against the one before")
    p.add_argument("-n", "--namespace", help="with --cluster: the namespace (default: the context's)")
    p.add_argument("--cache", metavar="RESULTCACHE", help="with --cluster: the ResultCache (default: the job's)")


# -- where the records are ---------------------------------------------------------------------

@contextmanager
def _opened(args: argparse.Namespace, job: str | None = None) -> Iterator[tuple[Any, Any, str]]:
    """(store, synced index, namespace or "") for the command's flags."""
    from ..history.index import open_index

    if getattr(args, "cluster", False):
        store, namespace = _cluster_store(args, job)
    else:
        from ..cas import open_store

        store, namespace = open_store(args.store), ""
    with store, open_index(store) as index:
        yield store, index, namespace


def _cluster_store(args: argparse.Namespace, job: str | None) -> tuple[Any, str]:
    from ..cluster.decide import default_cache
    from ..cluster.protocol import DEFAULT_RESULT_CACHE
    from ..errors import NotFound
    from .cluster import cache_store
    from .kube import GROUP, VERSION, api_call, current_namespace, custom_objects, get_job

    api = custom_objects()
    namespace, name = _split(job or "", current_namespace(args.namespace))
    cache_name = args.cache
    if cache_name is None and name:
        try:
            cache_name = ((get_job(api, namespace, name).get("spec") or {}).get("cache") or {}).get("resultCache")
        except NotFound:   # deleted jobs keep their history: their namespace's default cache
            cache_name = None
    try:
        rc = api_call(f"resultcache {namespace}/{cache_name or DEFAULT_RESULT_CACHE}",
                      api.get_namespaced_custom_object, GROUP, VERSION, namespace, "resultcaches",
                      cache_name or DEFAULT_RESULT_CACHE)
    except NotFound:
        if cache_name not in (None, DEFAULT_RESULT_CACHE):
            raise
        rc = default_cache(namespace)   # not made yet: where the operator will put it
    return cache_store(rc), namespace


def _split(job: str, namespace: str) -> tuple[str, str]:
    if "/" in job:
        ns, _, name = job.partition("/")
        return ns, name
    return namespace, job


def _label(job: str, args: argparse.Namespace, namespace: str) -> str:
    """The job label records use: ns/name on a cluster; embedded, a script's identity, else as given."""
    if getattr(args, "cluster", False):
        ns, name = _split(job, namespace)
        return f"{ns}/{name}"
    path = Path(job)
    if job.endswith(".py") and path.is_file():
        return f"script:{path.resolve()}:{args.entrypoint}"
    return job


def _print_json(value: Any) -> None:
    print(json.dumps(dataclasses.asdict(value), sort_keys=True))


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _short(digest: str | None) -> str:
    return "-" if digest is None else digest[:15]


# -- history -----------------------------------------------------------------------------------

def history_command(args: argparse.Namespace) -> int:
    if args.job == PRUNE:
        return _prune(args)
    if args.older_than:
        raise InputError("--older-than is for `memoplane history prune`", "run memoplane history prune --older-than "
                         "DURATION")
    from ..history.queries import history

    with _opened(args, args.job) as (_, index, namespace):
        log = history(index, _label(args.job, args, namespace))
    if args.json:
        _print_json(log)
        return 0
    for e in log.entries:
        state = "failed" if e.failure else "cached" if e.cached else "computed"
        print(f"run {e.run_id}  {_when(e.when)}  {state:<8}  key {_short(e.key)}  result {_short(e.result)}"
              f"  node {e.node}")
        for line in ([f"failure: {e.failure}"] if e.failure else []) + (e.why or ["same key as the run before"]):
            print(f"    {line}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from ..history.index import prune
    from .store import parse_duration

    if not args.older_than:
        raise InputError("memoplane history prune needs --older-than", "e.g. memoplane history prune --older-than 720h")
    if args.cluster:
        raise InputError("history prune --cluster is not supported: the operator drops records older than a "
                         "ResultCache's spec.retention.maxAge", "set spec.retention.maxAge on the ResultCache")
    age = parse_duration(args.older_than, "--older-than")
    with _opened(args) as (store, index, _):
        dropped = prune(store, index, age, time.time())
    if args.json:
        print(json.dumps({"dropped": len(dropped), "older_than_seconds": age}, sort_keys=True))
    else:
        print(f"dropped {len(dropped)} run record(s) older than {args.older_than}; "
              "`memoplane gc` can now delete the results only they kept")
    return 0


# -- lineage -----------------------------------------------------------------------------------

def lineage_command(args: argparse.Namespace) -> int:
    from ..history.queries import lineage, start_runs
    from ..history.records import valid_run_id

    job = None if valid_run_id(args.target) or args.target.startswith("b3:") else args.target
    with _opened(args, job) as (_, index, namespace):
        target = args.target if job is None else _label(job, args, namespace)
        found = lineage(index, start_runs(index, target), args.direction, args.depth)
    if args.json:
        _print_json(found)
        return 0
    for line in render_tree(found):
        print(line)
    if found.truncated:
        print(f"... more runs lie beyond --depth {args.depth}")
    return 0


def render_tree(found: Any) -> list[str]:
    """The lineage as an indented tree from each start; a run reached twice is shown once in full."""
    rows = {n.run.run_id: n.run for n in found.nodes}
    children: dict[str, list[tuple[str, str]]] = {}
    for e in found.edges:
        parent, child = (e.producer, e.consumer) if found.direction == "down" else (e.consumer, e.producer)
        children.setdefault(parent, []).append((child, e.name))
    lines: list[str] = []
    shown: set[str] = set()

    def walk(run_id: str, via: str, depth: int) -> None:
        row = rows[run_id]
        arrow = "" if depth == 0 else ("  " * (depth - 1)) + ("└─ " if found.direction == "down" else "└< ")
        head = f"{arrow}{row.job}  run {row.run_id}  result {_short(row.result)}" + (f"  (input {via})" if via else "")
        if run_id in shown:
            lines.append(head + "  (see above)")
            return
        shown.add(run_id)
        lines.append(head + ("  cached" if row.cached else ""))
        for child, name in sorted(children.get(run_id, []), key=lambda c: (rows[c[0]].job, c[0])):
            walk(child, name, depth + 1)

    for start in found.start:
        walk(start, "", 0)
    return lines


# -- diff --------------------------------------------------------------------------------------

def diff_command(args: argparse.Namespace) -> int:
    from ..history.queries import diff

    with _opened(args) as (store, index, _):
        result = diff(index, store, args.run_a, args.run_b)
    if args.json:
        _print_json(result)
        return 0
    if result.same:
        print(f"no differences between {result.run_a} and {result.run_b}")
    if result.code:
        print("code:")
        print("\n".join(f"  {line}" for line in result.code))
    for title, changes in (("inputs", result.inputs), ("env", result.env), ("runtime", result.runtime),
                           ("value", result.value), ("output files", result.files)):
        if changes:
            print(f"{title}:")
            for c in changes:
                print(f"  {c.what}: {_shown(c.before)} -> {_shown(c.after)}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _shown(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, dict) and set(value) == {"digest", "size"}:
        return f"{_short(value['digest'])} ({value['size']} B)" if value["size"] is not None else _short(value["digest"])
    if isinstance(value, str) and value.startswith("b3:"):
        return _short(value)
    return json.dumps(value)


# -- stale -------------------------------------------------------------------------------------

def stale_command(args: argparse.Namespace) -> int:
    from ..history.queries import stale

    name, digest = input_digest(args.input)
    with _opened(args, args.job) as (_, index, namespace):
        report = stale(index, name, digest, _label(args.job, args, namespace) if args.job else None)
    if args.json:
        _print_json(report)
        return 0
    if not report.runs:
        print(f"nothing would change: every newest run that takes {name} took this content")
    for run in report.runs:
        print(f"{run.job}  run {run.run_id}  result {_short(run.result)}  ({run.because})")
    return 0


def input_digest(text: str) -> tuple[str, str]:
    """NAME and the digest the key derivation would give `--input NAME=@FILE|NAME=JSON`."""
    import blake3

    from ..inputs import FileArg, SeedArg, parse_input
    from ..keys import DIGEST_PREFIX, digest_value

    name, value = parse_input(text)
    if isinstance(value, SeedArg):
        raise InputError(f"--input {name}: a seed range is not supported yet by stale",
                         "give the content as @FILE or a JSON value")
    if not isinstance(value, FileArg):
        return name, digest_value(value)
    hasher = blake3.blake3()
    with open(value.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    return name, DIGEST_PREFIX + hasher.hexdigest()


# -- explain --cluster -------------------------------------------------------------------------

def explain_cluster_command(args: argparse.Namespace) -> int:
    from ..history.queries import explain

    if not args.script:
        raise InputError("memoplane explain --cluster needs a job", "give the ComputeJob's name or ns/name")
    with _opened(args, args.script) as (_, index, namespace):
        found = explain(index, _label(args.script, args, namespace))
    if args.json:
        _print_json(found)
        return 0
    if found.cached:
        print(f"{found.job}: its newest run {found.run_id} was served from the cache (a hit)")
    else:
        against = f"against run {found.previous_run}" if found.previous_run else "no earlier run"
        print(f"{found.job}: its newest run {found.run_id} computed ({against})")
    for line in found.changes or ["nothing in the key changed since the run before"]:
        print(f"  {line}")
    return 0
