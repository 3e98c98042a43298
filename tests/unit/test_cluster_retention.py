"""Retention decisions: least recently used first by last use (not write time), maxAge by last
use, the grace period, roots never chosen; the status figures counted from the usage index."""

from __future__ import annotations

import json

from memoplane.cas.usage import Entry, UsageIndex
from memoplane.cluster import mapping as mp
from memoplane.cluster import protocol as p
from memoplane.cluster import retention as rt

NOW = 1_000_000.0
GRACE = 60.0


def entries(**spec: tuple[float, float, int]) -> dict[str, Entry]:
    """name=(seconds since written, seconds since last used, size)."""
    return {name: Entry(NOW - w, NOW - u, size) for name, (w, u, size) in spec.items()}


def choose(found: dict[str, Entry], retention: rt.Retention, roots: frozenset[str] = frozenset(),
           limit: int = 100) -> list[str]:
    return rt.choose_evictions(found, retention, set(roots), NOW, GRACE, limit)


def test_max_age_is_by_last_use_not_write_time() -> None:
    found = entries(old_but_hit=(10_000, 100, 1), unused=(5_000, 5_000, 1), fresh=(200, 200, 1))
    assert choose(found, rt.Retention(max_age=3_600, max_bytes=None)) == ["unused"]


def test_max_bytes_evicts_least_recently_used_first_until_the_rest_fits() -> None:
    found = entries(a=(900, 100, 40), b=(800, 800, 40), c=(700, 500, 40))
    assert choose(found, rt.Retention(max_age=None, max_bytes=80)) == ["b"]
    assert choose(found, rt.Retention(max_age=None, max_bytes=40)) == ["b", "c"]
    assert choose(found, rt.Retention(max_age=None, max_bytes=120)) == []


def test_nothing_written_or_used_within_the_grace_period_goes() -> None:
    found = entries(just_hit=(9_000, 10, 100), just_rewritten=(10, 9_000, 100), idle=(9_000, 9_000, 100))
    assert choose(found, rt.Retention(max_age=1, max_bytes=0)) == ["idle"]


def test_roots_are_never_chosen_but_their_bytes_count() -> None:
    found = entries(root=(9_000, 9_000, 100), other=(500, 500, 10))
    assert choose(found, rt.Retention(max_age=1, max_bytes=50), roots=frozenset({"root"})) == ["other"]


def test_at_most_limit_per_pass() -> None:
    found = entries(a=(900, 900, 1), b=(800, 800, 1), c=(700, 700, 1))
    assert choose(found, rt.Retention(max_age=1, max_bytes=None), limit=2) == ["a", "b"]


def test_retention_of_reads_go_durations_and_quantities() -> None:
    assert rt.retention_of({"spec": {"retention": {"maxAge": "1h30m", "maxBytes": "1Ki"}}}) == \
        rt.Retention(5_400.0, 1024)
    assert rt.retention_of({"spec": {"retention": {}}}) is None
    assert rt.retention_of({"spec": {}}) is None


def test_stats_fields_come_from_the_index_and_say_only_what_changed() -> None:
    index = UsageIndex(entries(a=(1, 1, 300), b=(1, 1, 100)), evicted=2, last_eviction=0.0, stored_per_logical=0.25)
    fields = rt.stats_fields(index, {})
    assert fields == {"entries": 2, "logicalBytes": 400, "storedBytes": 100, "dedupRatio": 4.0,
                      "evictedEntries": 2, "lastEvictionTime": "1970-01-01T00:00:00Z"}
    assert rt.stats_fields(index, fields) == {}
    unmeasured = rt.stats_fields(UsageIndex(entries(a=(1, 1, 3))), {})
    assert "storedBytes" not in unmeasured and unmeasured["entries"] == 1


def job(key: str, *, store: str = "s3://memoplane/ml", cached: bool = False, phase: str = p.SUCCEEDED,
        digest: str = "b3:" + "22" * 32) -> dict[str, object]:
    return {"metadata": {"name": key, "namespace": "ml"},
            "status": {"phase": phase, "cacheKey": key, "cached": cached, "completionTime": "2026-01-02T03:04:05Z",
                       "result": {"digest": digest, "size": 7, "store": store}}}


