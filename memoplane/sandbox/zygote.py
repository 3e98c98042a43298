"""The zygote: a fresh interpreter that preloads a profile and forks children.

Started by the pool as `python -m memoplane.sandbox.zygote <fd>` with a clean
environment and no inherited descriptors except its control socket, so no
credential of the agent is ever in its memory (children inherit all of it).

A root zygote then drops host root's supplementary groups and moves into a
mount namespace holding only the read-only view (view.py). Each child gets
an empty network namespace of its own: lent from NetnsPool, or made by the
child (child.enter_namespaces). It keeps one handle on the host: an
O_PATH fd of /proc, to write children's id maps; every child closes it first.

Control messages (SEQPACKET, see protocol.py):
  pool -> zygote  {"op": "config", ...}                       once, first
  zygote -> pool  {"op": "hello", "preloaded": [...], ...}
  pool -> zygote  {"op": "spawn", "id": n} + fds [channel, stdout_w, stderr_w]
  zygote -> pool  {"op": "spawned", "id": n, "pid": p} + [pidfd]  or  {"op": "spawn-failed", ...}
  zygote -> pool  {"op": "exit", "pid": p, "status": s}       for every child that ended
"""

from __future__ import annotations

import _signal
import dataclasses
import gc
import importlib
import json
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from typing import Any, NoReturn

from memoplane.sandbox import child, isolate, limits, protocol, runner, view

PR_SET_CHILD_SUBREAPER = 36


def preload(modules: list[str]) -> tuple[list[str], dict[str, str]]:
    done, failed = [], {}
    for name in modules:
        try:
            importlib.import_module(name)
            done.append(name)
        except Exception as e:  # noqa: BLE001 - a missing optional module is reported, not fatal
            failed[name] = f"{type(e).__name__}: {e}"
    return done, failed


def make_config(cfg: dict[str, Any]) -> child.ChildConfig:
    """Everything children share, computed once; a root zygote also leaves the
    host's network and mount namespaces here, for an empty one and the view."""
    disable = frozenset(cfg.get("disable", ()))
    binds, links = isolate.view_binds(tuple(cfg.get("extra_paths", ())))
    notes: dict[str, str] = {}
    progs: tuple[bytes, bytes, bytes] | None = None
    try:  # compiled here, while /tmp is still the host's (libseccomp writes a file)
        from memoplane.sandbox.seccomp_filter import LATE, compile_bpf
        progs = compile_bpf(), compile_bpf(exclude=LATE), compile_bpf(only=LATE)
    except Exception as e:  # noqa: BLE001 - recorded; the pool decides whether to refuse
        notes["seccomp"] = f"libseccomp unavailable: {type(e).__name__}: {e}"
    last_cap = isolate.last_cap()  # before leaving the host tree (and its /proc)
    root_agent = os.getuid() == 0
    host_id = int(cfg.get("host_id", isolate.JOB_HOST_ID)) if root_agent else os.getuid()
    template, root = False, ""
    if root_agent and not disable & {"view", "mountns"}:
        try:
            view.build_template(binds, links)
            template = True
        except OSError as e:
            notes["view"] = f"could not prepare the view once ({e}); built per child"
    if not template:
        root = tempfile.mkdtemp(prefix="memoplane-view-")
        os.chmod(root, 0o755)
    bpf = bpf_warm = None
    if progs is not None:  # children of a view template attach their mounts, nothing else
        bpf, bpf_warm = (progs[2], progs[1]) if template else (progs[0], None)
    return child.ChildConfig(root=root, binds=binds, links=links, bpf=bpf, bpf_warm=bpf_warm,
                             uid=host_id,
                             gid=host_id if root_agent else os.getgid(),
                             early_pivot=bool(cfg.get("early_pivot")), template=template,
                             host_netns=root_agent, last_cap=last_cap,
                             disable=disable, notes=notes)


