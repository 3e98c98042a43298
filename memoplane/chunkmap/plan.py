"""The jobs of an over-chunks map and their evaluation, bottom-up.

A leaf is the user's job with the `over` input replaced by one chunk (a blob: the entrypoint
receives the chunk's bytes, whole rows). A combine node is the same source with a small fold
appended, called with the children's results in order: combine(combine(a, b), c)... So the
key of every node covers the code and its inputs by content, and a subtree whose chunks did
not change is a cache hit. A combine node whose children's results are all unchanged is a hit
too (early cutoff), though an edited chunk's new digest may move a group boundary of the tree
(the shape follows the chunks' content, not the results), and then the groups around it
recombine. Partial results travel as JSON values (the combine node's `parts` input).
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from ..canonical import canonical_json
from ..errors import InputError
from ..jobs import BlobInput, Job, JsonInput, PythonCode
from ..settings import CHUNK_TASK_BYTES
from .split import record_chunks
from .tree import Node, build_tree

Role = Literal["leaf", "combine"]
# Runs one node's job: returns its result value and whether it was served from the cache.
RunNode = Callable[[Job, Role], tuple[Any, bool]]
# Stores one chunk; returns its blob (digest, size).
PutChunk = Callable[[bytes], BlobInput]
# The combine tree over the leaves' ids, in order.
Shape = Callable[[list[str]], Node]

FOLD_ENTRYPOINT = "memoplane_fold"
FOLD_SOURCE = f'''

def {FOLD_ENTRYPOINT}(parts, combine):
    # appended by memoplane: a combine node folds its children's results, in order
    fn = globals()[combine]
    acc = parts[0]
    for part in parts[1:]:
        acc = fn(acc, part)
    return acc
'''


@dataclass
class ChunkMapReport:
    value: Any
    root: str                 # the tree's root id (a chunk digest when there is one chunk)
    chunks: int
    leaves: int               # distinct leaf jobs (equal chunks share one)
    leaf_runs: int            # of those, computed (not served from the cache)
    combines: int             # distinct combine jobs
    combine_runs: int
    depth: int
    root_key: str = ""        # the root node's job key (a cluster run's status.cacheKey for the same file and script)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "value"}


def python_code(job: Job) -> PythonCode:
    if not isinstance(job.code, PythonCode):
        raise InputError("--over-chunks needs a Python script, not a command", "run a SCRIPT.py with a combine function")
    return job.code


def top_level_names(source: str) -> set[str] | None:
    """Names a module binds at its top level (defs, classes, assignments, imports); None if it does not parse
    (the first leaf then reports the syntax error as any job would)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def over_blob(job: Job, over: str) -> BlobInput:
    value = job.inputs.get(over)
    if not isinstance(value, BlobInput):
        raise InputError(f"over-chunks input '{over}' is not a file input",
                         f"pass it as --input {over}=@FILE (one large table)")
    return value


def leaf_job(job: Job, over: str, chunk: BlobInput) -> Job:
    """The job on one chunk, which reaches the code as the whole input was declared (bytes, path or file)."""
    whole = job.inputs.get(over)
    delivery = whole.delivery if isinstance(whole, BlobInput) else chunk.delivery
    return dataclasses.replace(job, inputs={**job.inputs, over: dataclasses.replace(chunk, delivery=delivery)})


def combine_job(job: Job, combine: str, parts: list[Any]) -> Job:
    code = python_code(job)
    try:
        canonical_json(parts)
    except InputError:
        raise InputError("a partial result of an over-chunks map is not a JSON value",
                         "return JSON (a number, list or dict) from the entrypoint and from combine") from None
    fold = PythonCode(source=code.source.rstrip("\n") + "\n" + FOLD_SOURCE, entrypoint=FOLD_ENTRYPOINT,
                      filename=code.filename)
    return dataclasses.replace(job, code=fold, inputs={"parts": JsonInput(parts), "combine": JsonInput(combine)})


