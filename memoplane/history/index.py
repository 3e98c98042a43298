"""The history index: an SQLite file (WAL) of the store's run records, for the queries
(memoplane.history.queries) and the roots retention keeps.

The records in the store are the truth; the index is a cache of them, rebuilt at will
(`rebuild`). `sync` adds the records it has not seen: every id the store lists that the
index holds neither as a run nor as a skipped (malformed) record, so a record that arrives
late (a slow writer, another node's clock) is still picked up. A malformed record is
skipped and logged, never fatal: whoever can write the store can write records.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cas import Store
from ..settings import history_index_path
from .records import RunRecord

log = logging.getLogger("memoplane.history")

SCHEMA_VERSION = 1
BATCH = 500   # records per transaction while syncing
READERS = 8   # records read at once while syncing

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL, label TEXT NOT NULL,
    uid TEXT NOT NULL, generation INTEGER NOT NULL, key TEXT NOT NULL, result TEXT, result_size INTEGER,
    cached INTEGER NOT NULL, started REAL NOT NULL, ended REAL NOT NULL, node TEXT NOT NULL, signer TEXT,
    compute_seconds REAL NOT NULL, failure TEXT, cache TEXT NOT NULL, code_blob TEXT, runtime_blob TEXT,
    record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS inputs (
    run_id TEXT NOT NULL, name TEXT NOT NULL, digest TEXT NOT NULL, size INTEGER, source TEXT NOT NULL,
    upstream_job TEXT, upstream_result TEXT, upstream_run TEXT, PRIMARY KEY (run_id, name));
CREATE TABLE IF NOT EXISTS skipped (run_id TEXT PRIMARY KEY, reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS runs_by_job ON runs (label, run_id);
CREATE INDEX IF NOT EXISTS runs_by_result ON runs (result);
CREATE INDEX IF NOT EXISTS runs_by_key ON runs (key);
CREATE INDEX IF NOT EXISTS inputs_by_upstream_run ON inputs (upstream_run);
CREATE INDEX IF NOT EXISTS inputs_by_upstream_result ON inputs (upstream_result);
CREATE INDEX IF NOT EXISTS inputs_by_digest ON inputs (digest, name);
"""

_SECONDARY = [line.split()[5] for line in _SCHEMA.splitlines() if line.startswith("CREATE INDEX")]
RUN_COLUMNS = ("run_id", "namespace", "name", "label", "uid", "generation", "key", "result", "result_size",
               "cached", "started", "ended", "node", "signer", "compute_seconds", "failure", "cache", "code_blob",
               "runtime_blob", "record")
INPUT_COLUMNS = ("run_id", "name", "digest", "size", "source", "upstream_job", "upstream_result", "upstream_run")


@dataclass(frozen=True)
class RunRow:
    """A run as lineage shows it (the whole record: `HistoryIndex.record`)."""

    run_id: str
    job: str          # JobIdentity.label
    key: str
    result: str | None
    cached: bool
    ended: float
    node: str


@dataclass(frozen=True)
class Edge:
    """`consumer` took input `name` from what `producer` returned."""

    producer: str
    consumer: str
    name: str


@dataclass(frozen=True)
class SyncReport:
    added: int
    skipped: int
    total: int


_ROW = "r.run_id, r.label, r.key, r.result, r.cached, r.ended, r.node"


def _row(raw: Sequence[Any]) -> RunRow:
    return RunRow(str(raw[0]), str(raw[1]), str(raw[2]), None if raw[3] is None else str(raw[3]), bool(raw[4]),
                  float(raw[5]), str(raw[6]))


