"""The audit log over real S3 servers (each of cluster.S3_SERVERS): Backend.create is atomic (a PUT
with If-None-Match: *), so writers racing in threads and processes never lose or fork a record;
tampering is detected there too.

Each test works in its own bucket with a random name and removes it afterwards: other sessions may
share the running control plane.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import minio
import pytest

from memoplane.canonical import canonical_json
from memoplane.cas import S3Backend, Store
from memoplane.cas import audit as au
from memoplane.cas.audit import record_name, verify_chain
from memoplane.cas.s3 import make_client
from memoplane.testing import cluster
from memoplane.trust import SigningKey
from memoplane.trust.audit import sign_head, verify


@dataclass
class Bucket:
    client: minio.Minio
    name: str
    env: dict[str, str]

    def backend(self) -> S3Backend:
        return S3Backend(self.client, self.name, "team/")

    def url(self) -> str:
        return f"s3://{self.name}/team/"


@pytest.fixture(params=cluster.S3_SERVERS)
def bucket(control_plane: cluster.ClusterInfo, request: pytest.FixtureRequest) -> Iterator[Bucket]:
    env = control_plane.env(request.param)
    client = make_client(env["MEMOPLANE_S3_ENDPOINT"], env["MEMOPLANE_S3_ACCESS_KEY"], env["MEMOPLANE_S3_SECRET_KEY"])
    name = f"mp-test-{secrets.token_hex(6)}"
    S3Backend(client, name).ensure_bucket()
    yield Bucket(client, name, env)
    for obj in client.list_objects(name, recursive=True):
        if obj.object_name:
            client.remove_object(name, obj.object_name)
    client.remove_bucket(name)


def test_create_is_atomic(bucket: Bucket) -> None:
    backend = bucket.backend()
    names = [f"audit/records/{n:012d}" for n in range(1, 11)]
    wins: Counter[str] = Counter()
    winner: dict[str, bytes] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def race(w: int) -> None:
        barrier.wait()
        for name in names:
            data = f"writer {w} {name}".encode()
            if backend.create(name, data):
                with lock:
                    wins[name] += 1
                    winner[name] = data

    threads = [threading.Thread(target=race, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins == Counter(dict.fromkeys(names, 1))
    assert all(backend.get(name) == winner[name] for name in names)
    # A plain PUT would have overwritten: the condition really reached the server.
    assert not backend.create(names[0], b"again") and backend.get(names[0]) == winner[names[0]]


_WRITER = """
import sys
from memoplane.cas import open_store
from memoplane.cas.audit import REVOCATION
store = open_store(sys.argv[1])  # audit=None: the store keeps a log, so this writer appends to it
for i in range(int(sys.argv[3])):
    assert store.audit(REVOCATION, keyid=f"node-{i + 1}-1", writer=sys.argv[2]) is not None
"""


def test_racing_writers_in_threads_and_processes_never_fork(bucket: Bucket) -> None:
    Store(bucket.backend(), audit=True, audit_by="test").audit(au.START)
    each = 25
    env = {**os.environ, **bucket.env}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, bucket.url(), f"process-{p}", str(each)], env=env,
                              stderr=subprocess.PIPE, text=True) for p in range(2)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def write(w: int) -> None:
        store = Store(bucket.backend(), audit_by=f"thread-{w}")  # its own tail hint and lock
        barrier.wait()
        try:
            for i in range(each):
                store.audit(au.REVOCATION, keyid=f"node-{i + 1}-1", writer=f"thread-{w}")
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    assert not errors, errors
    log = Store(bucket.backend()).audit_log
    chain = verify_chain(log)
    assert chain.problems == [] and chain.records == chain.last == 1 + 6 * each
    written = Counter((b["writer"], b["keyid"]) for b in (json.loads(d) for _, d in log.read(2)))
    writers = [f"thread-{w}" for w in range(4)] + [f"process-{p}" for p in range(2)]
    assert written == Counter({(w, f"node-{i + 1}-1"): 1 for w in writers for i in range(each)})  # none lost, none twice


def test_tampering_is_detected(bucket: Bucket) -> None:
    store = Store(bucket.backend(), audit=True)
    for i in range(5):
        store.audit(au.REVOCATION, keyid=f"node-{i + 1}-1")
    operator = SigningKey.generate("operator-1")
    assert (checkpoint := sign_head(store, operator, 1.0)) is not None and checkpoint.seq == 5
    keys = {operator.keyid: operator.public}
    assert verify(store.audit_log, keys).ok
    body = json.loads(store.backend.get(record_name(2)))
    data = canonical_json({**body, "keyid": "node-9-1"})
    bucket.client.put_object(bucket.name, "team/" + record_name(2), io.BytesIO(data), len(data))
    bucket.client.remove_object(bucket.name, "team/" + record_name(5))
    assert [str(p) for p in verify(store.audit_log, keys).problems] == [
        "record 3: does not chain to record 2 (record 2 edited or replaced, or reordered)",
        "record 5: missing, though checkpoint 5 (operator-1) signed it (the log was cut at 4)"]