def run_over_chunks(job: Job, over: str, combine: str, data: bytes, put: PutChunk, run: RunNode,
                    target: int = CHUNK_TASK_BYTES, *, spans: list[tuple[int, int]] | None = None,
                    shape: Shape = build_tree, workers: int = 1) -> ChunkMapReport:
    """Split `data` (the `over` input's content), run a leaf per distinct chunk and a combine per tree node.
    `spans` and `shape` replace the content-defined split and tree (the benchmark's position-based baseline);
    `workers` nodes of one layer of the tree run at once (`run` is then called from that many threads)."""
    check_combine(job, combine)
    chunks, order = split_chunks(data, put, target, spans)
    root = shape(order)
    return _evaluate(job, over, combine, root, chunks, run, len(order), workers)


def _evaluate(job: Job, over: str, combine: str, root: Node, chunks: dict[str, BlobInput], run: RunNode,
              count: int, workers: int) -> ChunkMapReport:
    """Layer by layer from the leaves up: the nodes of a layer are independent, so up to `workers` run at once."""
    values: dict[str, Any] = {}
    report = ChunkMapReport(None, root.id, count, 0, 0, 0, 0, root.level)
    with ThreadPoolExecutor(max(workers, 1), thread_name_prefix="memoplane-chunks") as pool:
        for layer in layers(root):
            tasks = layer_jobs(job, over, combine, layer, chunks, values)
            outcomes = list(pool.map(lambda task: run(*task), tasks)) if workers > 1 else [run(*t) for t in tasks]
            report.root_key = tasks[-1][0].key
            for node, (value, cached) in zip(layer, outcomes, strict=True):
                values[node.id] = value
                if node.children:
                    report.combines += 1
                    report.combine_runs += not cached
                else:
                    report.leaves += 1
                    report.leaf_runs += not cached
    report.value = values[root.id]
    return report


def layer_jobs(job: Job, over: str, combine: str, layer: list[Node], chunks: Mapping[str, BlobInput],
               values: Mapping[str, Any]) -> list[tuple[Job, Role]]:
    """The job of each node of a layer: a leaf over its chunk, a combine over its children's `values`
    (by node id). Embedded and cluster runs derive the same jobs, so the same keys."""
    return [(combine_job(job, combine, [values[c.id] for c in n.children]), "combine") if n.children else
            (leaf_job(job, over, chunks[n.id]), "leaf") for n in layer]


def split_chunks(data: bytes, put: PutChunk, target: int = CHUNK_TASK_BYTES,
                 spans: list[tuple[int, int]] | None = None) -> tuple[dict[str, BlobInput], list[str]]:
    """Store each chunk of `data`: the chunks by digest, and their digests in order."""
    chunks: dict[str, BlobInput] = {}
    order: list[str] = []
    for offset, length in record_chunks(data, target) if spans is None else spans:
        blob = put(data[offset:offset + length])
        chunks[blob.digest] = blob
        order.append(blob.digest)
    return chunks, order


def check_combine(job: Job, combine: str) -> None:
    """`combine` names a top-level function of the job's Python source (InputError if not)."""
    if not combine.isidentifier():
        raise InputError(f"combine {combine!r} is not a Python function name", "name a top-level function")
    names = top_level_names(python_code(job).source)
    if names is not None and combine not in names:
        raise InputError(f"combine function {combine!r} is not defined at the top level of the script",
                         f"define `def {combine}(a, b)` there, or pass the name of the one that is")


def layers(root: Node) -> list[list[Node]]:
    """The distinct nodes by height (leaves first); every node's children are in earlier layers."""
    height: dict[str, int] = {}
    by_height: list[list[Node]] = []
    for node in root.walk():
        if node.id in height:
            continue
        h = height[node.id] = 1 + max((height[c.id] for c in node.children), default=-1)
        if h == len(by_height):
            by_height.append([])
        by_height[h].append(node)
    return by_height
