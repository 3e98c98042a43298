"""`memoplane-agent` / `python -m memoplane_agent`: one process per node (a DaemonSet pod).

Configuration: the environment (memoplane.settings.AgentSettings and StoreSettings, listed
below), overridden by flags; KUBECONFIG, else in-cluster. The store's keys: prefer
MEMOPLANE_S3_CREDENTIALS_DIR, a directory with two files, `accessKey` and `secretKey`, each
holding the key (a trailing newline is ignored), mode 0400 or 0600 (the chart mounts the
store Secret there with defaultMode 0400), read once at start; the agent refuses to start if
a file is missing, empty or readable by group or others. A process's initial environment
stays readable in /proc/<pid>/environ for its whole life, so the key variables are for the
operator and local tools. The agent's own signing key lives in MEMOPLANE_NODE_KEY_DIR (required,
kept on the node): made there on first start (`<node>-<epoch>`, memoplane.trust.nodekey),
re-used after; every result the agent computes is attested with it, and its public key is
announced in the node's Lease, where the operator learns it (DESIGN §11).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from memoplane.cluster import protocol as p
from memoplane.cluster.agentkeys import latest_epoch, remembered
from memoplane.cluster.kube import Kube, load_config
from memoplane.cluster.metrics import AgentMetrics
from memoplane.cluster.stores import Stores
from memoplane.errors import InputError, MemoplaneError
from memoplane.history import events
from memoplane.server.placement import read_secret
from memoplane.settings import (
    NODE_KEY_DIR_ENV,
    AgentSettings,
    ServeSettings,
    StoreSettings,
    add_flags,
    describe,
    flag_values,
    from_env,
    home_location,
)
from memoplane.trust.nodekey import node_key

from .agent import Agent, AgentConfig
from .http import serve
from .sessions import SessionEndpoint

FLAGS = ("node", "lease_namespace", "watch_namespaces", "capacity", "profiles", "http_host", "http_port",
         "backoff_base")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memoplane-agent", description=__doc__,
                                     epilog="\n".join(describe(s) for s in (AgentSettings, StoreSettings)),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, AgentSettings, FLAGS)
    parser.add_argument("--local-cache", default=None, help="the node-local chunk cache directory "
                                                            "(env MEMOPLANE_LOCAL_CACHE)")
    args = parser.parse_args(argv)
    try:
        settings = from_env(AgentSettings, **flag_values(args, FLAGS))
        home_location()  # a malformed MEMOPLANE_HOME stops the start, in one line
    except MemoplaneError as exc:
        parser.exit(2, f"memoplane-agent: {exc}\n")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.node:
        parser.error("set NODE_NAME (or --node): the node this agent serves")
    config = AgentConfig(node=settings.node, lease_namespace=settings.lease_namespace,
                         patterns=p.parse_patterns(settings.watch_namespaces), capacity=settings.capacity,
                         profiles=[x for x in settings.profiles.split(",") if x],
                         require_isolation=settings.require_isolation, backoff_base=settings.backoff_base)
    metrics = AgentMetrics()
    events.configure(settings.openlineage_url, lambda outcome: metrics.openlineage.labels(outcome).inc())
    try:
        stores = Stores(StoreSettings.from_env(local_cache=args.local_cache))
        if not settings.key_dir:
            raise InputError(f"{NODE_KEY_DIR_ENV} is not set", "set it to a directory kept on the node, for the "
                                                               "agent's own signing key (the chart mounts one)")
        kube = Kube(load_config())
        signer = node_key(Path(settings.key_dir), settings.node, lambda: next_epoch(kube, config))
        endpoint = session_endpoint(settings, config.profiles)
    except MemoplaneError as exc:
        parser.exit(2, f"memoplane-agent: {exc}\n")
    logging.getLogger("memoplane.agent").info("signing as %s", signer.keyid)
    if endpoint is not None:
        port = endpoint.start()
        config.sessions = f"{settings.session_address or settings.session_host}:{port}"
        logging.getLogger("memoplane.agent").info("sessions on %s:%d, announced as %s", settings.session_host,
                                                  port, config.sessions)
    agent = Agent(config, kube, stores, signer, metrics)
    server = serve(settings.http_host, settings.http_port, metrics.registry,
                   lambda: agent.live() and (endpoint is None or endpoint.live()), agent.ready)
    logging.getLogger("memoplane.agent").info("http on %s:%d", settings.http_host, server.server_address[1])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    agent.start()
    stop.wait()
    agent.stop()
    if endpoint is not None:
        endpoint.stop()
    server.shutdown()
    stores.close()
    return 0


def session_endpoint(settings: AgentSettings, profiles: list[str]) -> SessionEndpoint | None:
    """The endpoint the agent API starts sandboxes through, when this agent has the session secret."""
    if not settings.session_secret_file:
        return None
    serve_settings = from_env(ServeSettings, warm=settings.session_warm, require_isolation=settings.require_isolation)
    return SessionEndpoint(settings.session_host, settings.session_port, read_secret(settings.session_secret_file),
                           serve_settings, profiles)


def next_epoch(kube: Kube, config: AgentConfig) -> int:
    """The epoch a new key of this node takes: after the latest one the operator remembers, so a
    node whose key directory was lost comes back under a new key id (1 when none can be read)."""
    try:
        kept, _ = remembered(kube.get_config_map(config.lease_namespace, p.AGENT_KEYS_CONFIG_MAP))
    except (ApiException, HTTPError, OSError) as exc:
        logging.getLogger("memoplane.agent").warning("the operator's agent keys were not read (%s): epoch 1", exc)
        return 1
    return latest_epoch(kept, config.node) + 1


if __name__ == "__main__":
    sys.exit(main())
