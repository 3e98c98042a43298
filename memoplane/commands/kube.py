"""Talking to the current kubeconfig's API server from the CLI, with errors that
say what to do instead of a urllib3 traceback."""

from __future__ import annotations

import os
from typing import Any

from ..errors import MemoplaneError, NotFound

GROUP, VERSION, PLURAL = "memoplane.io", "v1alpha1", "computejobs"


class ClusterUnavailable(MemoplaneError):
    exit_code = 6


def custom_objects() -> Any:
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    except (ConfigException, FileNotFoundError, TypeError) as exc:
        raise ClusterUnavailable(f"no usable kubeconfig ({exc})",
                                 "set KUBECONFIG, or `eval $(hack/cluster env)` for the local control plane") from None
    return client.CustomObjectsApi()


def current_namespace(explicit: str | None) -> str:
    if explicit:
        return explicit
    from kubernetes import config

    try:
        _, context = config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG"))
        return str(context.get("context", {}).get("namespace") or "default")
    except Exception:  # noqa: BLE001 - no usable kubeconfig: the namespace a bare kubectl would use
        return "default"


def api_call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the API, turning HTTP and connection errors into one-line errors."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, **kwargs)
    except ApiException as exc:
        if exc.status == 404:
            raise NotFound(f"{what}: not found", "check the name and namespace (-n)") from None
        raise MemoplaneError(f"{what}: the API server said {exc.status} {exc.reason}: {_message(exc)}",
                             "fix the request named above") from None
    except HTTPError as exc:
        raise ClusterUnavailable(f"{what}: cannot reach the API server ({exc.__class__.__name__})",
                                 "check that the cluster is up (hack/cluster status)") from None


def _message(exc: Any) -> str:
    import json

    try:
        return str(json.loads(exc.body).get("message", exc.body))
    except (TypeError, ValueError):
        return str(exc.body)


def get_job(api: Any, namespace: str, name: str) -> dict[str, Any]:
    return dict(api_call(f"computejob {namespace}/{name}", api.get_namespaced_custom_object,
                         GROUP, VERSION, namespace, PLURAL, name))
