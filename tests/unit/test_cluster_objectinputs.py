"""The fromObject allowlist: its setting (MEMOPLANE_OBJECT_INPUTS) and the decision who may read what."""

from __future__ import annotations

import json

import pytest

from memoplane.cluster import protocol as p
from memoplane.cluster.objectinputs import checked_grants, refusal
from memoplane.errors import InputError
from memoplane.settings import OBJECT_INPUTS_ENV, ObjectGrant, OperatorSettings, from_env

GRANTS = (ObjectGrant(("ml",), "data", "tables/"), ObjectGrant(None, "public", ""))
RESULTS = {p.DEFAULT_BUCKET, "team-cache"}


def settings(value: object) -> OperatorSettings:
    text = value if isinstance(value, str) else json.dumps(value)
    return from_env(OperatorSettings, {OBJECT_INPUTS_ENV: text})


def test_the_default_allows_nothing() -> None:
    assert from_env(OperatorSettings, {}).object_grants() == ()
    assert "not in namespace ml's object allowlist" in str(refusal((), "ml", "data", "tables/t.csv", RESULTS))


def test_the_setting_is_parsed_from_json() -> None:
    got = settings([{"namespaces": ["ml"], "bucket": "data", "prefix": "tables/"},
                    {"namespaces": "*", "bucket": "public", "prefix": ""}]).object_grants()
    assert got == GRANTS


@pytest.mark.parametrize(("value", "names"), [
    ("[{", f"{OBJECT_INPUTS_ENV} is not JSON"),
    ({"bucket": "data"}, f"{OBJECT_INPUTS_ENV} is not a list"),
    ([{"bucket": "data", "prefix": ""}], f"{OBJECT_INPUTS_ENV}[0] must have exactly the keys"),
    ([{"namespaces": "*", "bucket": "", "prefix": ""}], f"{OBJECT_INPUTS_ENV}[0].bucket"),
    ([{"namespaces": "*", "bucket": "d", "prefix": ""}, {"namespaces": "*", "bucket": "d", "prefix": "t"}],
     f"{OBJECT_INPUTS_ENV}[1].prefix 't'"),
    ([{"namespaces": [], "bucket": "d", "prefix": ""}], f"{OBJECT_INPUTS_ENV}[0].namespaces"),
    ([{"namespaces": ["ml", "*"], "bucket": "d", "prefix": ""}], f"{OBJECT_INPUTS_ENV}[0].namespaces"),
])
def test_a_bad_setting_is_one_line_naming_it(value: object, names: str) -> None:
    with pytest.raises(InputError) as caught:
        settings(value).object_grants()
    assert names in str(caught.value) and "\n" not in str(caught.value) and caught.value.fix


def test_the_default_result_bucket_is_refused_at_start() -> None:
    bad = settings([{"namespaces": "*", "bucket": "data", "prefix": ""},
                    {"namespaces": "*", "bucket": p.DEFAULT_BUCKET, "prefix": "ml/"}])
    with pytest.raises(InputError) as caught:
        checked_grants(bad)
    assert f"{OBJECT_INPUTS_ENV}[1] lists bucket '{p.DEFAULT_BUCKET}'" in str(caught.value)
    assert "objectInputs" in caught.value.fix


def test_a_namespace_reads_only_what_it_is_granted() -> None:
    assert refusal(GRANTS, "ml", "data", "tables/2026/t.csv", RESULTS) is None
    assert refusal(GRANTS, "web", "public", "anything", RESULTS) is None
    assert refusal(GRANTS, "web", "data", "tables/t.csv", RESULTS) == (
        "bucket 'data' key 'tables/t.csv' is not in namespace web's object allowlist: "
        "ask the cluster admin to add it to the chart's objectInputs")
    assert refusal(GRANTS, "ml", "data", "tablesX/t.csv", RESULTS) is not None   # a prefix is a directory
    assert refusal(GRANTS, "ml", "other", "tables/t.csv", RESULTS) is not None


def test_result_buckets_are_never_readable_even_when_granted() -> None:
    granted = (*GRANTS, ObjectGrant(None, "team-cache", ""))
    why = refusal(granted, "ml", "team-cache", "ml/refs/x", RESULTS)
    assert why is not None and "never readable as raw objects" in why and "fromJob" in why
    assert refusal(GRANTS, "ml", p.DEFAULT_BUCKET, "other/refs/x", RESULTS) is not None


@pytest.mark.parametrize("key", ["tables/../secret", "tables/./t", "tables//t", "tables/"])
def test_keys_with_odd_segments_are_refused(key: str) -> None:
    why = refusal(GRANTS, "ml", "data", key, RESULTS)
    assert why is not None and "segment" in why
