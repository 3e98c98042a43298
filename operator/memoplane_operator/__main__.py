"""`memoplane-operator` / `python -m memoplane_operator`: the ComputeJob operator (kopf).

Configuration: the environment (memoplane.settings.OperatorSettings, SigningSettings and
StoreSettings, listed below), overridden by flags; KUBECONFIG, else in-cluster. The agents'
signing key is required: its public key is the cluster agents' key that ResultCaches trust
by default, and the operator attests the map results it computes with it.
"""

from __future__ import annotations

import argparse
import logging
import sys

import kopf
from prometheus_client import start_http_server

from memoplane.cluster.kube import Kube, load_config
from memoplane.cluster.metrics import OperatorMetrics
from memoplane.cluster.objectinputs import checked_grants
from memoplane.cluster.stores import Stores
from memoplane.cluster.trust import load_signer
from memoplane.errors import MemoplaneError
from memoplane.history import events
from memoplane.leftovers import sweep
from memoplane.settings import (
    OperatorSettings,
    SigningSettings,
    StoreSettings,
    add_flags,
    describe,
    flag_values,
    from_env,
    home_location,
)

from .gmemseed import SeedReconciler
from .gmemseed import register as register_seeds
from .handlers import register
from .reconciler import Reconciler

FLAGS = ("watch_namespaces", "lease_namespace", "metrics_port", "health_port", "resync_seconds", "stats_seconds",
         "backoff_base")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memoplane-operator", description=__doc__,
                                     epilog="\n".join(describe(s) for s in (OperatorSettings, SigningSettings, StoreSettings)),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, OperatorSettings, FLAGS)
    args = parser.parse_args(argv)
    try:
        settings = from_env(OperatorSettings, **flag_values(args, FLAGS))
        home_location()  # a malformed MEMOPLANE_HOME stops the start, in one line
        checked_grants(settings)  # a bad fromObject allowlist stops the start, in one line
        signer = load_signer(from_env(SigningSettings))
        stores = Stores(StoreSettings.from_env())
    except MemoplaneError as exc:
        parser.exit(2, f"memoplane-operator: {exc}\n")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    metrics = OperatorMetrics()
    events.configure(settings.openlineage_url, lambda outcome: metrics.openlineage.labels(outcome).inc())
    sweep()   # the gmem log directories an operator that crashed left behind
    reconciler = Reconciler(settings, Kube(load_config()), stores, signer, metrics)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=metrics.registry)
    registry = kopf.OperatorRegistry()
    register(registry, reconciler)
    register_seeds(registry, SeedReconciler(reconciler.kube, stores, reconciler.patterns,
                                            settings.seed_resync_seconds))
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    kopf.run(registry=registry, standalone=True, liveness_endpoint=liveness,
             clusterwide=not reconciler.patterns, namespaces=reconciler.patterns)
    stores.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
