"""What the audit log costs a ref write (Store.set_ref), on a filesystem store in $TMPDIR.

Three stores, written interleaved call by call so machine load hits them alike:
  - off:     Store(audit=False), no log: the baseline
  - default: Store() on a store without a log (what every store does unless a log was started:
             one existence check per RECHECK_SECONDS)
  - on:      a store keeping a log: each set_ref also appends one record (an atomic create)
Each store uses the default durability ("flush": a ref, and an audit record, are fsynced).
Medians of per-call times.

    python bench/audit.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emit, metric

from memoplane.cas import FilesystemBackend, Provenance, ResultManifest, Store


def prepared(root: Path, audit: bool | None) -> tuple[Store, str]:
    store = Store(FilesystemBackend(root), audit=audit)
    empty = store.put_bytes(b"")
    key = "b3:" + "0" * 64
    result = ResultManifest(store.put_value({"sum": 4}), empty, empty, Provenance(key, {}, key, "bench", 0.0, 1.0, 1.0))
    return store, store.put_result(result)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    n = 200 if parser.parse_args().quick else 1000
    samples: dict[str, list[float]] = {"off": [], "default": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {name: prepared(Path(tmp) / name, {"off": False, "default": None, "on": True}[name])
                  for name in samples}
        for i in range(n):
            key = "b3:" + f"{i:064x}"
            for name, (store, result) in stores.items():
                t = time.perf_counter()
                store.set_ref(key, result)
                samples[name].append(time.perf_counter() - t)
        assert stores["on"][0].audit_log.started() and not stores["default"][0].audit_log.started()
    ms = {name: round(statistics.median(s) * 1000, 3) for name, s in samples.items()}
    for name, value in ms.items():
        print(f"set_ref {name}: median {value} ms over {n}")
    emit("audit", {"set_ref_default_ms": metric(ms["default"], "ms", "audit_off", ms["off"]),
                   "set_ref_audit_on_ms": metric(ms["on"], "ms", "audit_off", ms["off"])})


if __name__ == "__main__":
    main()
