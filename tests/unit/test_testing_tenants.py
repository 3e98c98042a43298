"""memoplane.testing.tenants: the prefix policy the tests use is the one the chart README documents."""

from __future__ import annotations

import json
import re
from pathlib import Path

from memoplane.testing.tenants import prefix_policy

README = Path(__file__).resolve().parents[2] / "charts" / "memoplane" / "README.md"


def test_the_documented_policy_is_the_tested_one() -> None:
    documented = re.search(r"<<'JSON'\n(.*?)\nJSON\n", README.read_text(), re.S)
    assert documented is not None, "the policy block is gone from charts/memoplane/README.md"
    assert json.loads(documented.group(1)) == prefix_policy("shared", "cluster-a/")


def test_writes_are_granted_under_the_prefix_only() -> None:
    statements = prefix_policy("b", "/c1/")["Statement"]
    writes = [s for s in statements if "s3:PutObject" in s["Action"]]
    assert [s["Resource"] for s in writes] == [["arn:aws:s3:::b/c1/*"]]
    assert all(not a.startswith("s3:Put") and a != "s3:DeleteObject"
               for s in statements if s not in writes for a in s["Action"])
