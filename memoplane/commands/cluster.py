"""`memoplane submit | get | logs`, and `result JOB`: ComputeJobs on the cluster of
the current kubeconfig. Manifests come from the API models' builders, so a spec
the CLI accepts is one the API server accepts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..api import computejob_manifest
from ..cas import Store
from ..cluster import protocol as p
from ..errors import InputError, JobFailed, MemoplaneError, NotFound
from ..inputs import FileArg, SeedArg, parse_deliveries, parse_env, parse_inputs
from ..keys import digest_bytes, digest_file
from .kube import GROUP, PLURAL, VERSION, api_call, current_namespace, custom_objects, get_job

CONFIGMAP_LIMIT = 900 << 10  # a ConfigMap holds at most 1 MiB in all
TERMINAL = ("Succeeded", "Failed")


def submit_command(args: argparse.Namespace) -> int:
    api = None if args.dry_run else custom_objects()  # loads the kubeconfig for every client below
    namespace = current_namespace(args.namespace)
    spec = _spec(args, namespace)
    meta_name = args.name or None
    manifest = computejob_manifest(meta_name or "placeholder", namespace, spec)
    if meta_name is None:
        del manifest["metadata"]["name"]
        manifest["metadata"]["generateName"] = _generate_name(Path(args.script).stem)
    if api is None:  # --dry-run
        print(json.dumps(manifest, indent=2))
        return 0
    created = api_call("create computejob", api.create_namespaced_custom_object,
                       GROUP, VERSION, namespace, PLURAL, manifest)
    name = created["metadata"]["name"]
    print(f"computejob {namespace}/{name} created", file=sys.stderr)
    if not args.wait:
        print(name)
        return 0
    job = wait_for(api, namespace, name, args.wait_timeout)
    return _print_job(job, as_json=args.json)


def _generate_name(stem: str) -> str:
    cleaned = "".join(c if c.isalnum() else "-" for c in stem.lower()).strip("-")[:40] or "job"
    return cleaned + "-"


def _spec(args: argparse.Namespace, namespace: str) -> dict[str, Any]:
    path = Path(args.script)
    if not path.is_file():
        raise InputError(f"script {args.script!r} does not exist", "check the path")
    inputs = []
    parsed = parse_inputs(args.input)
    deliveries = parse_deliveries(args.as_, parsed)
    for name, value in parsed.items():
        if isinstance(value, FileArg):
            delivery = {"as": deliveries[name]} if name in deliveries else {}
            inputs.append({"name": name, **_file_source(namespace, value.path, args.dry_run), **delivery})
        elif isinstance(value, SeedArg):
            inputs.append({"name": name, "fromSeed": {"name": value.name, "offset": value.offset,
                                                      "count": value.count}})
        else:
            inputs.append({"name": name, "value": value})
    spec: dict[str, Any] = {
        "python": {"source": path.read_text(encoding="utf-8"), "entrypoint": args.entrypoint},
        "inputs": inputs,
        "cache": {"policy": args.policy, "version": args.salt},
        "resources": {"timeoutSeconds": int(args.timeout), "memory": args.memory},
    }
    env = parse_env(args.env)
    if env:
        spec["env"] = env
    return _over_chunks(args, spec)


def _over_chunks(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """--over-chunks NAME --combine FUNC: spec.map.overChunks and spec.python.combine."""
    from .chunks import chunk_flags_problem

    problem = chunk_flags_problem(args)
    if problem is not None:
        raise problem
    if args.over_chunks:
        spec["map"] = {"overChunks": args.over_chunks}
        spec["python"]["combine"] = args.combine
    return spec


def _file_source(namespace: str, path: Path, dry_run: bool) -> dict[str, Any]:
    """A small file travels as an immutable, content-named ConfigMap (no store credentials
    needed); a larger one is uploaded to the namespace's home store, chunk by chunk, and the
    job names its digest (fromBlob)."""
    if path.stat().st_size <= CONFIGMAP_LIMIT:
        return {"fromConfigMap": _upload_configmap(namespace, path, dry_run)}
    if dry_run:
        return {"fromBlob": {"digest": digest_file(path)}}
    with open_cluster_store(p.store_url(p.DEFAULT_BUCKET, p.default_store_prefix(namespace))) as store:
        return {"fromBlob": {"digest": store.put_file(path).digest}}


def open_cluster_store(url: str) -> Store:
    """A store of the cluster's (credentials from MEMOPLANE_S3_*), or a one-line error saying how."""
    from ..cas import open_store

    try:
        return open_store(url)
    except MemoplaneError as exc:
        raise MemoplaneError(f"cannot open the store {url}: {exc}",
                             "set MEMOPLANE_S3_ENDPOINT, MEMOPLANE_S3_ACCESS_KEY and MEMOPLANE_S3_SECRET_KEY "
                             "(eval \"$(hack/cluster env)\" for the local control plane)") from None


def _upload_configmap(namespace: str, path: Path, dry_run: bool) -> dict[str, str]:
    """The file as an immutable, content-named ConfigMap (created unless `dry_run`)."""
    import base64

    data = path.read_bytes()
    name = "memoplane-input-" + digest_bytes(data)[3:23]
    if not dry_run:
        from kubernetes import client

        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, labels={"app.kubernetes.io/part-of": "memoplane"}),
                                  binary_data={"data": base64.b64encode(data).decode()}, immutable=True)
        core = client.CoreV1Api()
        try:
            api_call(f"configmap {namespace}/{name}", core.create_namespaced_config_map, namespace, body)
        except Exception as exc:
            if "409" not in str(exc) and "AlreadyExists" not in str(exc):
                raise
    return {"name": name, "key": "data"}


