"""The DESIGN §2 example specs, as data: docs, `kubectl explain`-style help and tests use them."""

from __future__ import annotations

import copy
from typing import Any

_COMPUTEJOB_SPEC: dict[str, Any] = {
    "python": {
        "source": "def main(rows, scale):\n    return {\"total\": sum(rows) * scale}\n",
        "entrypoint": "main",
    },
    "inputs": [
        {"name": "rows", "value": [1, 2, 3]},
        {"name": "scale", "value": 10},
        {"name": "raw", "fromJob": {"name": "download"}},
        {"name": "noise", "fromSeed": {"name": "field", "offset": 0, "count": 1000000}},
        {"name": "table", "fromObject": {"bucket": "data", "key": "t.parquet"}},
        {"name": "settings", "fromConfigMap": {"name": "featurize", "key": "settings.json"}},
    ],
    "map": {"over": "rows"},
    "env": {"MODE": "fast"},
    "runtime": {"profile": "python"},
    "cache": {"resultCache": "default", "policy": "Use", "version": "1"},
    "resources": {"cpu": "1", "memory": "512Mi", "timeoutSeconds": 60, "maxOutputBytes": "1Gi"},
    "backoffLimit": 2,
}

_RESULTCACHE_SPEC: dict[str, Any] = {
    "store": {"bucket": "memoplane", "prefix": "ml/"},
    "trust": {"keys": [{"secretRef": {"name": "ml-team-keys"}},
                       {"publicKey": {"keyId": "ci-2", "key": "YCVqevkm2di+qD65dqFC8tGuI5+4Djlh3skNQxaAR4w="}}],
              "revoked": ["ci-1"], "minSignatures": 1, "clusterAgents": True},
    "sharing": {"readers": {"namespaces": ["ml-eval"]},
                "writers": {"namespaceSelector": {"matchLabels": {"team": "ml"}}}},
}

_GMEMSEED_SPEC: dict[str, Any] = {"seed": 1337, "dtype": "float64", "layers": [{"seed": 7, "weight": 0.5}]}


def computejob_spec() -> dict[str, Any]:
    return copy.deepcopy(_COMPUTEJOB_SPEC)


def resultcache_spec() -> dict[str, Any]:
    return copy.deepcopy(_RESULTCACHE_SPEC)


def gmemseed_spec() -> dict[str, Any]:
    return copy.deepcopy(_GMEMSEED_SPEC)