class NetnsPool:
    """Empty network namespaces (a down loopback only), each lent to one child at a
    time and taken back once that child is reaped, i.e. once every process of its
    job is gone and with them every socket: creating and tearing down a network
    namespace per job costs about 1 ms of CPU, as much as the rest of a sandbox.
    Made by host root, so no job holds a capability over one. What may outlive a
    job in its namespace is kernel state that no socket holds (IPv6 flow labels
    linger up to 6 s); sockets, listeners and abstract names do not."""

    def __init__(self, proc_fd: int) -> None:
        self.proc_fd = proc_fd
        self.home = os.open("self/ns/net", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_fd)
        self.free: list[int] = []
        self.lent: dict[int, int] = {}   # child pid -> its namespace

    def take(self) -> int:
        if self.free:
            return self.free.pop()
        isolate.unshare(isolate.CLONE_NEWNET)
        try:
            return os.open("self/ns/net", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.proc_fd)
        finally:
            isolate.setns(self.home, isolate.CLONE_NEWNET)

    def lend(self, pid: int, fd: int) -> None:
        self.lent[pid] = fd

    def give_back(self, pid: int) -> None:
        fd = self.lent.pop(pid, None)
        if fd is not None:
            self.free.append(fd)


def spawn_direct(cfg: child.ChildConfig, fds: list[int], pidns_fd: int | None,
                 lean: bool, netns_fd: int | None) -> tuple[int, int, int, int]:
    """Fork the child I straight into a new pid namespace (root zygote, view
    template). Returns its pid, a pidfd, and the pipe ends on which it asks
    for its id maps (b"u") and is answered: the zygote answers from its poll
    loop, so it can fork the next child meanwhile.

    unshare(CLONE_NEWPID) only moves our *next* child, and setns to our own
    pid namespace undoes it for the one after: one fork of this big process
    per child instead of two. `netns_fd`: the network namespace it joins."""
    r, w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    if pidns_fd is not None:
        isolate.unshare(isolate.CLONE_NEWPID)
    pid = -1
    try:
        pid = isolate.fork_lean() if lean else os.fork()
    finally:
        if pidns_fd is not None and pid != 0:
            isolate.setns(pidns_fd, isolate.CLONE_NEWPID)
    if pid == 0:
        os.close(r)
        os.close(go_w)
        _i_main(cfg, fds, w, go_r, pidns_fd is not None, netns_fd)
    os.close(w)
    os.close(go_r)
    return pid, os.pidfd_open(pid), r, go_w


def _map_ids(cfg: child.ChildConfig, proc_fd: int, pid: int, go_w: int) -> None:
    try:
        isolate.write_id_maps(proc_fd, pid, cfg.uid, cfg.gid)
        os.write(go_w, b"g")
    except OSError as e:
        os.write(go_w, b"x")
        raise OSError(f"could not map the child's ids: {e}") from None


def _i_main(cfg: child.ChildConfig, fds: list[int], w: int, go: int, new_pidns: bool,
            netns_fd: int | None) -> NoReturn:
    try:
        keep = {*fds, w, go} if netns_fd is None else {*fds, w, go, netns_fd}
        child.close_fds_except(keep)  # first: this also closes the host /proc
        _default_sigchld()
        entered = {"pidns"} if new_pidns else set()
        if netns_fd is not None:  # still host root: the job gets no capability over it
            isolate.setns(netns_fd, isolate.CLONE_NEWNET)
            os.close(netns_fd)
            entered.add("netns")
        # Our own /proc, made while we are still host root in our new pid namespace.
        proc = isolate.detached_proc() if new_pidns else None
        iso = child.enter_namespaces(cfg, _asker(w, go), frozenset(entered))
        protocol.close_quietly(w, go)
    except BaseException:  # noqa: BLE001 - the pool sees the channel close and reports it
        os._exit(71)
    sock_fd, out_fd, err_fd = fds
    child.warm_main(cfg, iso, sock_fd, out_fd, err_fd, proc_fd=proc)


