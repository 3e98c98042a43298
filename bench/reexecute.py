"""Re-execution overhead of trust.reexecute (spot checks of cache hits), adaptive, after warm-up.

A cache with `trust.reexecute: {fraction: F, adaptive: true}` (F = 0.2 unless --fraction).
Rounds of work: K new keys computed (a CPU-bound job), then each key hit H times; a round's
spot checks are judged before the next round starts, so the (node, runtime) streaks carry
over. The first W rounds are warm-up; over the others:

    overhead = compute seconds spent re-executing (the checks' durationMs)
               / compute seconds of the jobs themselves (computed: durationMs; hits: computeSecondsSaved)

against duplicating every job (verify.replicas: 2 on everything), which costs 100% by the same
measure. Target: <= 10%. Every check must agree (honest agents).

    python bench/reexecute.py [--quick] [--fraction F]
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster import Bench, Watcher, load_note, ready, stack
from _common import emit, metric

from memoplane.cluster import protocol as p
from memoplane.cluster import spotcheck as sc

SOURCE = "def main(n):\n    s = 0\n    for i in range(1_500_000):\n        s += i % (n + 7)\n    return s\n"


def cache(b: Bench, fraction: float) -> None:
    body = {"apiVersion": p.API_VERSION, "kind": "ResultCache", "metadata": {"name": "default", "namespace": b.ns},
            "spec": {"store": {"bucket": p.DEFAULT_BUCKET, "prefix": p.default_store_prefix(b.ns)},
                     "trust": {"reexecute": {"fraction": fraction, "adaptive": True}}}}
    if b.kube.create(p.RESULTCACHES, b.ns, body) is None:
        raise RuntimeError("the bench namespace has a cache already")


def status(b: Bench, name: str) -> dict[str, Any]:
    obj = b.kube.get(p.COMPUTEJOBS, b.ns, name)
    return (obj or {}).get("status") or {}


def judged_checks(b: Bench, names: list[str], timeout: float = 600.0) -> list[dict[str, Any]]:
    """The spot checks of `names` that exist, once each is judged."""
    found, deadline = [], time.monotonic() + timeout
    for name in (sc.check_name(n) for n in names):
        obj = b.kube.get(p.COMPUTEJOBS, b.ns, name)
        while obj is not None and sc.JUDGED_ANNOTATION not in obj["metadata"].get("annotations", {}):
            if time.monotonic() > deadline:
                raise RuntimeError(f"spot check {name} not judged")
            time.sleep(0.2)
            obj = b.kube.get(p.COMPUTEJOBS, b.ns, name)
        if obj is not None:
            found.append(obj)
    return found


def one_round(b: Bench, r: int, keys: int, hits: int, salt: str, computed: Watcher, served: Watcher
              ) -> dict[str, float]:
    firsts = [f"c{r}-{k}" for k in range(keys)]
    for k, name in enumerate(firsts):
        b.create(b.ns, b.job(name, SOURCE, {"n": 1000 * r + k}, salt))
    computed.wait(firsts, timeout=900)
    names = [f"h{r}-{k}-{i}" for k in range(keys) for i in range(hits)]
    for name in names:
        k = int(name.split("-")[1])
        b.create(b.ns, b.job(name, SOURCE, {"n": 1000 * r + k}, salt))
    served.wait(names, timeout=900)
    checks = judged_checks(b, names)
    verdicts = [c["metadata"]["annotations"][sc.JUDGED_ANNOTATION] for c in checks]
    if any(v != sc.AGREED for v in verdicts):
        raise RuntimeError(f"round {r}: honest checks did not all agree: {verdicts}")
    return {"jobs": len(firsts) + len(names), "hits": len(names), "checks": len(checks),
            "compute_s": sum(float(status(b, n).get("durationMs") or 0) / 1000 for n in firsts)
            + sum(float(status(b, n).get("computeSecondsSaved") or 0) for n in names),
            "check_s": sum(float((c.get("status") or {}).get("durationMs") or 0) / 1000 for c in checks)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fraction", type=float, default=0.2)
    args = parser.parse_args()
    keys, hits, warmup, measured = (6, 3, 2, 2) if args.quick else (10, 3, 3, 4)
    salt = uuid.uuid4().hex[:12]
    with stack("reexec") as b:
        cache(b, args.fraction)
        computed, served = Watcher(b.kube, b.ns, ready(cached=False)), Watcher(b.kube, b.ns, ready(cached=True))
        rounds = [one_round(b, r, keys, hits, salt, computed, served) for r in range(warmup + measured)]
        computed.close()
        served.close()
    after = rounds[warmup:]
    compute = sum(x["compute_s"] for x in after)
    check = sum(x["check_s"] for x in after)
    overhead = check / compute if compute else float("nan")
    per_round = [f"{int(x['checks'])}/{int(x['hits'])}" for x in rounds]
    print(f"reexecute: fraction {args.fraction}, adaptive; checks/hits per round {per_round} "
          f"(first {warmup} warm-up); after warm-up {check:.2f}s re-executing for {compute:.2f}s of compute "
          f"= {overhead:.1%} (duplicating every job: 100%); {load_note()}")
    emit("reexecute", {"reexecute_overhead": metric(overhead, "fraction of compute", "duplicate every job", 1.0),
                       "checks_per_hit": metric(sum(x["checks"] for x in after) / sum(x["hits"] for x in after),
                                                "checks per hit", "fraction", args.fraction)})


if __name__ == "__main__":
    main()
