"""`memoplane-operator` / `python -m memoplane_operator`: the ComputeJob operator (kopf).

Configuration (environment; flags override):
  KUBECONFIG                  else in-cluster
  MEMOPLANE_WATCH_NAMESPACES  kopf namespace patterns, space separated (default: cluster-wide),
                              e.g. "ml research" or "*,!kube-*"
  MEMOPLANE_NAMESPACE         where the agents' Leases live (default memoplane-system)
  MEMOPLANE_S3_ENDPOINT, MEMOPLANE_S3_ACCESS_KEY, MEMOPLANE_S3_SECRET_KEY  the object store
  MEMOPLANE_STORE_ROOT        a directory standing in for the object store
  MEMOPLANE_METRICS_PORT      Prometheus /metrics (default 9090; 0 disables)
  MEMOPLANE_HEALTH_PORT       kopf's liveness endpoint /healthz (default 8081; 0 disables)
  MEMOPLANE_RESYNC_SECONDS    how often unfinished jobs are revisited (default 2)
  MEMOPLANE_STATS_SECONDS     how often ResultCache stats are refreshed (default 30)
  MEMOPLANE_SEED_RESYNC_SECONDS  how often every GMemSeed's inbox is checked (default 10)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import kopf
from prometheus_client import start_http_server

from memoplane.cluster import protocol as p
from memoplane.cluster.kube import Kube, load_config
from memoplane.cluster.metrics import OperatorMetrics
from memoplane.cluster.settings import OperatorSettings
from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.leftovers import sweep

from .gmemseed import SeedReconciler
from .gmemseed import register as register_seeds
from .handlers import register
from .reconciler import Reconciler


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    parser = argparse.ArgumentParser(prog="memoplane-operator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watch-namespaces", default=env.get("MEMOPLANE_WATCH_NAMESPACES", ""))
    parser.add_argument("--lease-namespace", default=env.get("MEMOPLANE_NAMESPACE", "memoplane-system"))
    parser.add_argument("--metrics-port", type=int, default=int(env.get("MEMOPLANE_METRICS_PORT", "9090")))
    parser.add_argument("--health-port", type=int, default=int(env.get("MEMOPLANE_HEALTH_PORT", "8081")))
    parser.add_argument("--resync-seconds", type=float, default=float(env.get("MEMOPLANE_RESYNC_SECONDS", "2")))
    parser.add_argument("--stats-seconds", type=float, default=float(env.get("MEMOPLANE_STATS_SECONDS", "30")))
    parser.add_argument("--backoff-base", type=float, default=float(env.get("MEMOPLANE_BACKOFF_BASE", "1.0")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=env.get("MEMOPLANE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    patterns = p.parse_patterns(args.watch_namespaces)
    metrics = OperatorMetrics()
    config = OperatorSettings(patterns=patterns, lease_namespace=args.lease_namespace,
                            resync_seconds=args.resync_seconds, stats_seconds=args.stats_seconds,
                            backoff_base=args.backoff_base)
    stores = Stores(StoreSettings.from_env())
    sweep()   # the gmem log directories an operator that crashed left behind
    reconciler = Reconciler(config, Kube(load_config()), stores, metrics)
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=metrics.registry)
    registry = kopf.OperatorRegistry()
    register(registry, reconciler)
    register_seeds(registry, SeedReconciler(reconciler.kube, stores, patterns,
                                            float(env.get("MEMOPLANE_SEED_RESYNC_SECONDS", "10"))))
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    kopf.run(registry=registry, standalone=True, liveness_endpoint=liveness,
             clusterwide=not patterns, namespaces=patterns)
    stores.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
