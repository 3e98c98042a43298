"""kopf handlers: thin. They hand what changed to the reconciler's queue.

Only `on.event` handlers are used: kopf then keeps no per-object progress, adds no
finalizers (timers and daemons would, blocking namespace deletion while the operator is
down) and writes nothing to the objects; the reconciler owns all writes.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, cast

import kopf

from memoplane.cluster import protocol as p


class Reconciling(Protocol):
    """What the handlers hand events to (memoplane_operator.reconciler.Reconciler)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def live(self) -> bool: ...
    def enqueue(self, namespace: str, name: str, body: dict[str, Any] | None = None) -> None: ...
    def deleted(self, body: dict[str, Any]) -> None: ...
    def enqueue_cache(self, namespace: str, name: str, body: dict[str, Any] | None = None) -> None: ...
    def cache_deleted(self, namespace: str, name: str) -> None: ...


def register(registry: kopf.OperatorRegistry, reconciler: Reconciling) -> None:
    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.peering.standalone = True
        settings.posting.level = logging.WARNING     # kopf's own messages as Events only when they matter
        settings.watching.server_timeout = 300
        settings.execution.max_workers = 4
        reconciler.start()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A private registry has none of kopf's default handlers: log in as the kubernetes
        # client does (KUBECONFIG, else the pod's service account).
        info: kopf.ConnectionInfo | None = kopf.login_via_client(**kwargs)
        return info

    @kopf.on.cleanup(registry=registry)
    def cleanup(**_: Any) -> None:
        reconciler.stop()

    @kopf.on.event(p.GROUP, p.VERSION, p.COMPUTEJOBS, registry=registry)
    def job_event(event: kopf.RawEvent, namespace: str | None, name: str, **_: Any) -> None:
        raw = event.get("object")
        body = cast(dict[str, Any], raw) if isinstance(raw, dict) else None
        if event.get("type") == "DELETED":
            if body is not None:  # results outlive jobs; what waited for this one may proceed
                reconciler.deleted(body)
            return
        if namespace:
            reconciler.enqueue(namespace, name, body)

    @kopf.on.event(p.GROUP, p.VERSION, p.RESULTCACHES, registry=registry)
    def cache_event(event: kopf.RawEvent, namespace: str | None, name: str, **_: Any) -> None:
        raw = event.get("object")
        if not namespace:
            return
        if event.get("type") == "DELETED":
            reconciler.cache_deleted(namespace, name)
        else:
            reconciler.enqueue_cache(namespace, name, cast(dict[str, Any], raw) if isinstance(raw, dict) else None)

    @kopf.on.probe(id="reconciler", registry=registry)
    def reconciler_alive(**_: Any) -> bool:
        if not reconciler.live():  # a failing probe makes /healthz answer 500
            raise kopf.PermanentError("the reconciler thread is stalled or dead")
        return True
