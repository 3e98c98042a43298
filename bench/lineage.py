"""History at scale: the SQLite index of run records against a naive scan of the records.

    python bench/lineage.py [--quick] [--nodes N] [--versions V] [--queries Q]

Data (generated, seeded; a filesystem store in a temp dir, durability "none"):
- a DAG of N jobs (default 10,000; 2,000 with --quick) in 20 layers of N/20; job j of layer L
  takes inputs from jobs j and j+1 (mod the width) of layer L-1, like a pipeline whose stages
  each read a couple of upstream tables: a run's downstream cone widens by one job per layer;
- V versions of every job (default 10, so 100,000 run records; 5 with --quick), written version
  by version, layer by layer; each fromJob input names its upstream's run of the same version
  (exact lineage), its result digest and run id;
- for Q jobs (the `diff` sample), each version's code text, return value (a nested JSON object)
  and an output tree are stored for real, so `diff` reads and compares them.

Metrics (same run):
- index_rebuild_seconds: HistoryIndex.rebuild (read, parse and index every record), against
  reading and parsing every record once (the naive scan every query below pays).
- lineage_up_p50/p95_ms, lineage_down_p50/p95_ms: `lineage up|down` at depth 20 from a random
  run (any layer, any version), against the naive scan (list and read every record, then walk
  in memory), timed for a few queries only (it takes seconds each). Target p95 <= 50 ms.
- diff_p95_ms: `diff` of two versions of a sampled job (code lines, inputs, JSON paths of the
  value, output files), against the naive scan to find the two records. Target p95 <= 100 ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, metric

from memoplane.cas import Provenance, ResultManifest, Store
from memoplane.cas.fs import FilesystemBackend
from memoplane.history import InputRecord, JobIdentity, RunRecord, new_run_id
from memoplane.history.index import HistoryIndex
from memoplane.history.queries import diff, lineage, start_runs
from memoplane.keys import digest_bytes

LAYERS = 20
NAMESPACE = "bench"
START_NS = 1_790_000_000 * 10**9


def job_name(layer: int, j: int) -> str:
    return f"l{layer:02d}-j{j:05d}"


class Generated:
    """The records of the DAG, and which runs the diff sample can compare."""

    def __init__(self, nodes: int, versions: int, sample: int, rng: random.Random) -> None:
        self.width = max(2, nodes // LAYERS)
        self.versions = versions
        self.sampled = set(rng.sample([(layer, j) for layer in range(LAYERS) for j in range(self.width)], sample))
        self.records: list[RunRecord] = []
        self.run_ids: dict[tuple[int, int, int], str] = {}   # (layer, job, version) -> run id
        self.results: dict[tuple[int, int, int], str] = {}

    def generate(self, store: Store) -> None:
        at = START_NS
        for v in range(self.versions):
            for layer in range(LAYERS):
                for j in range(self.width):
                    at += 1000
                    self.records.append(self._record(store, layer, j, v, at))

    def _record(self, store: Store, layer: int, j: int, v: int, at: int) -> RunRecord:
        run_id = new_run_id(at)
        inputs = tuple(self._input(layer, up, v) for up in ((j, (j + 1) % self.width) if layer else ()))
        if not inputs:
            inputs = (InputRecord("rows", digest_bytes(f"rows-{j}-{v}".encode()), 1000 + v, "value"),)
        code_blob = result = None
        if (layer, j) in self.sampled:
            code_blob, result = self._stored(store, layer, j, v)
        result = result or digest_bytes(f"result-{layer}-{j}-{v}".encode())
        self.run_ids[(layer, j, v)], self.results[(layer, j, v)] = run_id, result
        return RunRecord(run_id, JobIdentity(NAMESPACE, job_name(layer, j), f"uid-{layer}-{j}", v + 1),
                         digest_bytes(f"key-{layer}-{j}-{v}".encode()), result, inputs,
                         digest_bytes(f"code-{v}".encode()), "b3:" + "11" * 32, {"MODE": "v" + str(v % 2)},
                         f"node-{j % 7}", "node-a-1", at / 1e9, at / 1e9 + 1.0, False, 1.0,
                         cache=f"{NAMESPACE}/default", code_blob=code_blob, result_size=100)

    def _input(self, layer: int, up: int, v: int) -> InputRecord:
        result = self.results[(layer - 1, up, v)]
        return InputRecord(f"in{up % 2}", "b3:v-" + result[3:40], 100, "fromJob",
                           f"{NAMESPACE}/{job_name(layer - 1, up)}", result, self.run_ids[(layer - 1, up, v)])

    @staticmethod
    def _stored(store: Store, layer: int, j: int, v: int) -> tuple[str, str]:
        """Real code text, return value and output tree for a job of the diff sample."""
        code = "".join(f"def step{i}(rows):\n    return [r * {i + (v if i == 3 else 0)} for r in rows]\n"
                       for i in range(12))
        code_blob = store.put_bytes(code.encode()).digest
        value = {"layer": layer, "job": j, "stats": {"n": 1000 + v, "mean": 0.5 + v / 100,
                                                     "hist": [k * (v + 1) % 13 for k in range(20)]}}
        empty = store.put_bytes(b"")
        with tempfile.TemporaryDirectory(prefix="lineage-tree-") as tmp:
            for k in range(5):
                (Path(tmp) / f"part-{k}.csv").write_text(f"{layer},{j},{k},{v if k == 2 else 0}\n")
            tree = store.put_tree(tmp)
        now = time.time()
        key = digest_bytes(f"key-{layer}-{j}-{v}".encode())
        result = ResultManifest(store.put_value(value), empty, empty,
                                Provenance(key, {}, "b3:" + "11" * 32, "bench", now, now, 1.0), output_tree=tree)
        return code_blob, store.put_result(result)


def write_records(store: Store, records: list[RunRecord]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        for ok in pool.map(lambda r: store.put_run_record(r.run_id, r.to_json()), records):
            assert ok
    return time.perf_counter() - started


def naive_scan(store: Store) -> list[RunRecord]:
    """What answering a query without the index costs: list and read every record."""
    return [RunRecord.from_json(store.run_record(run_id) or b"") for run_id in store.run_record_ids()]


def naive_lineage(store: Store, run_id: str, direction: str, depth: int) -> int:
    records = {r.run_id: r for r in naive_scan(store)}
    consumers: dict[str, list[str]] = {}
    for r in records.values():
        for i in r.inputs:
            if i.upstream_run:
                consumers.setdefault(i.upstream_run, []).append(r.run_id)
    seen, frontier = {run_id}, [run_id]
    for _ in range(depth):
        step = [c for f in frontier for c in (consumers.get(f, []) if direction == "down" else
                                              [i.upstream_run for i in records[f].inputs if i.upstream_run])]
        frontier = [s for s in step if s not in seen]
        seen.update(frontier)
    return len(seen)


def naive_find(store: Store, a: str, b: str) -> tuple[RunRecord, RunRecord]:
    found = {r.run_id: r for r in naive_scan(store) if r.run_id in (a, b)}
    return found[a], found[b]


def quantile_ms(seconds: list[float], q: int) -> float:
    return statistics.quantiles([s * 1000 for s in seconds], n=100, method="inclusive")[q - 1] \
        if len(seconds) > 1 else seconds[0] * 1000


def timed_each(fn: Callable[[int], object], n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--nodes", type=int, default=None, help="jobs in the DAG (default 10,000)")
    parser.add_argument("--versions", type=int, default=None, help="runs of each job (default 10)")
    parser.add_argument("--queries", type=int, default=None, help="timed queries of each kind (default 200)")
    args = parser.parse_args()
    nodes = args.nodes or (2_000 if args.quick else 10_000)
    versions = args.versions or (5 if args.quick else 10)
    queries = args.queries or (50 if args.quick else 200)
    naive_queries = 3
    rng = random.Random(13)
    with tempfile.TemporaryDirectory(prefix="bench-lineage-") as tmp:
        store = Store(FilesystemBackend(Path(tmp) / "store", durability="none"))
        gen = Generated(nodes, versions, min(queries, nodes), rng)
        t = time.perf_counter()
        gen.generate(store)
        write_s = write_records(store, gen.records)
        print(f"generated {len(gen.records)} run records over {gen.width * LAYERS} jobs in {LAYERS} layers "
              f"({time.perf_counter() - t:.1f} s, of which writing {write_s:.1f} s)", flush=True)

        index = HistoryIndex(Path(tmp) / "index.sqlite")
        t = time.perf_counter()
        index.rebuild(store)
        rebuild_s = time.perf_counter() - t
        t = time.perf_counter()
        naive_scan(store)
        scan_s = time.perf_counter() - t
        print(f"index rebuild {rebuild_s:.1f} s; one naive scan of every record {scan_s:.1f} s", flush=True)

        keys = list(gen.run_ids)
        targets = [gen.run_ids[keys[rng.randrange(len(keys))]] for _ in range(queries)]
        reached: dict[str, list[int]] = {"up": [], "down": []}
        timings: dict[str, list[float]] = {}
        for direction in ("up", "down"):
            def query(i: int, direction: str = direction) -> None:
                found = lineage(index, start_runs(index, targets[i]), direction, 20)  # type: ignore[arg-type]
                reached[direction].append(len(found.nodes))
            timings[direction] = timed_each(query, queries)
            timings[f"naive_{direction}"] = timed_each(
                lambda i, d=direction: naive_lineage(store, targets[i], d, 20), naive_queries)
        pairs = []
        for layer, j in sorted(gen.sampled)[:queries]:
            v = rng.randrange(versions - 1)
            pairs.append((gen.run_ids[(layer, j, v)], gen.run_ids[(layer, j, v + 1)]))
        diffs = []

        def diff_one(i: int) -> None:
            found = diff(index, store, *pairs[i % len(pairs)])
            assert found.code and found.value and found.files and not found.notes, found
            diffs.append(found)
        timings["diff"] = timed_each(diff_one, queries)
        timings["naive_diff"] = timed_each(lambda i: naive_find(store, *pairs[i]), naive_queries)
        index.close()
        store.close()
    metrics = {"index_rebuild_seconds": metric(round(rebuild_s, 2), "s", "naive_scan_of_every_record_seconds",
                                               round(scan_s, 2))}
    for direction in ("up", "down"):
        naive = statistics.median(timings[f"naive_{direction}"]) * 1000
        for q in (50, 95):
            ours = quantile_ms(timings[direction], q)
            metrics[f"lineage_{direction}_p{q}_ms"] = metric(round(ours, 3), "ms", "naive_scan_per_query_ms",
                                                             round(naive, 1))
        print(f"lineage {direction:>4} depth 20: p50 {quantile_ms(timings[direction], 50):.2f} ms, "
              f"p95 {quantile_ms(timings[direction], 95):.2f} ms (runs reached: mean "
              f"{statistics.mean(reached[direction]):.0f}, max {max(reached[direction])}); naive scan {naive:.0f} ms")
    naive_diff = statistics.median(timings["naive_diff"]) * 1000
    for q in (50, 95):
        metrics[f"diff_p{q}_ms"] = metric(round(quantile_ms(timings["diff"], q), 3), "ms",
                                          "naive_scan_per_query_ms", round(naive_diff, 1))
    print(f"diff: p50 {quantile_ms(timings['diff'], 50):.2f} ms, p95 {quantile_ms(timings['diff'], 95):.2f} ms; "
          f"naive scan {naive_diff:.0f} ms ({naive_queries} naive queries of each kind)")
    print(f"{len(gen.records)} records, {gen.width * LAYERS} jobs, {versions} versions, {queries} queries of each kind")
    emit("lineage", metrics)


if __name__ == "__main__":
    main()
