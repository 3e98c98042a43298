"""A pooled child: enters its isolation, waits for one request, runs it, exits.

Lifecycle with a root agent (zygote.spawn_direct), the child "I":
  - is forked by the zygote straight into a new pid namespace (pid 1 there),
    inside the zygote's read-only view;
  - still host root: joins the empty network namespace the zygote lent it
    (zygote.NetnsPool), makes its own /proc (fsmount), then unshares user,
    mount, ipc and uts namespaces; the zygote maps root of the new user
    namespace to JOB_HOST_ID and the child takes those ids (setresuid), so
    from here on it is an unprivileged host uid with capabilities only over
    its own namespaces;
  - attaches its /proc, mounts its /tmp and its /out (a tmpfs whose fd it
    hands the pool with "ready"), rehearses a dummy job (runner.py),
    reseeds the random generators, sets no_new_privs,
    empties the bounding and ambient sets, locks NOROOT securebits, confines
    abstract sockets and signals with Landlock, installs the seccomp policy
    but for the mount calls its request needs, reports "ready" and blocks
    on its channel (its environment is already the job's: the zygote's own);
  - on a request: attaches the idmapped /in it was sent, sizes /tmp and
    /out to the request's limits, applies rlimits, drops every capability, installs a second seccomp filter that
    kills the mount calls too, reports "started", runs the job, reports
    "result" and exits (a child serves one job only).
Without root (legacy path) the zygote forks "W", which unshares everything
and forks I; I builds the view itself and maps root to the agent's own uid.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

# runner at module level: a `from ... import` inside a function runs importlib's
# Python code in every child.
from memoplane.sandbox import isolate, protocol, runner, view
from memoplane.sandbox.limits import apply_rlimits, vm_size
from memoplane.sandbox.types import Limits

SOCK_FD = 1000   # the one non-stdio fd a job has; high so it never matches a caller's fd


@dataclass(frozen=True)
class ChildConfig:
    """Computed once by the zygote, inherited by every child."""

    root: str                                # legacy view: empty host dir it is mounted on
    binds: list[isolate.Bind]
    links: dict[str, str]
    bpf: bytes | None                        # compiled seccomp program, None if unavailable
    uid: int                                 # host ids root of the child's user namespace maps to
    gid: int
    # With a view template: the policy but seccomp_filter.LATE, installed while
    # the child waits; `bpf` then kills LATE only, installed at request time.
    bpf_warm: bytes | None = None
    early_pivot: bool = False                # /in arrives as a detached mount (an fd)
    template: bool = False                   # the zygote's mount namespace is the view (view.py)
    # True: a child makes its network namespace while still host root, so it is
    # owned by the host's user namespace and the job gets no CAP_NET_ADMIN in it.
    host_netns: bool = False
    vm_base: int = 0                         # the zygote's address-space size (0: measure per job)
    hard_limits: dict[int, int] | None = None  # inherited hard rlimits, read once by the zygote
    last_cap: int = 40                       # /proc/sys/kernel/cap_last_cap, read once
    disable: frozenset[str] = frozenset()    # primitives to skip (tests of degraded hosts)
    notes: dict[str, str] = field(default_factory=dict)  # why something is unavailable


def close_fds_except(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 16)


def enter_namespaces(cfg: ChildConfig, ask_maps: Callable[[], None],
                     entered: frozenset[str] = frozenset()) -> dict[str, bool | str]:
    """Unshare everything the host allows, record what it refused.

    `ask_maps` has the zygote (in the parent user namespace) write our id
    maps; `entered`: namespaces the zygote already put us in."""
    wanted = {k: v for k, v in isolate.NAMESPACES.items()
              if k not in cfg.disable and k not in entered}
    iso: dict[str, bool | str] = {k: "disabled by configuration" for k in isolate.NAMESPACES
                                  if k in cfg.disable}
    if cfg.host_netns and "netns" in wanted:
        # One per job (nobody sees another job's sockets, /proc/net, abstract names or
        # ports), made before the user namespace: the job cannot configure it.
        isolate.unshare(wanted.pop("netns"))
        iso["netns"] = True
    flags = 0
    for v in wanted.values():
        flags |= v
    try:
        isolate.unshare(flags)
    except OSError as e:
        if "userns" not in wanted:
            raise
        # Without a user namespace only a privileged agent can unshare the rest.
        reason = f"user namespaces unavailable ({e.strerror})"
        iso["userns"] = reason
        flags &= ~isolate.CLONE_NEWUSER
        isolate.unshare(flags)
        wanted.pop("userns")
    if "userns" in wanted:
        ask_maps()
        isolate.become_namespace_root()
    iso.update({k: True for k in wanted})
    iso.update({k: True for k in entered})
    if "userns" not in wanted:
        iso["unprivileged_uid"] = (f"no user namespace: the job runs as host uid {os.getuid()}, "
                                   "the agent's own")
    else:
        iso["unprivileged_uid"] = cfg.uid != 0 or "the job's user namespace maps to host root"
    return iso


def warm_main(cfg: ChildConfig, iso: dict[str, bool | str], sock_fd: int,
              out_fd: int, err_fd: int, proc_fd: int | None = None) -> NoReturn:
    """Run in I (pid 1 of the new pid namespace); never returns."""
    try:
        os.setsid()  # own session: kill(0, ...) from the job cannot reach the agent
        iso["view"] = _build_view(cfg, iso, proc_fd)
        _setup_stdio(sock_fd, out_fd, err_fd)
        sock = socket.socket(fileno=SOCK_FD)
        job_out = _mount_out(cfg, iso)
        # Work that does not depend on the request is done before it comes.
        runner.rehearse()  # compile and run a dummy job (pre-faulting), reseed
        isolate.limit_future_privileges(cfg.last_cap)
        iso["landlock_scope"] = _landlock_scope()  # needs no_new_privs; leaves mounting alone
        if cfg.bpf_warm is not None and "seccomp" not in cfg.disable:
            isolate.load_bpf(cfg.bpf_warm)  # all of the policy but the request's mount calls
        protocol.send(sock, {"op": "ready", "isolation": iso}, fds=[job_out] if job_out is not None else None)
        if job_out is not None:
            os.close(job_out)  # the pool reads /out through its copy, once we are all gone
        header, _, fds = protocol.recv_stream_with_fds(sock)
    except BaseException:  # noqa: BLE001 - the pool sees the exit and reports it
        os._exit(70)
    _serve(cfg, iso, sock, header, fds)


def _setup_stdio(sock_fd: int, out_fd: int, err_fd: int) -> None:
    null = os.open("/dev/null", os.O_RDONLY)
    for src, dst in ((null, 0), (out_fd, 1), (err_fd, 2), (sock_fd, SOCK_FD)):
        os.dup2(src, dst, inheritable=dst != SOCK_FD)
    close_fds_except({0, 1, 2, SOCK_FD})


def _build_view(cfg: ChildConfig, iso: dict[str, bool | str], proc_fd: int | None
                ) -> bool | str:
    if cfg.template:  # a failure here exits the child: it is already inside the view
        view.enter_child(proc_fd, isolate.DEFAULT_WORK_BYTES)
        return True
    if iso.get("mountns") is not True:
        return "no mount namespace"
    if "view" in cfg.disable:
        return "disabled by configuration"
    try:
        isolate.build_root(cfg.root, cfg.binds, cfg.links, cfg.early_pivot)
        return True
    except OSError as e:
        return f"could not build the read-only view: {e}"


def _mount_out(cfg: ChildConfig, iso: dict[str, bool | str]) -> int | None:
    """/out: a tmpfs of this child's own (isolate.mount_out). Without a view
    the job writes to the host directory the request names instead."""
    if iso.get("view") is not True:
        iso["out_tmpfs"] = "no read-only view: $MEMOPLANE_OUT is a host directory"
        return None
    iso["out_tmpfs"] = True
    return isolate.mount_out("/out" if cfg.template or cfg.early_pivot else cfg.root + "/out")


def _serve(cfg: ChildConfig, iso: dict[str, bool | str], sock: socket.socket,
           req: dict[str, Any], fds: list[int]) -> NoReturn:
    limits = Limits(**req["limits"])
    try:
        in_dir, out_dir = _enter(cfg, iso, req, limits, fds)
    except OSError as e:
        _send_result(sock, runner.failure("sandbox", f"sandbox setup failed: {e} — "
                                          "this is a memoplane or host problem, not the job's", ""))
    protocol.send(sock, {"op": "started", "isolation": _flatten(iso)})
    env = _job_env(req["env"], in_dir, out_dir)
    task = req["task"]
    if "argv" in task:
        result = runner.run_command(task["argv"], env)
    else:
        result = runner.run_python(task, env, in_dir, out_dir, limits)
    _send_result(sock, result)


def _enter(cfg: ChildConfig, iso: dict[str, bool | str], req: dict[str, Any],
           limits: Limits, fds: list[int]) -> tuple[str, str]:
    in_dir, out_dir = req["in_dir"], req["out_dir"]
    if iso.get("view") is True:
        if cfg.template or cfg.early_pivot:
            if len(fds) != 1:
                raise OSError("the request did not carry its /in mount")
            isolate.attach_request(fds[0], limits.workdir_bytes, limits.max_output_bytes)
            protocol.close_quietly(*fds)
        else:
            isolate.enter_root(cfg.root, in_dir, limits.workdir_bytes)
            isolate.resize_out(limits.max_output_bytes)
        in_dir, out_dir = "/in", "/out"
        os.chdir("/tmp")
        iso["fresh_proc"] = iso["workdir_tmpfs"] = True
    else:
        iso["fresh_proc"] = iso["workdir_tmpfs"] = "no read-only view"
        os.chdir(out_dir)
    # Per job: the count is kept per (user namespace, uid), and each child has its own.
    # A child maps a little more than the zygote it was forked from (its own
    # arenas, a few MiB at most); the job's allowance goes on top of the zygote's.
    iso.update(apply_rlimits(limits, cfg.vm_base or vm_size(),
                             effective_nproc=iso.get("unprivileged_uid") is True,
                             hard=cfg.hard_limits, mapped_bytes=runner.mapped_input_bytes(req["task"], in_dir)))
    isolate.drop_capabilities()  # the rest was done by warm_main
    iso["no_new_privs"] = iso["caps_dropped"] = True
    iso["closed_fds"] = True
    iso["seccomp"] = cfg.notes.get("seccomp", "unavailable")
    if cfg.bpf is not None and "seccomp" not in cfg.disable:
        isolate.load_bpf(cfg.bpf)
        iso["seccomp"] = True
    return in_dir, out_dir


def _landlock_scope() -> bool | str:
    """Scope abstract unix sockets and signals to this child and what it starts.

    Done while the child waits for work: a scope-only ruleset handles no
    file system access, so it does not stop the request's mounts."""
    try:
        isolate.landlock_scope()
        return True
    except OSError as e:
        return (f"Landlock scoping unavailable ({e.strerror}): jobs can reach each other's "
                "abstract unix sockets")


def _flatten(iso: dict[str, bool | str]) -> dict[str, bool]:
    return {k: v is True for k, v in iso.items()}


_JOB_PATH = f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin"


def base_environ() -> dict[str, str]:
    """A job's environment when it sets nothing, in the view (/in and /out).
    A root zygote makes this its own environment before forking: children
    inherit it and a request only changes what it adds (runner.set_environ)."""
    return _job_env({}, "/in", "/out")


def _job_env(extra: dict[str, str], in_dir: str, out_dir: str) -> dict[str, str]:
    env = {
        "PATH": _JOB_PATH,
        "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
        "MEMOPLANE_IN": in_dir, "MEMOPLANE_OUT": out_dir,
    }
    env.update(extra)
    return env


def _send_result(sock: socket.socket, result: tuple[dict[str, Any], bytes]) -> NoReturn:
    header, payload = result
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    try:
        protocol.send(sock, {"op": "result", **header}, payload)
    finally:
        os._exit(0)