def test_a_computed_result_is_a_write_dated_by_its_completion_and_a_hit_is_not() -> None:
    found = rt.written_use(job("b3:k"))
    assert found is not None
    url, use = found
    assert url == "s3://memoplane/ml" and use.kind == "write" and use.size == 7 and use.at == 1767323045.0
    assert rt.written_use(job("b3:k", cached=True)) is None
    assert rt.written_use(job("b3:k", phase=p.FAILED)) is None


def test_a_result_not_cached_is_not_a_write() -> None:
    at_quota = job("b3:k")
    at_quota["metadata"]["annotations"] = {p.CACHE_RESULT_ANNOTATION: "false"}  # type: ignore[index]
    assert rt.written_use(at_quota) is None
    assert rt.written_use({**job("b3:k"), "spec": {"cache": {"policy": "Bypass"}}}) is None


def test_roots_are_the_jobs_and_seeds_of_the_store() -> None:
    jobs = [job("b3:mine"), job("b3:elsewhere", store="s3://memoplane/other")]
    assert rt.job_roots(jobs, "s3://memoplane/ml") == {"b3:mine"}
    assert rt.job_results(jobs, "s3://memoplane/ml") == {"b3:" + "22" * 32}
    seeds = [{"status": {"store": "s3://memoplane/ml", "overlayBlob": {"digest": "b3:blob", "size": 3}}},
             {"status": {"store": "s3://memoplane/ml", "overlayBlob": None}}]
    assert rt.seed_blobs(seeds, "s3://memoplane/ml") == {"b3:blob"}


def batch(phase: str = p.SUCCEEDED, *, sizes: list[int] | None = None, results: int = 2,
          policy: str | None = None) -> dict[str, object]:
    """A settled spec.map batch of two elements (keys b3:e0, b3:e1) that computed `results` of them."""
    keys = ["b3:e0", "b3:e1"]
    return {"metadata": {"name": "m-0123456789", "namespace": "ml",
                         "annotations": {mp.BATCH_ANNOTATION: "x", mp.KEYS_ANNOTATION: json.dumps(keys),
                                         p.STORE_ANNOTATION: "s3://memoplane/ml"}},
            "spec": {"cache": {"policy": policy}} if policy else {},
            "status": {"phase": phase, "cacheKey": mp.batch_key("x", keys), "completionTime": "2026-01-02T03:04:05Z",
                       "result": None, "map": {"results": ["b3:" + f"{n}" * 64 for n in range(results)],
                                               "sizes": sizes}}}


def test_a_batch_wrote_each_element_it_computed_under_the_elements_key_with_its_size() -> None:
    found = rt.written_uses(batch(sizes=[5, 9]))
    assert found is not None
    url, uses = found
    assert url == "s3://memoplane/ml"
    assert [(u.key, u.kind, u.size, u.at) for u in uses] == [("b3:e0", "write", 5, 1767323045.0),
                                                            ("b3:e1", "write", 9, 1767323045.0)]
    failed = rt.written_uses(batch(p.FAILED, sizes=[5], results=1))   # the element before the failure
    assert failed is not None and [(u.key, u.size) for u in failed[1]] == [("b3:e0", 5)]
    unsized = rt.written_uses(batch(sizes=None))
    assert unsized is not None and [u.size for u in unsized[1]] == [0, 0]   # measured by the next reindex


def test_a_batch_not_settled_or_not_cached_wrote_nothing_and_a_plain_job_writes_as_before() -> None:
    assert rt.written_uses(batch(p.RUNNING, sizes=[5, 9])) is None
    assert rt.written_uses(batch(sizes=[5, 9], policy="Bypass")) is None
    assert rt.written_uses(batch(p.FAILED, results=0)) is None
    plain = rt.written_uses(job("b3:k"))
    assert plain is not None and [(u.key, u.size) for u in plain[1]] == [("b3:k", 7)]
    assert rt.written_uses(job("b3:k", cached=True)) is None
