"""memoplane.settings: one field per concept, read from the environment, overridden by flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memoplane.cas import cached
from memoplane.errors import InputError
from memoplane.settings import (
    LOCAL_CACHE_BYTES,
    AgentSettings,
    OperatorSettings,
    ServeSettings,
    StoreSettings,
    add_flags,
    flag_values,
    from_env,
)


def test_environment_then_flags_then_defaults() -> None:
    env = {"MEMOPLANE_RESYNC_SECONDS": "0.5", "MEMOPLANE_NAMESPACE": "sys", "MEMOPLANE_METRICS_PORT": ""}
    parser = argparse.ArgumentParser()
    add_flags(parser, OperatorSettings, ("lease_namespace", "resync_seconds", "metrics_port"))
    args = parser.parse_args(["--lease-namespace", "flagged"])
    got = from_env(OperatorSettings, env, **flag_values(args, ("lease_namespace", "resync_seconds", "metrics_port")))
    assert (got.resync_seconds, got.lease_namespace, got.metrics_port) == (0.5, "flagged", 9090)


def test_a_bad_number_names_the_variable() -> None:
    with pytest.raises(InputError, match="MEMOPLANE_CAPACITY='two' is not a number"):
        from_env(AgentSettings, {"MEMOPLANE_CAPACITY": "two"})


@pytest.mark.parametrize(("text", "want"), [("0", False), ("false", False), ("1", True), ("yes", True)])
def test_booleans(text: str, want: bool) -> None:
    assert from_env(AgentSettings, {"MEMOPLANE_REQUIRE_ISOLATION": text}).require_isolation is want


def test_one_node_cache_default_and_one_name_per_concept() -> None:
    assert StoreSettings().local_cache_bytes == cached.DEFAULT_MAX_BYTES == LOCAL_CACHE_BYTES
    settings = StoreSettings.from_env({"MEMOPLANE_LOCAL_CACHE": "/c", "MEMOPLANE_LOCAL_CACHE_BYTES": "5"})
    assert (settings.local_cache, settings.local_cache_bytes) == ("/c", 5)
    for cls in (StoreSettings, OperatorSettings, AgentSettings, ServeSettings):
        names = [f.metadata["env"] for f in dataclasses.fields(cls) if f.metadata.get("env")]
        assert len(names) == len(set(names)), cls
        assert all(f.metadata["doc"] for f in dataclasses.fields(cls)), cls


def test_home_location_is_the_default_bucket_and_a_prefix_for_the_homes() -> None:
    from memoplane.cluster import protocol as p
    from memoplane.settings import HOME_ENV, home_location

    assert home_location({}) == ("memoplane", "") == (p.DEFAULT_BUCKET, p.HOME_PREFIX)
    assert p.default_store_prefix("ml") == "ml/"
    assert home_location({HOME_ENV: "s3://shared/cluster-a/"}) == ("shared", "cluster-a")
    for bad in ("shared/cluster-a", "s3://", "s3:///x", "s3://b/../x"):
        with pytest.raises(InputError) as caught:
            home_location({HOME_ENV: bad})
        assert str(caught.value).startswith(f"{HOME_ENV}={bad!r} is not s3://bucket[/prefix]")


@pytest.mark.parametrize("program", ["memoplane_operator", "memoplane_agent"])
def test_a_malformed_home_stops_a_program_in_one_line(program: str) -> None:
    """MEMOPLANE_HOME is read when memoplane.cluster.protocol is imported: a bad value must still reach
    the user as the program's one-line start error, not as a traceback from the import."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MEMOPLANE_HOME": "http://not-a-bucket", "NODE_NAME": "n",
           "PYTHONPATH": os.pathsep.join(str(root / d) for d in (".", "operator", "sandbox-node"))}
    done = subprocess.run([sys.executable, "-m", program], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "MEMOPLANE_HOME='http://not-a-bucket' is not s3://bucket" in done.stderr
