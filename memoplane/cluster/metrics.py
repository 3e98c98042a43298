"""Prometheus metrics of the operator and the agents (one definition each, here)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter("memoplane_operator_jobs_total", "ComputeJobs that reached a final phase, by outcome "
                            "(cached, computed, failed).", ["outcome"], registry=r)
        self.cache_hits = Counter("memoplane_cache_hits_total", "Cache lookups that found a verified result.",
                                  registry=r)
        self.untrusted = Counter("memoplane_cache_untrusted_total", "Stored results found and not served: the "
                                 "cache's trust policy refused their attestations (recomputed).", registry=r)
        self.cache_misses = Counter("memoplane_cache_misses_total", "Jobs sent to a node to compute.", registry=r)
        self.seconds_saved = Counter("memoplane_compute_seconds_saved_total",
                                     "Compute seconds that cache hits did not spend.", registry=r)
        self.reconcile = Histogram("memoplane_operator_reconcile_seconds", "Time to reconcile one ComputeJob.",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.reassigned = Counter("memoplane_operator_reassigned_total", "Jobs moved off a node whose lease expired.",
                                  registry=r)
        self.nodes = Gauge("memoplane_operator_live_nodes", "Agents with a live lease.", registry=r)
        self.spot_checks = Counter("memoplane_spot_checks_total", "Cache hits re-executed on another node "
                                   "(trust.reexecute), by stage (started, agreed, disputed, failed).", ["stage"],
                                   registry=r)
        self.openlineage = openlineage_counter(r)


def openlineage_counter(registry: CollectorRegistry) -> Counter:
    return Counter("memoplane_openlineage_events_total", "OpenLineage events by outcome: sent, dropped (the queue "
                   "was full) or failed (the endpoint refused or was down).", ["outcome"], registry=registry)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.runs = Counter("memoplane_agent_runs_total", "Jobs this agent ran in a sandbox, by outcome "
                            "(succeeded, failed).", ["outcome"], registry=r)
        self.run_seconds = Histogram("memoplane_agent_run_seconds", "Wall time of one run: inputs, sandbox, store.",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.pool_size = Gauge("memoplane_agent_sandbox_pool_size", "Warm sandboxes per runtime profile.",
                               ["profile"], registry=r)
        self.running = Gauge("memoplane_agent_running_jobs", "Jobs claimed and not yet reported.", registry=r)
        self.bytes_stored = Counter("memoplane_agent_result_bytes_total",
                                    "Logical bytes of the results this agent stored.", registry=r)
        self.openlineage = openlineage_counter(r)
