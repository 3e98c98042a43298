"""`hack/cluster build|up|down|status|env|image`: the local control plane from the command line."""

from __future__ import annotations

import argparse
import sys

from memoplane.testing import build, cluster, image, node, node_chart, processes


def _say(msg: str) -> None:
    print(f"[hack/cluster] {msg}", file=sys.stderr, flush=True)


def cmd_build(_: argparse.Namespace) -> int:
    for name, path in build.ensure_all().items():
        _say(f"{name}: {path}")
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    built = image.build_image(relocking=args.relock)
    how = "reused from cache" if built.cached else "built"
    _say(f"image {built.reference} {how} in {built.seconds:.1f}s: {built.archive} "
         f"({built.size_bytes / 2**20:.0f} MiB; import: ctr images import {built.archive})")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    with_node = getattr(args, "with_node", False)
    before = cluster.load_info()
    if before is None or not all(cluster.healthy(before).values()):
        processes.down(cluster.state_dir())  # memoplane processes of a control plane that is gone
    result = cluster.up(with_node=with_node)
    info = result.info
    how = "already running, reused" if result.already_running else "started"
    cache = f"built {', '.join(result.built)}" if result.built else "binaries reused from cache"
    _say(f"control plane {how} in {result.seconds_to_ready:.1f}s ({cache})")
    _say(f"kube-apiserver {info.apiserver_url}  MinIO {info.s3_endpoint}  "
         f"versitygw {(info.s3_endpoints or {}).get('versitygw')}  state {info.state_dir}")
    if with_node and getattr(args, "with_memoplane", False):
        seconds = node_chart.install(info)
        _say(f"memoplane: the chart installed onto {node.NODE_NAME} in {seconds:.1f}s (release {node_chart.RELEASE} "
             f"in {node_chart.NAMESPACE}: operator Deployment, agent DaemonSet, Ready); try: kubectl apply -f "
             "examples/job.yaml")
    elif getattr(args, "with_memoplane", False):
        cfg = processes.StackConfig(directory=cluster.state_dir(), env=info.env(),
                                    watch_namespaces=processes.dev_watch_namespaces())
        started = processes.up(cfg, api=True)
        _say(f"memoplane: {', '.join(p.name for p in started) or 'already running'} "
             f"(logs in {cfg.directory / 'logs'}); try: kubectl apply -f examples/job.yaml")
        api = processes.load(cfg.directory, processes.API)
        if api is not None:
            _say(f"agent API: {api.url('http', '')} (E2B's api_url and sandbox_url; sandboxes on the agents, "
                 f"`kubectl get sandboxes.memoplane.io -n {cfg.lease_namespace}`)")
    if info.with_node:
        _say(f"node {node.NODE_NAME} Ready (containerd socket {node.paths(cluster.state_dir()).socket}); pods use "
             f"hostNetwork, imagePullPolicy: Never and KUBERNETES_SERVICE_HOST=127.0.0.1 "
             f"KUBERNETES_SERVICE_PORT={info.ports.apiserver}")
    _say('use it: eval "$(hack/cluster env)"')
    return 0


def cmd_down(_: argparse.Namespace) -> int:
    stopped = processes.down(cluster.state_dir()) + cluster.down()
    _say(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_status(_: argparse.Namespace) -> int:
    info = cluster.load_info()
    rss = cluster.rss_kib(info) if info else {}
    report = cluster.status()
    for name, st in report.items():
        mem = f"  rss {rss[name] / 1024:.0f} MiB" if st["running"] and name in rss else ""
        print(f"{name:23} pid {st['pid'] or '-':>8}  running {st['running']!s:5}  "
              f"healthy {st['healthy']!s:5}{mem}")
    if rss:
        print(f"{'total rss':23} {sum(rss.values()) / 1024:.0f} MiB")
    node_ready = True
    if info and info.with_node:
        conditions = node.node_conditions(info)
        node_ready = conditions.get("Ready") == "True"
        print(f"node {node.NODE_NAME}: " + (", ".join(f"{k}={v}" for k, v in sorted(conditions.items()))
                                             or "not registered"))
    for name in processes.names(cluster.state_dir()):
        print(f"{name:15} running {processes.alive(cluster.state_dir(), name)}")
    if info:
        print(f"state {info.state_dir}  apiserver {info.apiserver_url}  s3 {info.s3_endpoint}")
    return 0 if node_ready and all(st["healthy"] for st in report.values()) else 1


def cmd_env(_: argparse.Namespace) -> int:
    info = cluster.load_info()
    if info is None:
        _say("not up: run `hack/cluster up` first")
        return 1
    sys.stdout.write(cluster.env_script(info))
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    """A MinIO user of the running control plane that reads BUCKET and writes only under PREFIX;
    prints the exports an install (or `memoplane`) uses it with."""
    info = cluster.load_info()
    if info is None:
        _say("not up: run `hack/cluster up` first")
        return 1
    from memoplane.settings import HOME_ENV, KEY_ENVS
    from memoplane.testing import tenants

    keys = tenants.scoped_user(info, args.name, args.bucket, args.prefix)
    _say(f"user {args.name}: reads s3://{args.bucket}, writes only under {args.prefix.strip('/')}/")
    exports = {**dict(zip(KEY_ENVS, keys, strict=True)), HOME_ENV: f"s3://{args.bucket}/{args.prefix.strip('/')}"}
    sys.stdout.write("".join(f"export {k}='{v}'\n" for k, v in exports.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in [
        ("build", cmd_build, "build the pinned binaries into the cache, or reuse them"),
        ("up", cmd_up, "start etcd, kube-apiserver, MinIO and versitygw on loopback (idempotent)"),
        ("down", cmd_down, "stop what `up` started and remove its data"),
        ("status", cmd_status, "show processes, health, memory and the node's conditions; exit 1 unless all "
                               "healthy (and the node Ready)"),
        ("env", cmd_env, "print the shell exports for the running control plane"),
        ("image", cmd_image, "build the project's image from Debian's packages into an OCI archive, or reuse it"),
        ("user", cmd_user, "make a MinIO user that writes only under a prefix of a bucket (an install's keys)"),
    ]:
        command = sub.add_parser(name, help=text)
        command.set_defaults(fn=fn)
        if name == "user":
            command.add_argument("name", help="the user (its access key)")
            command.add_argument("bucket", help="the bucket it reads (created if missing)")
            command.add_argument("prefix", help="the prefix it writes under, e.g. cluster-a/")
        if name == "image":
            command.add_argument("--relock", action="store_true",
                                 help="rebuild and rewrite image/dpkg-packages.txt and image/requirements.lock")
        if name == "up":
            command.add_argument("--with-memoplane", action="store_true",
                                 help="also start the operator, agents for nodes node-a and node-b, and the "
                                      "agent API (memoplane serve, sandboxes on those agents); with --with-node, "
                                      "helm install the chart onto the node instead (operator and agent as pods)")
            command.add_argument("--with-node", action="store_true",
                                 help=f"also a real node ({node.NODE_NAME}): controller-manager, scheduler, "
                                      "containerd + runc and a kubelet")
    args = parser.parse_args(argv)
    try:
        code: int = args.fn(args)
    except (build.BuildError, image.ImageError) as exc:
        _say(f"FAILED: {exc}")
        return 2
    except (cluster.ClusterError, processes.ProcessError, node.NodeError) as exc:
        _say(f"FAILED: {exc}")
        return 3
    return code


if __name__ == "__main__":
    sys.exit(main())
