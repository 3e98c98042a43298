"""`memoplane-agent` / `python -m memoplane_agent`: one process per node (a DaemonSet pod).

Configuration (environment; flags override):
  NODE_NAME                   the node this agent serves (required)
  KUBECONFIG                  else in-cluster
  MEMOPLANE_NAMESPACE         where the agents' Leases live (default memoplane-system)
  MEMOPLANE_WATCH_NAMESPACES  namespace patterns whose jobs this agent runs (default all)
  MEMOPLANE_S3_ENDPOINT       the object store
  MEMOPLANE_S3_CREDENTIALS_DIR its keys: a directory with two files, `accessKey` and `secretKey`,
                              each holding the key (a trailing newline is ignored), mode 0400 or
                              0600 (the chart mounts the store Secret there with defaultMode 0400).
                              Read once at start; the agent refuses to start if a file is missing,
                              empty or readable by group or others. Prefer it to the variables
                              below: a process's initial environment stays readable in
                              /proc/<pid>/environ for its whole life.
  MEMOPLANE_S3_ACCESS_KEY, MEMOPLANE_S3_SECRET_KEY  the keys as variables (not with the directory)
  MEMOPLANE_STORE_ROOT        a directory standing in for the object store
  MEMOPLANE_LOCAL_CACHE       node-local chunk cache directory (default: none)
  MEMOPLANE_CAPACITY          jobs run at once (default 2)
  MEMOPLANE_PROFILES          runtime profiles served (default python)
  MEMOPLANE_HTTP_PORT         /healthz /readyz /metrics (default 8080; 0 = any free port)
  MEMOPLANE_REQUIRE_ISOLATION 1 (default) refuses to start without full sandbox isolation
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from memoplane.cluster import protocol as p
from memoplane.cluster.kube import Kube, load_config
from memoplane.cluster.metrics import AgentMetrics
from memoplane.cluster.stores import Stores, StoreSettings
from memoplane.errors import MemoplaneError

from .agent import Agent, AgentConfig
from .http import serve


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    parser = argparse.ArgumentParser(prog="memoplane-agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node", default=env.get("NODE_NAME"))
    parser.add_argument("--lease-namespace", default=env.get("MEMOPLANE_NAMESPACE", "memoplane-system"))
    parser.add_argument("--watch-namespaces", default=env.get("MEMOPLANE_WATCH_NAMESPACES", ""))
    parser.add_argument("--capacity", type=int, default=int(env.get("MEMOPLANE_CAPACITY", "2")))
    parser.add_argument("--profiles", default=env.get("MEMOPLANE_PROFILES", "python"))
    parser.add_argument("--http-host", default=env.get("MEMOPLANE_HTTP_HOST", "0.0.0.0"))
    parser.add_argument("--http-port", type=int, default=int(env.get("MEMOPLANE_HTTP_PORT", "8080")))
    parser.add_argument("--local-cache", default=env.get("MEMOPLANE_LOCAL_CACHE"))
    parser.add_argument("--backoff-base", type=float, default=float(env.get("MEMOPLANE_BACKOFF_BASE", "1.0")))
    args = parser.parse_args(argv)
    logging.basicConfig(level=env.get("MEMOPLANE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.node:
        parser.error("set NODE_NAME (or --node): the node this agent serves")
    require = env.get("MEMOPLANE_REQUIRE_ISOLATION", "1") not in ("0", "false", "no")
    config = AgentConfig(node=args.node, lease_namespace=args.lease_namespace,
                         patterns=p.parse_patterns(args.watch_namespaces), capacity=args.capacity,
                         profiles=[x for x in args.profiles.split(",") if x], require_isolation=require,
                         backoff_base=args.backoff_base)
    metrics = AgentMetrics()
    try:
        stores = Stores(StoreSettings.from_env(local_cache=args.local_cache))
    except MemoplaneError as exc:
        parser.exit(2, f"memoplane-agent: {exc}\n")
    agent = Agent(config, Kube(load_config()), stores, metrics)
    server = serve(args.http_host, args.http_port, metrics.registry, agent.live, agent.ready)
    logging.getLogger("memoplane.agent").info("http on %s:%d", args.http_host, server.server_address[1])
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