class HistoryIndex:
    """One SQLite file (or ":memory:"). Thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            if self._schema_version() not in (None, SCHEMA_VERSION):
                self._drop()   # an index of another layout: rebuilt from the records
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> HistoryIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _schema_version(self) -> int | None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        except sqlite3.OperationalError:
            return None
        return int(row[0]) if row else None

    def _drop(self) -> None:
        for table in ("runs", "inputs", "skipped", "meta"):
            self._db.execute(f"DROP TABLE IF EXISTS {table}")

    # -- filling it ------------------------------------------------------------------------

    def sync(self, store: Store) -> SyncReport:
        """Add every record of `store` not indexed yet (late arrivals included), and forget those
        no longer in it (pruned by another process), so the roots never hold what history dropped."""
        with self._lock:
            known = {row[0] for row in self._db.execute("SELECT run_id FROM runs UNION ALL SELECT run_id FROM skipped")}
        listed = set(store.run_record_ids())
        new = sorted(listed - known)
        gone = sorted(known - listed)
        if gone:
            self.forget(gone)
        added = skipped = 0
        for start in range(0, len(new), BATCH):
            a, s = self._add_from_store(store, new[start:start + BATCH])
            added, skipped = added + a, skipped + s
        return SyncReport(added, skipped, len(known) - len(gone) + added + skipped)

    def rebuild(self, store: Store) -> SyncReport:
        """Forget everything and index the store's records from scratch."""
        with self._lock:   # filled without its secondary indexes, made once at the end: faster
            for table in ("runs", "inputs", "skipped"):
                self._db.execute(f"DELETE FROM {table}")
            for name in _SECONDARY:
                self._db.execute(f"DROP INDEX IF EXISTS {name}")
            self._db.commit()
            try:
                return self.sync(store)
            finally:
                self._db.executescript(_SCHEMA)

    def _add_from_store(self, store: Store, run_ids: Sequence[str]) -> tuple[int, int]:
        records: list[tuple[RunRecord, bytes]] = []
        bad = []
        if store.local_root is not None:
            fetched = [store.run_record(run_id) for run_id in run_ids]
        else:
            with ThreadPoolExecutor(READERS) as pool:   # an object store answers each read in a round trip
                fetched = list(pool.map(store.run_record, run_ids))
        for run_id, data in zip(run_ids, fetched, strict=True):
            if data is None:     # pruned or deleted since it was listed
                continue
            try:
                record = RunRecord.from_json(data)
                if record.run_id != run_id:
                    raise ValueError(f"it says it is run {record.run_id}")
            except ValueError as exc:
                log.warning("run record %s skipped: %s", run_id, exc)
                bad.append((run_id, str(exc)[:200]))
                continue
            records.append((record, data))
        self._insert(records, bad)
        return len(records), len(bad)

    def add(self, records: Iterable[RunRecord]) -> None:
        """Index `records` (already indexed ones are left as they are: records never change)."""
        self._insert([(r, r.to_json()) for r in records], [])

    def _insert(self, records: Iterable[tuple[RunRecord, bytes]], skipped: list[tuple[str, str]]) -> None:
        runs: list[tuple[Any, ...]] = []
        inputs: list[tuple[Any, ...]] = []
        for r, data in records:
            runs.append((r.run_id, r.job.namespace, r.job.name, r.job.label, r.job.uid, r.job.generation, r.key,
                         r.result, r.result_size, int(r.cached), r.started, r.ended, r.node, r.signer,
                         r.compute_seconds, r.failure, r.cache, r.code_blob, r.runtime_blob, data))
            inputs.extend((r.run_id, i.name, i.digest, i.size, i.source, i.upstream_job, i.upstream_result,
                           i.upstream_run) for i in r.inputs)
        with self._lock:
            self._db.executemany(f"INSERT OR IGNORE INTO runs VALUES ({','.join('?' * len(RUN_COLUMNS))})", runs)
            self._db.executemany(f"INSERT OR IGNORE INTO inputs VALUES ({','.join('?' * len(INPUT_COLUMNS))})",
                                 inputs)
            self._db.executemany("INSERT OR IGNORE INTO skipped VALUES (?, ?)", skipped)
            self._db.commit()

    def forget(self, run_ids: Sequence[str]) -> None:
        """Drop runs from the index (their records were pruned from the store)."""
        with self._lock:
            for start in range(0, len(run_ids), BATCH):
                chunk = [(run_id,) for run_id in run_ids[start:start + BATCH]]
                for table in ("runs", "inputs", "skipped"):
                    self._db.executemany(f"DELETE FROM {table} WHERE run_id = ?", chunk)
            self._db.commit()

    # -- reading it ------------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, params))

    def record(self, run_id: str) -> RunRecord | None:
        rows = self._query("SELECT record FROM runs WHERE run_id = ?", (run_id,))
        return RunRecord.from_json(bytes(rows[0][0])) if rows else None

    def runs_of(self, label: str) -> list[RunRecord]:
        """Every run of the job, oldest first."""
        rows = self._query("SELECT record FROM runs WHERE label = ? ORDER BY run_id", (label,))
        return [RunRecord.from_json(bytes(row[0])) for row in rows]

    def latest_of(self, label: str, before: str | None = None) -> RunRow | None:
        """The job's newest run (older than run id `before`, if given)."""
        rows = self._query(f"SELECT {_ROW} FROM runs r WHERE r.label = ? AND r.run_id < ? "
                           "ORDER BY r.run_id DESC LIMIT 1", (label, before or "s"))
        return _row(rows[0]) if rows else None

    def is_latest(self, row: RunRow) -> bool:
        latest = self.latest_of(row.job)
        return latest is not None and latest.run_id == row.run_id

    def row(self, run_id: str) -> RunRow | None:
        rows = self._query(f"SELECT {_ROW} FROM runs r WHERE r.run_id = ?", (run_id,))
        return _row(rows[0]) if rows else None

    def rows_with_result(self, digest: str) -> list[RunRow]:
        return [_row(raw) for raw in self._query(f"SELECT {_ROW} FROM runs r WHERE r.result = ? ORDER BY r.run_id",
                                                   (digest,))]

    def rows_with_key(self, key: str) -> list[RunRow]:
        return [_row(raw) for raw in self._query(f"SELECT {_ROW} FROM runs r WHERE r.key = ? ORDER BY r.run_id",
                                                   (key,))]

    def labels(self) -> list[str]:
        return [str(row[0]) for row in self._query("SELECT DISTINCT label FROM runs ORDER BY label")]

    def consumers(self, producers: Sequence[RunRow]) -> list[tuple[RunRow, Edge]]:
        """The runs that took a producer's result as an input: those naming the producer's run,
        and those naming only its result digest (an input that names another run is that run's)."""
        out: list[tuple[RunRow, Edge]] = []
        by_id = {p.run_id: p for p in producers}
        by_result: dict[str, list[RunRow]] = {}
        for p in producers:
            if p.result:
                by_result.setdefault(p.result, []).append(p)
        for chunk in _chunks(list(by_id)):
            for raw in self._query(f"SELECT {_ROW}, i.name, i.upstream_run FROM inputs i JOIN runs r "
                                   f"ON r.run_id = i.run_id WHERE i.upstream_run IN ({_marks(chunk)})", chunk):
                out.append((_row(raw), Edge(str(raw[8]), str(raw[0]), str(raw[7]))))
        for chunk in _chunks(list(by_result)):
            for raw in self._query(f"SELECT {_ROW}, i.name, i.upstream_result FROM inputs i JOIN runs r "
                                   f"ON r.run_id = i.run_id WHERE +i.upstream_run IS NULL "
                                   f"AND i.upstream_result IN ({_marks(chunk)})", chunk):
                out.extend((_row(raw), Edge(p.run_id, str(raw[0]), str(raw[7]))) for p in by_result[str(raw[8])])
        return out

    def producers(self, consumers: Sequence[RunRow]) -> list[tuple[RunRow, Edge]]:
        """The runs whose results the consumers took: the run an input names, else every run
        that returned the input's upstream result digest."""
        out: list[tuple[RunRow, Edge]] = []
        ids = [c.run_id for c in consumers]
        for chunk in _chunks(ids):
            for raw in self._query(f"SELECT {_ROW}, i.name, i.run_id FROM inputs i JOIN runs r "
                                   f"ON r.run_id = i.upstream_run WHERE i.run_id IN ({_marks(chunk)})", chunk):
                out.append((_row(raw), Edge(str(raw[0]), str(raw[8]), str(raw[7]))))
            for raw in self._query(f"SELECT {_ROW}, i.name, i.run_id FROM inputs i JOIN runs r "
                                   f"ON r.result = i.upstream_result WHERE +i.upstream_run IS NULL "
                                   f"AND i.run_id IN ({_marks(chunk)})", chunk):
                if raw[0] != raw[8]:
                    out.append((_row(raw), Edge(str(raw[0]), str(raw[8]), str(raw[7]))))
        return out

    def latest_taking(self, name: str) -> list[tuple[RunRow, str]]:
        """The newest run of each job that took an input `name`, with that input's digest."""
        rows = self._query(
            f"WITH latest AS (SELECT MAX(run_id) AS run_id FROM runs GROUP BY label) SELECT {_ROW}, i.digest "
            "FROM latest l JOIN runs r ON r.run_id = l.run_id JOIN inputs i ON i.run_id = r.run_id AND i.name = ? "
            "ORDER BY r.label", (name,))
        return [(_row(raw), str(raw[7])) for raw in rows]

    # -- retention ---------------------------------------------------------------------------

    def roots(self) -> tuple[set[str], set[str]]:
        """(result digests, blob digests) the indexed records name: what history keeps alive."""
        results = {str(r[0]) for r in self._query("SELECT DISTINCT result FROM runs WHERE result IS NOT NULL")}
        blobs = {str(r[0]) for r in self._query(
            "SELECT code_blob FROM runs WHERE code_blob IS NOT NULL "
            "UNION SELECT runtime_blob FROM runs WHERE runtime_blob IS NOT NULL")}
        return results, blobs

    def run_ids_before(self, bound: str) -> list[str]:
        """Indexed run ids (and skipped ones) that sort before `bound`, oldest first."""
        return [str(r[0]) for r in self._query(
            "SELECT run_id FROM runs WHERE run_id < ? UNION SELECT run_id FROM skipped WHERE run_id < ? "
            "ORDER BY 1", (bound, bound))]

    def table_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table, sorted (what a rebuilt index must equal)."""
        return {table: sorted(self._query(f"SELECT * FROM {table}"), key=repr)
                for table in ("runs", "inputs", "skipped")}


def _marks(items: Sequence[object]) -> str:
    return ",".join("?" * len(items))


def _chunks(items: list[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def open_index(store: Store) -> HistoryIndex:
    """The store's index where settings.history_index_path puts it, synced with its records. It is
    a cache: a damaged file is started afresh; where it cannot be written (a read-only store
    directory), the user's cache directory is used, else memory."""
    places = [history_index_path(store.local_root, store.describe())]
    if store.local_root is not None:
        places.append(history_index_path(None, store.describe()))
    for path in places:
        for _attempt in range(2):
            try:
                index = HistoryIndex(path)
                index.sync(store)
                return index
            except sqlite3.DatabaseError as exc:
                log.warning("history index %s unusable: %s", path, exc)
                if "not a database" not in str(exc) and "malformed" not in str(exc):
                    break
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
            except OSError as exc:
                log.warning("history index %s unusable: %s", path, exc)
                break
    index = HistoryIndex(":memory:")
    index.sync(store)
    return index


def prune(store: Store, index: HistoryIndex, older_than: float, now: float) -> list[str]:
    """Drop the records made more than `older_than` seconds before `now` (run ids tell when)
    from the store and the index; their results are no longer roots. Returns the ids dropped."""
    index.sync(store)
    bound = f"r{max(0, int((now - older_than) * 1e9)):020d}"
    dropped = index.run_ids_before(bound)
    for run_id in dropped:
        store.delete_run_record(run_id)
    index.forget(dropped)
    return dropped
