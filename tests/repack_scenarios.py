"""Scenarios for repacking GC (memoplane.cas.repack), shared by the filesystem tests
(tests/unit/test_cas_repack.py) and the MinIO ones (tests/integration/test_s3_repack.py).

`Scenario` models the store's writers on a real backend: a writer loads (refreshes) its index,
packs chunks through PackWriter, flushes, then commits them ("writes a ref": they become live).
GC's mark is a snapshot of what is committed. Time is injected: `collect(now=...)` against the
backend's real mtimes, so "a grace period later" is `now + GRACE`, never a sleep.

Run as a script it is a process to kill (SIGKILL from inside, at a chosen backend call):
    python tests/repack_scenarios.py write SPEC SEED N        a writer killed before its segment
    python tests/repack_scenarios.py gc SPEC LIVE OP PREFIX NTH NOW   a GC killed mid-run
SPEC is JSON: {"fs": path} or {"s3": {endpoint, access_key, secret_key, bucket, prefix}}.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from fakes import DelegatingBackend

from memoplane.cas import FilesystemBackend, S3Backend, b3
from memoplane.cas.backend import Backend
from memoplane.cas.chunking import encode_chunk
from memoplane.cas.packs import INDEX, PACKS, TOMBSTONES, PackIndex, PackWriter, load_segment, read_chunks
from memoplane.cas.repack import Policy, RepackReport, collect, load_layout, usage, worth_repacking
from memoplane.cas.s3 import make_client

KiB = 1 << 10
GRACE = 3600.0
POLICY = Policy(grace=GRACE, min_pack_age=GRACE)
PACK_BYTES = 32 * KiB  # small packs: a scenario spans several, and a repack writes several
SCRIPT = Path(__file__).resolve()


def plain(key: object) -> bytes:
    """A distinct 8 KiB chunk: 6 KiB random, 2 KiB constant (stored compressed)."""
    return random.Random(str(key)).randbytes(6 * KiB) + b"\0" * (2 * KiB)


def later() -> float:
    """A GC clock a grace period past everything written so far (safe only with no writer running)."""
    return time.time() + GRACE + 2


def wait_for(condition: Callable[[], bool], what: str, deadline: float = 120.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def next_second() -> float:
    """Now, once the wall clock has entered a new whole second: any object written afterwards has
    a later mtime than the returned time, even on a backend that keeps whole seconds (S3)."""
    start = time.time()
    wait_for(lambda: time.time() >= math.floor(start) + 1, "the next second")
    return start


def loaded(backend: Backend) -> PackIndex:
    index = PackIndex()
    index.refresh(backend)
    return index


class Scenario:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.plains: dict[str, bytes] = {}
        self.live: set[str] = set()
        self._lock = threading.Lock()

    def write(self, keys: Iterable[object], *, commit: bool = True, index: PackIndex | None = None) -> list[str]:
        """Pack chunks for `keys` (deduplicating against `index`, else a freshly loaded one)."""
        writer = PackWriter(self.backend, index if index is not None else loaded(self.backend), target=PACK_BYTES)
        digests = []
        for key in keys:
            data = plain(key)
            digest = b3(data)
            writer.add(digest, partial(encode_chunk, data), len(data))
            digests.append(digest)
            with self._lock:
                self.plains[digest] = data
        writer.flush()
        if commit:
            self.commit(digests)
        return digests

    def commit(self, digests: Iterable[str]) -> None:
        with self._lock:
            self.live.update(digests)

    def mark(self) -> set[str]:
        with self._lock:
            return set(self.live)

    def gc(self, now: float, backend: Backend | None = None) -> RepackReport:
        return collect(backend or self.backend, self.mark(), POLICY, now, target=PACK_BYTES)

    def check_live(self, index: PackIndex | None = None) -> None:
        """Every committed chunk reads back, verified, through `index` (else a fresh one)."""
        live = sorted(self.mark())
        got = read_chunks(self.backend, index if index is not None else loaded(self.backend), live)
        assert all(got[d] == self.plains[d] for d in live)

    def dead_in_packs(self) -> set[str]:
        """Chunks an indexed, stored pack holds that nothing committed."""
        stored = {d for d, _ in self.pack_infos()}
        held = {d for seg in self.segments() for d, loc in seg.records if loc.pack in stored}
        return held - self.mark()

    def worth_repacking(self) -> frozenset[str]:
        """Packs whose dead share is still at the policy's threshold or above (writers that
        deduplicate at random leave some packs a little dead: below it, they stay)."""
        return worth_repacking(usage(load_layout(self.backend), self.mark()), POLICY)

    def pack_infos(self) -> list[tuple[str, int]]:
        return [("b3:" + i.name.rsplit("/", 1)[-1], i.size) for i in self.backend.list(PACKS)]

    def pack_bytes(self) -> int:
        return sum(size for _, size in self.pack_infos())

    def segments(self) -> list[Any]:
        return [load_segment(self.backend, i.name) for i in self.backend.list(INDEX)]

    def tombstones(self) -> int:
        return sum(1 for _ in self.backend.list(TOMBSTONES))

    def unindexed(self) -> set[str]:
        named = {loc.pack for seg in self.segments() for _, loc in seg.records}
        return {p for p, _ in self.pack_infos()} - named


def seeded(backend: Backend) -> Scenario:
    """One write (one segment, many packs) of 90 chunks: the first 30 dead, a third of the next
    30 dead, the last 30 live."""
    s = Scenario(backend)
    digests = s.write(range(90), commit=False)
    s.commit(d for i, d in enumerate(digests) if i >= 60 or (i >= 30 and i % 3))
    return s


class Crash(BaseException):
    """A GC stopped at an injected point (BaseException: nothing on the way catches it)."""


WRITE = "write"  # an `op` for Dying: any call that writes an object (put, put_if_absent, create)
WRITES = ("put", "put_if_absent", "create")


class Dying(DelegatingBackend):
    """Stops the process (SIGKILL) or the call (Crash) before the `nth` `op` on a name under `prefix`
    (op WRITE: whichever call writes it; a PackWriter PUTs packs and segments on its upload thread
    with `put`, GC writes its own index objects with `put_if_absent`: the kill point names the step,
    not the call)."""

    def __init__(self, inner: Backend, op: str, prefix: str, nth: int, *, kill: bool = False) -> None:
        super().__init__(inner)
        self.op, self.prefix, self.nth, self.kill = op, prefix, nth, kill
        self.seen = 0

    def before(self, op: str, name: str) -> None:
        if (op == self.op or (self.op == WRITE and op in WRITES)) and name.startswith(self.prefix):
            self.seen += 1
            if self.seen == self.nth:
                if self.kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise Crash(f"{op} {name}")


# -- processes to kill ----------------------------------------------------------------


def spec_of(backend: Backend) -> dict[str, Any]:
    if isinstance(backend, FilesystemBackend):
        return {"fs": str(backend.root)}
    if isinstance(backend, S3Backend):
        return {"s3": {"endpoint": backend.endpoint, "access_key": os.environ["MEMOPLANE_S3_ACCESS_KEY"],
                       "secret_key": os.environ["MEMOPLANE_S3_SECRET_KEY"], "bucket": backend.bucket,
                       "prefix": backend.prefix}}
    raise TypeError(f"no spec for {backend!r}")


def open_spec(spec: dict[str, Any]) -> Backend:
    if "fs" in spec:
        return FilesystemBackend(spec["fs"], durability="none")
    s3 = spec["s3"]
    return S3Backend(make_client(s3["endpoint"], s3["access_key"], s3["secret_key"]), s3["bucket"], s3["prefix"])


def run_killed(*args: str) -> None:
    """Run this script with `args`; it must die of SIGKILL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent), *sys.path])}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


def _main(argv: list[str]) -> None:
    backend = open_spec(json.loads(argv[1]))
    if argv[0] == "write":  # pack N chunks, die before writing the segment
        Scenario(Dying(backend, WRITE, INDEX, 1, kill=True)).write(
            (f"w{argv[2]}-{i}" for i in range(int(argv[3]))), index=PackIndex())
    elif argv[0] == "gc":
        live = set(json.loads(Path(argv[2]).read_text()))
        collect(Dying(backend, argv[3], argv[4], int(argv[5]), kill=True), live, POLICY, float(argv[6]),
                target=PACK_BYTES)
    raise SystemExit("the kill point was never reached")


if __name__ == "__main__":
    _main(sys.argv[1:])
