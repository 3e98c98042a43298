"""The Sandbox objects of the API's sandboxes on Kubernetes (memoplane.api.sandbox says why this
kind and group): one per live sandbox, in the API's namespace, labelled with its team and node.
Deleting one (`kubectl delete sandboxes.memoplane.io ID`) ends its sandbox: an operator's kill."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from kubernetes import watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from ..api.common import API_VERSION
from ..api.conditions import mark_ready
from ..cluster import protocol as p
from ..cluster.kube import Kube

log = logging.getLogger("memoplane.server")

TEAM_LABEL = f"{p.GROUP}/team"
_WATCH_SECONDS = 30   # a watch is renewed this often (and a stop seen at the latest then)
_RETRY_SECONDS = 2.0


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SandboxObjects:
    """Blocking (the Kubernetes client): call in a thread. A failed write is logged, never fatal:
    the object shows a sandbox, it does not run it."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube, self.namespace = kube, namespace

    def show(self, sandbox_id: str, node: str, team: str, template: str, created: float, expires: float) -> None:
        labels = {TEAM_LABEL: label_value(team), p.NODE_LABEL: label_value(node)}
        body = {"apiVersion": API_VERSION, "kind": "Sandbox", "spec": {},
                "metadata": {"name": sandbox_id, "namespace": self.namespace, "labels": labels}}
        try:
            made = self.kube.create(p.SANDBOXES, self.namespace, body) or {}
            generation = (made.get("metadata") or {}).get("generation")
            ready = mark_ready([], "Running", f"running on node {node}", generation, datetime.now(UTC))
            status = {"node": node, "team": team, "template": template, "created": rfc3339(created),
                      "expires": rfc3339(expires), "conditions": ready, "observedGeneration": generation}
            self.kube.patch_status(p.SANDBOXES, self.namespace, sandbox_id, status)
        except (ApiException, HTTPError, OSError) as e:
            log.warning("Sandbox object %s/%s not written: %s", self.namespace, sandbox_id, e)

    def expires(self, sandbox_id: str, expires: float) -> None:
        try:
            self.kube.patch_status(p.SANDBOXES, self.namespace, sandbox_id, {"expires": rfc3339(expires)})
        except (ApiException, HTTPError, OSError) as e:
            log.warning("Sandbox object %s/%s: expires not updated: %s", self.namespace, sandbox_id, e)

    def watch_deleted(self, deleted: Callable[[str], None], live: Callable[[str], bool], stop: threading.Event) -> None:
        """Call `deleted(name)` for each Sandbox object deleted, until `stop` (blocking: a thread).
        What was deleted while the watch was down is found by the next listing. First, the objects an
        earlier API process left (it ended without deleting them; its sandboxes ended with it) go."""
        known: set[str] = set()
        self._clear(live, stop)
        while not stop.is_set():
            try:
                items, version = self.kube.list(p.SANDBOXES, self.namespace)
                listed = {str(item["metadata"]["name"]) for item in items}
                for name in known - listed:
                    deleted(name)
                known = listed
                stream = watch.Watch().stream(self.kube.custom.list_namespaced_custom_object, p.GROUP, p.VERSION,
                                              self.namespace, p.SANDBOXES, resource_version=version,
                                              timeout_seconds=_WATCH_SECONDS)
                for event in stream:
                    name = str(((event.get("object") or {}).get("metadata") or {}).get("name", ""))
                    if event.get("type") == "DELETED":
                        known.discard(name)
                        deleted(name)
                    elif event.get("type") == "ADDED":
                        known.add(name)
                    if stop.is_set():
                        return
            except (ApiException, HTTPError, OSError, ValueError) as e:
                log.warning("watching Sandbox objects in %s: %s (again in %ss)", self.namespace, e, _RETRY_SECONDS)
                stop.wait(_RETRY_SECONDS)

    def _clear(self, live: Callable[[str], bool], stop: threading.Event) -> None:
        """Delete the namespace's Sandbox objects of no live sandbox of ours (one API per namespace)."""
        while not stop.is_set():
            try:
                items, _ = self.kube.list(p.SANDBOXES, self.namespace)
                for item in (i for i in items if not live(str(i["metadata"]["name"]))):
                    log.info("Sandbox object %s/%s: left by an earlier API, deleted", self.namespace,
                             item["metadata"]["name"])
                    self.kube.delete(p.SANDBOXES, self.namespace, str(item["metadata"]["name"]))
                return
            except (ApiException, HTTPError, OSError) as e:
                log.warning("clearing Sandbox objects in %s: %s (again in %ss)", self.namespace, e, _RETRY_SECONDS)
                stop.wait(_RETRY_SECONDS)

    def remove(self, sandbox_id: str) -> None:
        try:
            self.kube.delete(p.SANDBOXES, self.namespace, sandbox_id)
        except (ApiException, HTTPError, OSError) as e:
            log.warning("Sandbox object %s/%s not deleted: %s", self.namespace, sandbox_id, e)


def label_value(value: str) -> str:
    """A label value: at most 63 characters of [A-Za-z0-9_.-], alphanumeric at both ends."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in value)[:63]
    return cleaned.strip("-_.")
