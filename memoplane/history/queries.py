"""The history queries (DESIGN §12): pure functions over a HistoryIndex (and, for `diff`, the
store's blobs), returning dataclasses the CLI renders as text or JSON.

Lineage names exact versions: an edge is a run that took a result (by the run id its input
names, else by the result digest), never a job's "latest"; a job label only picks the run a
query starts from.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..cas import Store
from ..errors import InputError, MemoplaneError, NotFound
from ..keys import explain_change
from .index import Edge, HistoryIndex, RunRow
from .records import RunRecord, valid_run_id

DEFAULT_DEPTH = 20    # Marquez's default lineage depth
MAX_CHANGES = 200     # JSON paths or files listed by `diff` before "... and N more"
NOT_KEPT = "not kept"

Direction = Literal["up", "down"]


# -- targets ---------------------------------------------------------------------------------

def start_runs(index: HistoryIndex, target: str) -> list[RunRow]:
    """TARGET of a query: a run id, a result digest (the runs that returned it) or a job label
    (its newest run)."""
    if valid_run_id(target):
        row = index.row(target)
        if row is None:
            raise NotFound(f"no run {target} in the history", "list runs with `memoplane history JOB`")
        return [row]
    if target.startswith("b3:"):
        rows = index.rows_with_result(target)
        if not rows:
            raise NotFound(f"no recorded run returned {target}", "give a run id or a job; see `memoplane history JOB`")
        return rows
    latest = index.latest_of(target)
    if latest is None:
        raise NotFound(f"no recorded run of job {target!r}", _jobs_fix(index))
    return [latest]


def _jobs_fix(index: HistoryIndex) -> str:
    labels = index.labels()
    shown = ", ".join(labels[:5]) + (f" (and {len(labels) - 5} more)" if len(labels) > 5 else "")
    return f"give a job label as `memoplane history` shows it: {shown}" if labels else \
        "no run is recorded in this store yet: run something first"


# -- history -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class HistoryEntry:
    run_id: str
    when: float           # the run's end, seconds since the epoch
    key: str
    result: str | None
    cached: bool
    node: str
    failure: str | None
    why: list[str]        # what changed in the key since the job's previous run ([]: the same key)


@dataclass(frozen=True)
class JobHistory:
    job: str
    entries: list[HistoryEntry]   # newest first, like git log


def history(index: HistoryIndex, job: str) -> JobHistory:
    runs = index.runs_of(job)
    if not runs:
        raise NotFound(f"no recorded run of job {job!r}", _jobs_fix(index))
    entries = []
    previous: RunRecord | None = None
    for run in runs:
        entries.append(HistoryEntry(run.run_id, run.ended, run.key, run.result, run.cached, run.node, run.failure,
                                    _why(previous, run)))
        previous = run
    return JobHistory(job, entries[::-1])


def _why(previous: RunRecord | None, run: RunRecord) -> list[str]:
    if previous is None:
        return ["first recorded run"]
    if previous.key == run.key:
        return []
    if previous.components and run.components:
        return explain_change(previous.components, run.components)
    return [f"key changed: {previous.key[:15]} -> {run.key[:15]}"]


# -- explain (a cluster job: why its newest run missed) ------------------------------------------

@dataclass(frozen=True)
class Explanation:
    job: str
    run_id: str
    cached: bool
    previous_run: str | None
    changes: list[str]


def explain(index: HistoryIndex, job: str) -> Explanation:
    runs = index.runs_of(job)
    if not runs:
        raise NotFound(f"no recorded run of job {job!r}", _jobs_fix(index))
    latest = runs[-1]
    previous = runs[-2] if len(runs) > 1 else None
    if previous is None:
        changes = ["no earlier run of this job is recorded"]
    elif previous.components and latest.components:
        changes = explain_change(previous.components, latest.components)
    else:
        changes = [] if previous.key == latest.key else [f"key changed: {previous.key[:15]} -> {latest.key[:15]}"]
    return Explanation(job, latest.run_id, latest.cached, previous.run_id if previous else None, changes)


# -- lineage -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LineageNode:
    run: RunRow
    depth: int


@dataclass(frozen=True)
class Lineage:
    direction: Direction
    start: list[str]            # run ids the walk began at
    nodes: list[LineageNode]    # in the order reached (breadth first), starts at depth 0
    edges: list[Edge]
    truncated: bool             # more runs lie beyond `depth`


def lineage(index: HistoryIndex, start: Sequence[RunRow], direction: Direction,
            depth: int = DEFAULT_DEPTH) -> Lineage:
    if depth < 0:
        raise InputError(f"--depth {depth} is negative", "give --depth 0 or more (default 20)")
    step = index.consumers if direction == "down" else index.producers
    nodes = {row.run_id: LineageNode(row, 0) for row in start}
    edges: dict[Edge, None] = {}
    frontier = list(start)
    truncated = False
    for level in range(1, depth + 2):
        if not frontier:
            break
        found = step(frontier)
        if level > depth:
            truncated = bool(found)
            break
        frontier = []
        for row, edge in found:
            edges[edge] = None
            if row.run_id not in nodes:
                nodes[row.run_id] = LineageNode(row, level)
                frontier.append(row)
    return Lineage(direction, [row.run_id for row in start], list(nodes.values()), list(edges), truncated)


# -- stale -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StaleRun:
    job: str
    run_id: str
    result: str | None
    because: str        # "input NAME differs" or "downstream of JOB"


@dataclass(frozen=True)
class StaleReport:
    input: str
    digest: str
    runs: list[StaleRun]


def stale(index: HistoryIndex, name: str, digest: str, job: str | None = None,
          depth: int = DEFAULT_DEPTH) -> StaleReport:
    """The newest runs that took input `name` with another digest than `digest`, then every newest
    run downstream of them: what would change if `name` had that content."""
    direct = [row for row, seen in index.latest_taking(name) if seen != digest and (job is None or row.job == job)]
    out = {row.run_id: StaleRun(row.job, row.run_id, row.result, f"input {name} differs") for row in direct}
    # Downstream of their results: a served run's result was taken from the run that computed it.
    producers = {r.run_id: r for row in direct for r in (row, *index.rows_with_result(row.result or ""))}
    found = lineage(index, list(producers.values()), "down", depth)
    producer_job = {n.run.run_id: n.run.job for n in found.nodes}
    for node in found.nodes:
        if node.run.run_id in out or node.run.run_id in producers or not index.is_latest(node.run):
            continue
        upstream = next((producer_job.get(e.producer, "?") for e in found.edges if e.consumer == node.run.run_id), "?")
        out[node.run.run_id] = StaleRun(node.run.job, node.run.run_id, node.run.result, f"downstream of {upstream}")
    return StaleReport(name, digest, list(out.values()))


# -- diff --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    """One thing that differs: `what` (an input, env var, distribution, JSON path, file)."""

    what: str
    before: Any
    after: Any


@dataclass
class RunDiff:
    run_a: str
    run_b: str
    code: list[str] = field(default_factory=list)          # unified diff lines, or a note
    inputs: list[Change] = field(default_factory=list)     # before/after: {"digest", "size"} or None
    env: list[Change] = field(default_factory=list)
    runtime: list[Change] = field(default_factory=list)    # distributions and interpreter fields
    value: list[Change] = field(default_factory=list)      # JSON paths of the return value
    files: list[Change] = field(default_factory=list)      # output files' digests
    notes: list[str] = field(default_factory=list)         # what could not be compared, and why

    @property
    def same(self) -> bool:
        return not (self.code or self.inputs or self.env or self.runtime or self.value or self.files)


def diff(index: HistoryIndex, store: Store, run_a: str, run_b: str) -> RunDiff:
    a, b = _record(index, run_a), _record(index, run_b)
    out = RunDiff(a.run_id, b.run_id)
    if a.code != b.code:
        out.code = _code_diff(store, a, b, out.notes)
    out.inputs = _input_changes(a, b)
    out.env = _mapping_changes(a.env, b.env)
    if a.runtime != b.runtime:
        out.runtime = _runtime_changes(store, a, b, out.notes)
    if a.result != b.result:
        _output_changes(store, a, b, out)
    return out


def _record(index: HistoryIndex, run_id: str) -> RunRecord:
    if not valid_run_id(run_id):
        raise InputError(f"{run_id!r} is not a run id", "give run ids as `memoplane history JOB` lists them")
    record = index.record(run_id)
    if record is None:
        raise NotFound(f"no run {run_id} in the history", "list runs with `memoplane history JOB`")
    return record


def _blob(store: Store, digest: str | None, what: str, notes: list[str]) -> bytes | None:
    if digest is None:
        notes.append(f"{what}: not recorded")
        return None
    try:
        return store.get_bytes(digest)
    except (MemoplaneError, OSError):
        notes.append(f"{what} {digest[:15]}: {NOT_KEPT}")
        return None


def _code_diff(store: Store, a: RunRecord, b: RunRecord, notes: list[str]) -> list[str]:
    before = _blob(store, a.code_blob, f"code of {a.run_id}", notes)
    after = _blob(store, b.code_blob, f"code of {b.run_id}", notes)
    if before is None or after is None:
        return [f"code changed: {a.code[:15]} -> {b.code[:15]}"]
    return [line.rstrip("\n") for line in difflib.unified_diff(
        before.decode("utf-8", "replace").splitlines(keepends=True),
        after.decode("utf-8", "replace").splitlines(keepends=True), a.run_id, b.run_id)]


def _input_changes(a: RunRecord, b: RunRecord) -> list[Change]:
    before = {i.name: {"digest": i.digest, "size": i.size} for i in a.inputs}
    after = {i.name: {"digest": i.digest, "size": i.size} for i in b.inputs}
    return _mapping_changes(before, after)


def _mapping_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Change]:
    return [Change(name, before.get(name), after.get(name)) for name in sorted(set(before) | set(after))
            if before.get(name) != after.get(name)]


def _runtime_changes(store: Store, a: RunRecord, b: RunRecord, notes: list[str]) -> list[Change]:
    raw = [_blob(store, r.runtime_blob, f"runtime of {r.run_id}", notes) for r in (a, b)]
    if raw[0] is None or raw[1] is None:
        return [Change("runtime", a.runtime, b.runtime)]
    before, after = json.loads(raw[0]), json.loads(raw[1])
    changes = [Change(k, before.get(k), after.get(k)) for k in ("profile", "python", "implementation", "machine")
               if before.get(k) != after.get(k)]
    dists = _mapping_changes(before.get("distributions") or {}, after.get("distributions") or {})
    return changes + [Change(f"distribution {c.what}", c.before, c.after) for c in dists]


def _output_changes(store: Store, a: RunRecord, b: RunRecord, out: RunDiff) -> None:
    results = []
    for record in (a, b):
        if record.result is None:
            out.notes.append(f"run {record.run_id} has no result ({record.failure or 'failed'})")
            return
        try:
            results.append(store.get_result(record.result))
        except (MemoplaneError, OSError):
            out.notes.append(f"result {record.result[:15]} of {record.run_id}: {NOT_KEPT}")
            return
    ra, rb = results
    if ra.value != rb.value:
        out.value = _value_changes(store, ra.value, rb.value, out.notes)
    trees = [_tree_files(store, r.output_tree.digest if r.output_tree else None, out.notes) for r in results]
    if trees[0] is not None and trees[1] is not None:
        out.files = _capped(_mapping_changes(trees[0], trees[1]), out.notes, "files")


def _value_changes(store: Store, a: Any, b: Any, notes: list[str]) -> list[Change]:
    if a.kind != "json" or b.kind != "json":
        return [Change("$", {"kind": a.kind, "size": a.size}, {"kind": b.kind, "size": b.size})]
    try:
        before, after = store.load_value(a), store.load_value(b)
    except (MemoplaneError, OSError):
        notes.append(f"return value: {NOT_KEPT}")
        return []
    changes: list[Change] = []
    json_changes("$", before, after, changes)
    return _capped(changes, notes, "JSON paths")


def json_changes(path: str, before: Any, after: Any, out: list[Change]) -> None:
    """The JSON paths where `before` and `after` differ (leaves, or where the type changes)."""
    if before == after or len(out) > MAX_CHANGES:
        return
    if isinstance(before, dict) and isinstance(after, dict):
        for name in sorted(set(before) | set(after)):
            child = f"{path}.{name}" if name.isidentifier() else f"{path}[{json.dumps(name)}]"
            if name not in before or name not in after:
                out.append(Change(child, before.get(name), after.get(name)))
            else:
                json_changes(child, before[name], after[name], out)
    elif isinstance(before, list) and isinstance(after, list):
        for i in range(max(len(before), len(after))):
            json_changes(f"{path}[{i}]", before[i] if i < len(before) else None,
                         after[i] if i < len(after) else None, out)
    else:
        out.append(Change(path, before, after))


def _capped(changes: list[Change], notes: list[str], what: str) -> list[Change]:
    if len(changes) > MAX_CHANGES:
        notes.append(f"{what}: the first {MAX_CHANGES} differences shown")
    return changes[:MAX_CHANGES]


def _tree_files(store: Store, digest: str | None, notes: list[str]) -> dict[str, str] | None:
    if digest is None:
        return {}
    try:
        return {path: entry.digest for path, entry in store.get_tree(digest).entries.items()}
    except (MemoplaneError, OSError):
        notes.append(f"output tree {digest[:15]}: {NOT_KEPT}")
        return None
