"""`memoplane submit --input NAME=@FILE` over the ConfigMap limit: the file is uploaded to the
namespace's home store and the job names its digest (fromBlob); the operator finds it there and
copies it, chunk by chunk, into the job's store. Real filesystem stores stand in for S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from memoplane_operator.lookups import Lookups

from memoplane.cluster import protocol as p
from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.commands.cluster import CONFIGMAP_LIMIT
from memoplane.jobs import BlobInput
from memoplane.keys import digest_bytes

DATA = os.urandom(3 * 10**6)


def _lookups(stores: Stores, namespace: str) -> Lookups:
    job_store = stores.get("results", f"{namespace}/cache/")
    return Lookups(None, stores, namespace, job_store, None, ())  # type: ignore[arg-type]  # kube, caches unused


def test_an_upload_in_the_home_is_copied_into_the_jobs_store(tmp_path: Path) -> None:
    stores = Stores(StoreSettings(root=str(tmp_path)))
    home = stores.get(p.DEFAULT_BUCKET, p.default_store_prefix("ml"))
    digest = home.put_bytes(DATA).digest
    lookups = _lookups(stores, "ml")
    assert lookups.stored_blob(digest) == BlobInput(digest, len(DATA))
    assert lookups.store.get_bytes(digest) == DATA
    assert lookups.stored_blob(digest) == BlobInput(digest, len(DATA))  # now found in the job's store itself


def test_an_upload_of_another_namespace_is_not_found(tmp_path: Path) -> None:
    stores = Stores(StoreSettings(root=str(tmp_path)))
    digest = stores.get(p.DEFAULT_BUCKET, p.default_store_prefix("other")).put_bytes(DATA).digest
    assert _lookups(stores, "ml").stored_blob(digest) is None


def _submit(tmp_path: Path, data: bytes, *extra: str) -> dict[str, object]:
    script, path = tmp_path / "job.py", tmp_path / "table.bin"
    script.write_text("def main(table):\n    return len(table)\n")
    path.write_bytes(data)
    proc = subprocess.run([sys.executable, "-m", "memoplane.cli", "submit", str(script), "--input", f"table=@{path}",
                           "--dry-run", "-n", "ml", *extra], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (item,) = json.loads(proc.stdout)["spec"]["inputs"]
    return dict(item)


def test_submit_names_a_large_file_by_digest_and_keeps_small_ones_in_a_config_map(tmp_path: Path) -> None:
    big = DATA[: CONFIGMAP_LIMIT + 1]
    assert _submit(tmp_path, big, "--as", "table=path") == {
        "name": "table", "fromBlob": {"digest": digest_bytes(big)}, "as": "path"}
    assert set(_submit(tmp_path, DATA[:CONFIGMAP_LIMIT])) == {"name", "fromConfigMap"}
