"""`memoplane-agent` / `python -m memoplane_agent`: one process per node (a DaemonSet pod).

Configuration: the environment (memoplane.settings.AgentSettings and StoreSettings, listed
below), overridden by flags; KUBECONFIG, else in-cluster. The store's keys: prefer
MEMOPLANE_S3_CREDENTIALS_DIR, a directory with two files, `accessKey` and `secretKey`, each
holding the key (a trailing newline is ignored), mode 0400 or 0600 (the chart mounts the
store Secret there with defaultMode 0400), read once at start; the agent refuses to start if
a file is missing, empty or readable by group or others. A process's initial environment
stays readable in /proc/<pid>/environ for its whole life, so the key variables are for the
operator and local tools. The agents' signing key (MEMOPLANE_SIGNING_KEY_FILE, a PEM file
under the same rules, and MEMOPLANE_SIGNING_KEYID) is required: every result the agent
computes is attested with it (DESIGN §11).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from memoplane.cluster import protocol as p
from memoplane.cluster.kube import Kube, load_config
from memoplane.cluster.metrics import AgentMetrics
from memoplane.cluster.stores import Stores
from memoplane.cluster.trust import load_signer
from memoplane.errors import MemoplaneError
from memoplane.settings import (
    AgentSettings,
    SigningSettings,
    StoreSettings,
    add_flags,
    describe,
    flag_values,
    from_env,
)

from .agent import Agent, AgentConfig
from .http import serve

FLAGS = ("node", "lease_namespace", "watch_namespaces", "capacity", "profiles", "http_host", "http_port",
         "backoff_base")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memoplane-agent", description=__doc__,
                                     epilog="\n".join(describe(s) for s in (AgentSettings, SigningSettings, StoreSettings)),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, AgentSettings, FLAGS)
    parser.add_argument("--local-cache", default=None, help="the node-local chunk cache directory "
                                                            "(env MEMOPLANE_LOCAL_CACHE)")
    args = parser.parse_args(argv)
    try:
        settings = from_env(AgentSettings, **flag_values(args, FLAGS))
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
    try:
        stores = Stores(StoreSettings.from_env(local_cache=args.local_cache))
        signer = load_signer(from_env(SigningSettings))
    except MemoplaneError as exc:
        parser.exit(2, f"memoplane-agent: {exc}\n")
    agent = Agent(config, Kube(load_config()), stores, signer, metrics)
    server = serve(settings.http_host, settings.http_port, metrics.registry, agent.live, agent.ready)
    logging.getLogger("memoplane.agent").info("http on %s:%d", settings.http_host, server.server_address[1])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    agent.start()
    stop.wait()
    agent.stop()
    server.shutdown()
    stores.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