_SIGCHLD, _SIG_DFL = int(signal.SIGCHLD), int(signal.SIG_DFL)


def _default_sigchld() -> None:
    """Undo the zygote's SIGCHLD handling in a child. Through _signal with
    plain ints: signal.signal() converts to and from enums, ~60 copied pages
    in a freshly forked child."""
    _signal.set_wakeup_fd(-1)
    _signal.signal(_SIGCHLD, _SIG_DFL)


def _asker(w: int, go: int) -> Callable[[], None]:
    def ask_maps() -> None:
        os.write(w, b"u")
        if os.read(go, 1) != b"g":
            raise OSError("the zygote could not write the id maps")
    return ask_maps


def spawn(cfg: child.ChildConfig, fds: list[int], proc_fd: int) -> tuple[int, int]:
    """Fork W, which unshares and forks I; return I's pid and a pidfd for it.

    W asks for its id maps in between (b"u"): only a process in the parent
    user namespace can map a host id other than its own."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    wpid = os.fork()
    if wpid == 0:
        os.close(go_w)
        _w_main(cfg, fds, w, go_r)
    os.close(w)
    os.close(go_r)
    try:
        data = os.read(r, 1)
        if data == b"u":
            _map_ids(cfg, proc_fd, wpid, go_w)
            data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
        os.close(go_w)
        os.waitpid(wpid, 0)
    reply = json.loads(data) if data else {"error": "the child died during setup"}
    if "error" in reply:
        raise OSError(reply["error"])
    pid = int(reply["pid"])
    return pid, os.pidfd_open(pid)  # I cannot be reaped (pid reused) before we do it


def _w_main(cfg: child.ChildConfig, fds: list[int], w: int, go: int) -> NoReturn:
    try:
        child.close_fds_except({*fds, w, go})  # first: this also closes the host /proc
        _default_sigchld()
        iso = child.enter_namespaces(cfg, _asker(w, go))
        os.close(go)
        pid = os.fork()  # the first child after unshare(CLONE_NEWPID) is pid 1 there
        if pid:
            os.write(w, json.dumps({"pid": pid}).encode())
            os._exit(0)
        os.close(w)
        child.warm_main(cfg, iso, *fds)
    except BaseException as e:  # noqa: BLE001 - the host reads the error from w; this process exits either way
        try:
            os.write(w, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(1)


def _single_threaded(proc_fd: int) -> bool:
    """No other thread (none of ours, none a library started, e.g. BLAS)."""
    fd = os.open("self/task", os.O_RDONLY | os.O_DIRECTORY, dir_fd=proc_fd)
    try:
        return len(os.listdir(fd)) == 1
    finally:
        os.close(fd)


class Zygote:
    def __init__(self, ctrl: socket.socket, cfg: child.ChildConfig, proc_fd: int) -> None:
        self.ctrl = ctrl
        self.cfg = cfg
        self.proc_fd = proc_fd
        self.pidns_fd: int | None = None
        if cfg.template and "pidns" not in cfg.disable:
            self.pidns_fd = os.open("self/ns/pid", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_fd)
        self.children: dict[int, int] = {}   # pid -> pidfd (kept to kill on shutdown)
        self.asking: dict[int, tuple[int, int]] = {}  # read end -> (pid, answer end)
        self.lean = _single_threaded(proc_fd)  # may skip CPython's after-fork work
        # Reuse needs "every process of the job is gone" = "its pid namespace's init was reaped".
        pooled = cfg.template and cfg.host_netns and self.pidns_fd is not None and "netns" not in cfg.disable
        self.netns = NetnsPool(proc_fd) if pooled else None
        self.poller = select.poll()

    def serve(self) -> None:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.poller.register(self.ctrl.fileno(), select.POLLIN)
        self.poller.register(rfd, select.POLLIN)
        while True:
            for fd, _ev in self.poller.poll():
                if fd == rfd:
                    os.read(rfd, 4096)
                    self.reap()
                elif fd in self.asking:
                    self.answer(fd)
                elif not self.handle():
                    return

    def answer(self, r: int) -> None:
        """A child asks for its id maps (b"u"), or closed its end (died, or needs none)."""
        pid, go_w = self.asking.pop(r)
        self.poller.unregister(r)
        try:
            if os.read(r, 1) == b"u":
                _map_ids(self.cfg, self.proc_fd, pid, go_w)
        except OSError:
            pass  # the child exits on b"x" or a closed pipe; the pool sees its channel close
        finally:
            protocol.close_quietly(r, go_w)

    def handle(self) -> bool:
        try:
            msg, fds = protocol.recv_with_fds(self.ctrl)
        except (EOFError, OSError):
            return False
        if msg.get("op") == "spawn":
            try:
                if self.cfg.template:
                    pid, pidfd, r, go_w = self.spawn_direct(fds)
                    self.asking[r] = (pid, go_w)
                    self.poller.register(r, select.POLLIN)
                else:
                    pid, pidfd = spawn(self.cfg, fds, self.proc_fd)
                self.children[pid] = pidfd
                protocol.send(self.ctrl, {"op": "spawned", "id": msg["id"], "pid": pid}, fds=[pidfd])
            except OSError as e:
                protocol.send(self.ctrl, {"op": "spawn-failed", "id": msg["id"], "error": str(e)})
            finally:
                protocol.close_quietly(*fds)
        return True

    def spawn_direct(self, fds: list[int]) -> tuple[int, int, int, int]:
        netns = self.netns.take() if self.netns is not None else None
        try:
            pid, pidfd, r, go_w = spawn_direct(self.cfg, fds, self.pidns_fd, self.lean, netns)
        except BaseException:
            if netns is not None:
                assert self.netns is not None
                self.netns.free.append(netns)
            raise
        if netns is not None:
            assert self.netns is not None
            self.netns.lend(pid, netns)
        return pid, pidfd, r, go_w

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.netns is not None:
                self.netns.give_back(pid)  # reaped: the job's last process is gone
            pidfd = self.children.pop(pid, None)
            if pidfd is not None:
                os.close(pidfd)
                protocol.send(self.ctrl, {"op": "exit", "pid": pid, "status": status})

    def shutdown(self) -> None:
        for pidfd in self.children.values():
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
        if self.cfg.root:
            shutil.rmtree(self.cfg.root, ignore_errors=True)


def main() -> None:
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    conf, _ = protocol.recv_with_fds(ctrl)
    if os.getuid() == 0:
        os.setgroups([])  # children must not carry host root's supplementary groups
    # Opened while the host tree is still ours: to write children's id maps.
    proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    done, failed = preload(list(conf.get("preload", ())))
    cfg = make_config(conf)
    isolate.prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphaned I processes come back to us
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stdout.flush()
    runner.rehearse()
    if cfg.template:  # the job's environment: nothing for a child to replace
        runner.set_environ(child.base_environ())
    for bpf in (cfg.bpf, cfg.bpf_warm):
        if bpf:
            isolate.prepare_bpf(bpf)
    cfg = dataclasses.replace(cfg, vm_base=limits.vm_size(proc_fd), hard_limits=limits.hard_limits())
    gc.collect()
    gc.freeze()  # children never touch these objects' GC headers: fewer copied pages
    z = Zygote(ctrl, cfg, proc_fd)
    protocol.send(ctrl, {"op": "hello", "preloaded": done, "preload_failed": failed,
                         "notes": cfg.notes, "root": cfg.root, "host_uid": cfg.uid,
                         "template": cfg.template, "host_netns": cfg.host_netns,
                         "lean_fork": z.lean})
    try:
        z.serve()
    finally:
        z.shutdown()


if __name__ == "__main__":
    main()
