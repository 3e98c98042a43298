"""Thin Kubernetes I/O shared by the operator and the agents (the `kubernetes` client).

Objects travel as plain dicts (camelCase, as the API server sends them), which is what
the pure decision functions take. Status writes are JSON merge patches on the status
subresource; with a resourceVersion in the body the API server answers 409 Conflict when
the object changed meanwhile.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, cast

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from . import protocol as p
from .views import meta_of

log = logging.getLogger("memoplane.cluster")
MERGE = "application/merge-patch+json"
EVENT_BACKLOG = 2000  # Events waiting to be posted; more are dropped
Objects = list[dict[str, Any]]   # outside the class: there `list` is Kube.list


def load_config(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster config when running in a pod, else KUBECONFIG (or ~/.kube/config)."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config()
        return client.ApiClient()
    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"), client_configuration=cfg)
    cfg.connection_pool_maxsize = 16
    return client.ApiClient(cfg)


def to_dict(api: client.ApiClient, obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    data: dict[str, Any] = api.sanitize_for_serialization(obj)
    return data


class Kube:
    """The calls memoplane makes, over one ApiClient (thread-safe)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=EVENT_BACKLOG)
        self._events_lock = threading.Lock()
        self._poster: threading.Thread | None = None

    # -- ComputeJobs and ResultCaches ------------------------------------------------

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], self.custom.get_namespaced_custom_object(
                p.GROUP, p.VERSION, namespace, plural, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, plural: str, namespace: str | None = None, label_selector: str | None = None
             ) -> tuple[Objects, str]:
        kwargs: dict[str, Any] = {}
        if label_selector:
            kwargs["label_selector"] = label_selector
        if namespace:
            out = cast(dict[str, Any], self.custom.list_namespaced_custom_object(
                p.GROUP, p.VERSION, namespace, plural, **kwargs))
        else:
            out = cast(dict[str, Any], self.custom.list_cluster_custom_object(p.GROUP, p.VERSION, plural, **kwargs))
        return list(out.get("items") or []), str((out.get("metadata") or {}).get("resourceVersion") or "")

    def watch(self, plural: str, resource_version: str, label_selector: str | None = None,
              timeout_s: int = 30) -> Iterator[tuple[str, dict[str, Any]]]:
        w = watch.Watch()
        kwargs: dict[str, Any] = {"resource_version": resource_version, "timeout_seconds": timeout_s,
                                  "allow_watch_bookmarks": False}
        if label_selector:
            kwargs["label_selector"] = label_selector
        try:
            for event in w.stream(self.custom.list_cluster_custom_object, p.GROUP, p.VERSION, plural, **kwargs):
                obj = event.get("object")
                if isinstance(obj, dict):
                    yield str(event.get("type")), obj
        finally:
            w.stop()

    def patch_status(self, plural: str, namespace: str, name: str, patch: Mapping[str, Any],
                     resource_version: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"status": dict(patch)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return cast(dict[str, Any], self.custom.patch_namespaced_custom_object_status(
            p.GROUP, p.VERSION, namespace, plural, name, body, _content_type=MERGE))

    def patch_meta(self, plural: str, namespace: str, name: str, labels: Mapping[str, str | None] | None = None,
                   annotations: Mapping[str, str | None] | None = None,
                   resource_version: str | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        if labels:
            meta["labels"] = dict(labels)
        if annotations:
            meta["annotations"] = dict(annotations)
        if resource_version:
            meta["resourceVersion"] = resource_version
        return cast(dict[str, Any], self.custom.patch_namespaced_custom_object(
            p.GROUP, p.VERSION, namespace, plural, name, {"metadata": meta}, _content_type=MERGE))

    def json_patch(self, plural: str, namespace: str, name: str, ops: Objects) -> dict[str, Any]:
        """An RFC 6902 JSON patch (replaces a whole field, which a merge patch cannot for lists)."""
        return cast(dict[str, Any], self.custom.patch_namespaced_custom_object(
            p.GROUP, p.VERSION, namespace, plural, name, ops, _content_type="application/json-patch+json"))

    def delete(self, plural: str, namespace: str, name: str) -> bool:
        """Delete; False if it was already gone."""
        try:
            self.custom.delete_namespaced_custom_object(p.GROUP, p.VERSION, namespace, plural, name)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def create(self, plural: str, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create; None if it already exists."""
        try:
            return cast(dict[str, Any], self.custom.create_namespaced_custom_object(
                p.GROUP, p.VERSION, namespace, plural, dict(body)))
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise

    # -- core objects -----------------------------------------------------------------

    def get_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return to_dict(self.api, self.core.read_namespaced_config_map(name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def add_config_map_entries(self, namespace: str, name: str, data: Mapping[str, str],
                               labels: Mapping[str, str]) -> None:
        """Add (or overwrite) `data` entries of a ConfigMap, creating it with `labels` if absent."""
        try:
            self.core.patch_namespaced_config_map(name, namespace, {"data": dict(data)}, _content_type=MERGE)
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=dict(labels)),
                                  data=dict(data))
        try:
            self.core.create_namespaced_config_map(namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_namespaced_config_map(name, namespace, {"data": dict(data)},  # created meanwhile
                                                  _content_type=MERGE)

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Secret (its data base64-encoded, as the API serves it); the operator reads only
        those a ResultCache names for its trusted keys."""
        try:
            return to_dict(self.api, self.core.read_namespaced_secret(name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def event(self, obj: Mapping[str, Any], reason: str, message: str, *, warning: bool = False,
              component: str = p.OPERATOR_COMPONENT, host: str | None = None) -> None:
        """A core/v1 Event about `obj`; best effort (an Event is never worth failing for).

        Posted by a background thread: an Event is a write the caller never needs the
        answer to, and on the operator's one worker it would add a round trip to every
        decision. A full backlog drops the Event (logged at debug)."""
        meta = meta_of(obj).raw
        ref = {"api_version": obj.get("apiVersion", p.API_VERSION), "kind": obj.get("kind", "ComputeJob"),
               "name": meta.get("name"), "namespace": meta.get("namespace") or "default", "uid": meta.get("uid"),
               "resource_version": meta.get("resourceVersion")}
        item = (ref, reason, message[:1024], warning, component, host, datetime.now(UTC))
        with self._events_lock:
            if self._poster is None or not self._poster.is_alive():
                self._poster = threading.Thread(target=self._post_events, name="events", daemon=True)
                self._poster.start()
        try:
            self._events.put_nowait(item)
        except queue.Full:
            log.debug("event %s on %s/%s dropped: backlog full", reason, ref["namespace"], ref["name"])

    def flush_events(self, timeout: float = 5.0) -> None:
        """Wait (up to `timeout`) until the queued Events are posted."""
        deadline = time.monotonic() + timeout
        while self._events.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)

    def _post_events(self) -> None:
        while True:
            ref, reason, message, warning, component, host, now = self._events.get()
            try:
                self._post_event(ref, reason, message, warning, component, host, now)
            finally:
                self._events.task_done()

    def _post_event(self, ref: dict[str, Any], reason: str, message: str, warning: bool, component: str,
                    host: str | None, now: datetime) -> None:
        namespace = ref["namespace"]
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=f"{ref['name'] or 'obj'}.{uuid.uuid4().hex[:12]}",
                                         namespace=namespace),
            involved_object=client.V1ObjectReference(**ref),
            reason=reason, message=message, type="Warning" if warning else "Normal",
            source=client.V1EventSource(component=component, host=host),
            first_timestamp=now, last_timestamp=now, count=1, reporting_component=component,
            reporting_instance=host or component)
        try:
            self.core.create_namespaced_event(namespace, body)
        except (ApiException, HTTPError, OSError, ValueError) as exc:  # an Event is never worth failing for
            log.debug("event %s on %s/%s not posted: %s", reason, namespace, ref["name"], exc)

    # -- leases --------------------------------------------------------------------------

    def list_leases(self, namespace: str) -> Objects:
        out = self.coord.list_namespaced_lease(namespace)
        return [to_dict(self.api, item) for item in out.items]

    def renew_lease(self, namespace: str, node: str, holder: str, annotations: Mapping[str, str],
                    duration_s: int = p.LEASE_DURATION_SECONDS) -> None:
        """Create or renew the node's Lease (the agent is its only writer)."""
        name = p.lease_name(node)
        now = datetime.now(UTC)
        spec = client.V1LeaseSpec(holder_identity=holder, lease_duration_seconds=duration_s,
                                  renew_time=now)
        try:
            current = self.coord.read_namespaced_lease(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(metadata=client.V1ObjectMeta(
                name=name, namespace=namespace, annotations=dict(annotations),
                labels={"app.kubernetes.io/component": "memoplane-agent", p.NODE_LABEL: node}),
                spec=client.V1LeaseSpec(holder_identity=holder, lease_duration_seconds=duration_s,
                                        renew_time=now, acquire_time=now))
            self.coord.create_namespaced_lease(namespace, body)
            return
        meta = current.metadata or client.V1ObjectMeta(name=name, namespace=namespace)
        meta.annotations = {**(meta.annotations or {}), **annotations}
        current.metadata = meta
        if current.spec is None or current.spec.holder_identity != holder:
            spec.acquire_time = now
            spec.lease_transitions = ((current.spec.lease_transitions or 0) + 1) if current.spec else 0
        else:
            spec.acquire_time = current.spec.acquire_time
            spec.lease_transitions = current.spec.lease_transitions
        current.spec = spec
        self.coord.replace_namespaced_lease(name, namespace, current)

    def namespace_labels(self) -> dict[str, dict[str, str]]:
        """Every Namespace's labels (ResultCache sharing selects namespaces by them)."""
        listed = to_dict(self.api, self.core.list_namespace())
        return {str(ns["metadata"]["name"]): dict(ns["metadata"].get("labels") or {}) for ns in listed["items"]}

    def ensure_namespace(self, name: str) -> None:
        try:
            self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        except ApiException as exc:
            if exc.status != 409:
                raise


def retrying(call: Any, *args: Any, attempts: int = 5, delay: float = 0.2, **kwargs: Any) -> Any:
    """Call, retrying transient API failures (connection errors, 5xx, 429)."""
    for i in range(attempts):
        try:
            return call(*args, **kwargs)
        except ApiException as exc:
            if exc.status not in (429, 500, 502, 503, 504) or i == attempts - 1:
                raise
        except (OSError, ConnectionError) as exc:  # urllib3 errors derive from these
            if i == attempts - 1:
                raise
            log.debug("retrying after %s", exc)
        time.sleep(delay * (2 ** i))
    raise AssertionError("unreachable")