def wait_for(api: Any, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    """Poll until the job's status describes its current generation and is terminal,
    showing each phase change on stderr."""
    deadline = time.monotonic() + timeout
    shown = None
    while True:
        job = get_job(api, namespace, name)
        status = job.get("status") or {}
        current = status.get("observedGeneration") == job["metadata"].get("generation")
        phase = status.get("phase") or "Pending"
        if (phase, status.get("reason")) != shown:
            shown = (phase, status.get("reason"))
            print(f"  {phase}" + (f" ({status['reason']})" if status.get("reason") else ""), file=sys.stderr)
        if current and phase in TERMINAL:
            return job
        if time.monotonic() > deadline:
            raise JobFailed(f"computejob {namespace}/{name} is still {phase} after {timeout:.0f} s",
                            "wait longer (--wait-timeout) or look at `kubectl describe cjob " + name + "`")
        time.sleep(0.2)


def _print_job(job: dict[str, Any], *, as_json: bool) -> int:
    status = job.get("status") or {}
    if as_json:
        print(json.dumps({"name": job["metadata"]["name"], "namespace": job["metadata"]["namespace"], **status},
                         sort_keys=True))
    else:
        result = status.get("result") or {}
        print(f"{job['metadata']['name']}: {status.get('phase', 'Pending')}"
              f"{' (cached)' if status.get('cached') else ''}"
              f"  key {status.get('shortKey', '-')}  node {status.get('node') or '-'}"
              f"  {status.get('duration') or ''}", file=sys.stderr)
        if status.get("phase") == "Failed":
            failure = status.get("failure") or {}
            if failure.get("stderrTail"):
                sys.stderr.write(failure["stderrTail"].rstrip("\n") + "\n")
            print(f"memoplane: {failure.get('reason', 'failed')}: {failure.get('message', status.get('message', ''))}",
                  file=sys.stderr)
            return JobFailed.exit_code
        if "value" in result:
            print(json.dumps(result["value"], indent=2, sort_keys=True))
    return 0


def get_command(args: argparse.Namespace) -> int:
    namespace = current_namespace(args.namespace)
    return _print_job(get_job(custom_objects(), namespace, args.job), as_json=args.json)


def job_store(api: Any, job: dict[str, Any]) -> Any:
    """The store of the job's ResultCache (credentials from MEMOPLANE_S3_*)."""
    namespace = job["metadata"]["namespace"]
    cache_name = ((job.get("spec") or {}).get("cache") or {}).get("resultCache", "default")
    return cache_store(api_call(f"resultcache {namespace}/{cache_name}", api.get_namespaced_custom_object,
                                GROUP, VERSION, namespace, "resultcaches", cache_name))


def cache_store(rc: dict[str, Any]) -> Any:
    """A ResultCache's store, with its cold tier (spec.tiers) if it has one."""
    from ..cas import open_store
    from ..cluster.views import cache

    view = cache(rc)
    tier = view.cold_tier
    return open_store(view.store_url, cold=(tier.url, tier.after) if tier is not None else None)


def succeeded_result(job: dict[str, Any]) -> str:
    status = job.get("status") or {}
    digest = (status.get("result") or {}).get("digest")
    if status.get("phase") != "Succeeded" or not digest:
        raise NotFound(f"computejob {job['metadata']['name']} has no result (phase {status.get('phase', 'Pending')})",
                       "wait for it: memoplane get JOB, or kubectl wait --for=condition=Ready cjob/JOB")
    return str(digest)


def logs_command(args: argparse.Namespace) -> int:
    namespace = current_namespace(args.namespace)
    api = custom_objects()
    job = get_job(api, namespace, args.job)
    status = job.get("status") or {}
    if status.get("phase") == "Failed":
        sys.stderr.write((status.get("failure") or {}).get("stderrTail") or "")
        return 0
    digest = succeeded_result(job)
    with job_store(api, job) as store:
        result = store.get_result(digest)
        sys.stdout.buffer.write(store.get_bytes(result.stdout.digest))
        sys.stdout.flush()
        sys.stderr.buffer.write(store.get_bytes(result.stderr.digest))
    return 0


def result_of_job(args: argparse.Namespace) -> int:
    """`memoplane result JOB`: the inline value from status, or the stored result."""
    from .store import materialize_result

    namespace = current_namespace(getattr(args, "namespace", None))
    api = custom_objects()
    job = get_job(api, namespace, args.ref)
    digest = succeeded_result(job)
    inline = (job.get("status") or {}).get("result") or {}
    if not args.output and "value" in inline and not args.json:
        print(json.dumps(inline["value"], indent=2, sort_keys=True))
        return 0
    from ..cas import Hit

    with job_store(api, job) as store:
        result = store.get_result(digest)
        value = store.load_value(result.value)
        written = materialize_result(store, Hit(result.key, digest, result), value, Path(args.output)) \
            if args.output else []
        from .render import render_value

        shown = render_value(result.value, value)
        print(json.dumps({"result": shown, "written": written}, sort_keys=True) if args.json
              else json.dumps(shown, indent=2, sort_keys=True))
    return 0
