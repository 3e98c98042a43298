"""The agents' keys the operator trusts for `trust.clusterAgents` (decisions: memoplane.cluster.agentkeys).

Read from the agents' Leases at every lease refresh and remembered in a ConfigMap of the
agents' namespace (written by the operator only, entries only ever added), so the results of
a node that is gone stay hits and a restarted operator loses nothing. Until that ConfigMap
has been read, no Lease's key is taken: a remembered key id must keep its key.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from memoplane.cluster import agentkeys as ak
from memoplane.cluster import protocol as p
from memoplane.cluster.kube import Kube
from memoplane.errors import InputError
from memoplane.trust import PublicKey

log = logging.getLogger("memoplane.operator")

LABELS = {"app.kubernetes.io/managed-by": p.OPERATOR_COMPONENT, "app.kubernetes.io/component": "agent-keys"}


class AgentKeys:
    def __init__(self, kube: Kube, namespace: str, operator: PublicKey | None) -> None:
        self.kube, self.namespace, self.operator = kube, namespace, operator
        self._known: dict[str, PublicKey] = {}
        self._unsaved: dict[str, PublicKey] = {}
        self._loaded = False
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    @property
    def cluster(self) -> ak.ClusterKeys:
        with self._lock:
            return ak.ClusterKeys(self.operator, tuple(self._known[k] for k in sorted(self._known)))

    def observe(self, leases: Iterable[Mapping[str, Any]]) -> bool:
        """Take the keys the Leases announce; True when a key was added (policies change)."""
        with self._lock:
            if not self._loaded and not self._load():
                return False
            found = []
            for lease in leases:
                key = ak.announced(lease)
                if isinstance(key, InputError):
                    self._warn(str(key))
                elif key is not None:
                    found.append(key)
            merged = ak.merge(self._known, found)
            for refused in merged.conflicts:
                self._warn(f"a Lease announces key {refused.keyid} ({refused.base64}), another key was seen under "
                           f"that id first and keeps it: the node's results are not trusted until its key is rotated "
                           f"(delete its key file so the agent makes the next epoch)")
            self._known = merged.keys
            for key in merged.added:
                log.info("agent key %s trusted (announced in its Lease)", key.keyid)
                self._unsaved[key.keyid] = key
            self._save()
            return bool(merged.added)

    def _load(self) -> bool:
        try:
            kept = self.kube.get_config_map(self.namespace, p.AGENT_KEYS_CONFIG_MAP)
        except (ApiException, HTTPError, OSError) as exc:
            log.warning("agent keys: ConfigMap %s/%s not read (%s): no agent key taken yet", self.namespace,
                        p.AGENT_KEYS_CONFIG_MAP, exc)
            return False
        keys, problems = ak.remembered(kept)
        for problem in problems:
            self._warn(problem)
        self._known.update(keys)
        self._loaded = True
        return True

    def _save(self) -> None:
        if not self._unsaved:
            return
        try:
            self.kube.add_config_map_entries(self.namespace, p.AGENT_KEYS_CONFIG_MAP,
                                             ak.config_map_data(self._unsaved.values()), LABELS)
        except (ApiException, HTTPError, OSError) as exc:  # kept in memory; written at the next refresh
            log.warning("agent keys: ConfigMap %s/%s not written (%s)", self.namespace, p.AGENT_KEYS_CONFIG_MAP, exc)
            return
        self._unsaved.clear()

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("agent keys: %s", message)
