"""SandboxPool: a zygote plus a warm pool of isolated children, one job each."""

from __future__ import annotations

import logging
import os
import queue
import select
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memoplane.errors import IsolationUnavailable
from memoplane.sandbox import cgroup, collect, isolate, protocol
from memoplane.sandbox.outcome import (
    failure_for_status,
    from_result,
    outcome,
)
from memoplane.sandbox.profiles import get_profile
from memoplane.sandbox.removal import remove_tree
from memoplane.sandbox.types import (
    CommandTask,
    Failure,
    Limits,
    PythonTask,
    SandboxOutcome,
    SandboxRequest,
)
from memoplane.sandbox.zygote_client import ZygoteClient

log = logging.getLogger("memoplane.sandbox")

# Without these a job is not isolated; require_isolation=True refuses to run.
REQUIRED = ("userns", "mountns", "pidns", "ipcns", "utsns", "netns", "view", "seccomp",
            "pids_limit", "unprivileged_uid")
_READY_TIMEOUT = 30.0
# How long a killed job's processes may take to be gone (one stuck in an
# uninterruptible call, e.g. sync(), ends when the call does). Past it the
# job fails and its outputs are never read.
_GONE_TIMEOUT = 60.0
_DEFAULT = Limits()


class _Slot:
    """One warm child and the pool's ends of its channels."""

    def __init__(self, pid: int, pidfd: int, sock: socket.socket, out_r: int, err_r: int,
                 group: cgroup.Group | None) -> None:
        self.pid, self.pidfd, self.sock = pid, pidfd, sock
        self.out_r, self.err_r, self.group = out_r, err_r, group
        self.out_fd: int | None = None   # the child's /out tmpfs (isolate.mount_out)
        self.isolation: dict[str, bool | str] = {}
        self.userns: int | None = None   # the child's user namespace, to idmap /in

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)  # kills its whole pid ns
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        protocol.close_quietly(self.out_r, self.err_r, self.pidfd)
        for fd in (self.userns, self.out_fd):
            if fd is not None:
                protocol.close_quietly(fd)


class SandboxPool:
    """Runs SandboxRequests in isolated children forked from one zygote.

    Thread-safe: `run` may be called from many threads at once; each call
    takes its own child. Use as a context manager, or call `close()`."""

    def __init__(self, profile: str = "python", size: int = 2,
                 preload: tuple[str, ...] | None = None, require_isolation: bool = True,
                 extra_paths: tuple[str, ...] = (), _disable: tuple[str, ...] = (),
                 host_id: int | None = None) -> None:
        prof = get_profile(profile)
        self.profile = prof.name
        self.size = size
        self._exits: dict[int, int] = {}
        self._doomed: dict[int, _Slot] = {}
        self._lock = threading.Condition()
        self._ready: queue.Queue[_Slot] = queue.Queue()
        self._closed = False
        self._disable = _disable
        self._cg = cgroup.detect(f"memoplane-{os.getpid()}-{id(self):x}")
        self._early_pivot = _can_detach_trees()
        config = {"preload": list(prof.preload if preload is None else preload),
                  "extra_paths": list(prof.extra_paths + extra_paths), "disable": list(_disable),
                  "early_pivot": self._early_pivot}
        if host_id is not None:  # the host uid/gid jobs run as (root agents only)
            config["host_id"] = host_id
        self._zygote = ZygoteClient(config, prof.env, self._on_exit)
        # Jobs run as another host uid than ours: /in and /out are idmapped to it.
        self._idmap = self._early_pivot and self._zygote.hello.get("host_uid") != os.getuid()
        self.preloaded: list[str] = list(self._zygote.hello.get("preloaded", []))
        try:
            first = self._spawn()
            self.isolation = self._report(first.isolation)
            self._check(require_isolation)
        except BaseException:
            self.close()
            raise
        self._ready.put(first)
        self._want = threading.Event()
        self._starting = 0  # children being started by the fillers
        # Two fillers: while one child sets itself up, the zygote forks the next.
        self._fillers = [threading.Thread(target=self._fill_loop, name=f"memoplane-pool-{k}",
                                          daemon=True) for k in range(min(size, 2))]
        for t in self._fillers:
            t.start()
        self._want.set()

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if hasattr(self, "_want"):
            self._want.set()
            for t in self._fillers:
                t.join(timeout=10)
        while True:
            try:
                slot = self._ready.get_nowait()
            except queue.Empty:
                break
            self._retire(slot)
        self._zygote.close()
        for d in (self._cg.memory, self._cg.pids):
            if d is not None:
                _rmtree_cgroups(d)

    # -- isolation -------------------------------------------------------------------

    def _report(self, iso: dict[str, bool | str]) -> dict[str, bool | str]:
        rep: dict[str, bool | str] = dict(iso)
        notes = self._zygote.hello.get("notes", {})
        rep["seccomp"] = notes.get("seccomp", True)
        rep["cgroup_memory"] = self._cg.memory is not None or (self._cg.reason or "unavailable")
        rep["cgroup_pids"] = self._cg.pids is not None or (self._cg.reason or "unavailable")
        nproc = rep.get("unprivileged_uid") is True
        rep["rlimit_nproc"] = nproc or ("RLIMIT_NPROC does not apply to host root; "
                                        "the pids cgroup limits processes instead")
        rep["pids_limit"] = (rep["cgroup_pids"] is True or nproc
                             or "neither a pids cgroup nor RLIMIT_NPROC can limit processes")
        if "seccomp" in self._disable:
            rep["seccomp"] = "disabled by configuration"
        return rep

    def _check(self, require: bool) -> None:
        missing = {k: self.isolation.get(k, "not reported") for k in REQUIRED
                   if self.isolation.get(k) is not True}
        if not missing:
            return
        what = "; ".join(f"{k}: {v}" for k, v in missing.items())
        if require:
            raise IsolationUnavailable(
                f"this host cannot isolate sandbox jobs ({what})",
                "enable user namespaces (sysctl user.max_user_namespaces>0, "
                "kernel.unprivileged_userns_clone=1) and libseccomp, or pass "
                "require_isolation=False to run with the reduced isolation recorded in "
                "every outcome")
        log.warning("memoplane sandbox runs with REDUCED isolation: %s", what)

    # -- children --------------------------------------------------------------------

    def _spawn(self) -> _Slot:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            sp = self._zygote.spawn([theirs.fileno(), out_w, err_w])
        except BaseException:
            ours.close()
            protocol.close_quietly(out_r, err_r)
            raise
        finally:
            theirs.close()
            protocol.close_quietly(out_w, err_w)
        group = cgroup.Group(self._cg, f"c{sp.pid}") if self._cg.memory or self._cg.pids else None
        slot = _Slot(sp.pid, sp.pidfd, ours, out_r, err_r, group)
        try:
            if group is not None:
                group.set_limits(_DEFAULT.memory_bytes, _DEFAULT.max_pids)
                group.add(sp.pid)
            ours.settimeout(_READY_TIMEOUT)
            msg, _, fds = protocol.recv_stream_with_fds(ours, maxfds=1)
            ours.settimeout(None)
            slot.out_fd = fds[0] if fds else None
            if msg.get("op") != "ready":
                raise OSError(f"unexpected first message from a child: {msg}")
        except BaseException:
            self._retire(slot)
            raise
        slot.isolation = msg.get("isolation", {})
        if self._idmap and slot.isolation.get("userns") is True:
            try:
                slot.userns = isolate.pidfd_userns(sp.pidfd, sp.pid)
            except OSError:
                self._retire(slot)
                raise
        return slot

    def _fill_loop(self) -> None:
        while not self._closed:
            self._want.wait()
            while not self._closed and self._claim():
                try:
                    self._ready.put(self._spawn())
                except Exception as e:  # noqa: BLE001 - run() spawns on demand and reports
                    log.warning("could not start a warm sandbox child: %s", e)
                    time.sleep(0.5)
                    break
                finally:
                    with self._lock:
                        self._starting -= 1
            with self._lock:
                if self._ready.qsize() + self._starting >= self.size:
                    self._want.clear()

    def _claim(self) -> bool:
        """Take the job of starting one more child, if the pool needs one."""
        with self._lock:
            if self._ready.qsize() + self._starting >= self.size:
                return False
            self._starting += 1
            return True

    def _take(self) -> _Slot:
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            return self._spawn()  # cold: no warm child left

    def _on_exit(self, pid: int, status: int) -> None:
        with self._lock:
            self._exits[pid] = status
            slot = self._doomed.pop(pid, None)
            self._lock.notify_all()
        if slot is not None and slot.group is not None:
            slot.group.remove()
            self._exits.pop(pid, None)

    def _wait_exit(self, pid: int, timeout: float) -> int | None:
        with self._lock:
            self._lock.wait_for(lambda: pid in self._exits, timeout)
            return self._exits.get(pid)

    def _retire(self, slot: _Slot) -> None:
        """Kill a child (if alive), close our ends; its cgroup goes when it is reaped."""
        slot.kill()
        slot.close()
        with self._lock:
            reaped = self._exits.pop(slot.pid, None) is not None
            if not reaped:
                self._doomed[slot.pid] = slot
        if reaped and slot.group is not None:
            slot.group.remove()

    # -- running -----------------------------------------------------------------------

    def run(self, request: SandboxRequest, stop_fd: int | None = None,
            on_out: Callable[[int], None] | None = None) -> SandboxOutcome:
        """Run one job in a fresh isolated child and report how it went. When `stop_fd`
        (e.g. a pipe's read end) turns readable, the job is killed as if it timed out: how a
        long-lived job (an API session) is ended by its owner. `on_out` is handed, before the
        job starts, a descriptor of the job's $MEMOPLANE_OUT (its own to close), for reading
        outputs while the job runs (an API session's snapshot) with collect.collect."""
        if self._closed:
            raise RuntimeError("the sandbox pool is closed")
        t0 = time.monotonic()
        slot = self._take()
        try:
            return _Job(self, slot, request, t0, stop_fd, on_out).run()
        finally:
            self._want.set()  # normally set once the job started (see _Job._frames)
            self._retire(slot)


def _can_detach_trees() -> bool:
    """Can this process hand mounts to children (open_tree needs CAP_SYS_ADMIN)?"""
    try:
        os.close(isolate.detached_tree(tempfile.gettempdir(), readonly=True))
        return True
    except OSError:
        return False


def _rmtree_cgroups(d: Path) -> None:
    for sub in d.glob("*"):
        if sub.is_dir():
            try:
                os.rmdir(sub)
            except OSError:
                pass
    try:
        os.rmdir(d)
    except OSError:
        pass


def _fields(obj: Any) -> dict[str, Any]:
    """A dataclass's fields, not copied: the message is only serialised
    (dataclasses.asdict deep-copies every input value first)."""
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


def _task_message(task: PythonTask | CommandTask) -> dict[str, Any]:
    if isinstance(task, CommandTask):
        return {"argv": list(task.argv)}
    return _fields(task)


class _Job:
    """One request on one slot: send, watch channel and pipes, decide the outcome."""

    def __init__(self, pool: SandboxPool, slot: _Slot, req: SandboxRequest, t0: float,
                 stop_fd: int | None = None, on_out: Callable[[int], None] | None = None) -> None:
        self.pool, self.slot, self.req, self.t0, self.stop_fd = pool, slot, req, t0, stop_fd
        self.on_out = on_out
        self.limits = req.limits
        self.out, self.err = bytearray(), bytearray()
        self.frames = protocol.FrameReader()
        self.started: dict[str, bool] | None = None
        self.result: tuple[dict[str, Any], bytes] | None = None
        self.cg_iso: dict[str, bool] = {"cgroup_memory": False, "cgroup_pids": False}

    def run(self) -> SandboxOutcome:
        group = self.slot.group
        if group is not None:
            # Outputs live in the child's /out tmpfs, charged to its memory cgroup until
            # collected: the cgroup holds the job's memory and its outputs.
            held = self.limits.max_output_bytes if self.slot.out_fd is not None else 0
            self.cg_iso = group.set_limits(self.limits.memory_bytes + held, self.limits.max_pids,
                                           group.applied)
        scratch = None
        if self.slot.out_fd is None:  # no view: the job writes to a host directory of its own
            scratch = tempfile.mkdtemp(prefix="memoplane-out-", dir=Path(self.req.out_dir).parent)
        try:
            if self.on_out is not None:
                self.on_out(os.dup(self.slot.out_fd) if self.slot.out_fd is not None else
                            os.open(scratch or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC))
            return self._run(scratch)
        finally:
            if scratch is not None:
                try:
                    remove_tree(Path(scratch))  # iterative: a job's tree may be any depth here
                except OSError as e:
                    log.warning("could not remove %s: %s", scratch, e)

    def _run(self, scratch: str | None) -> SandboxOutcome:
        msg = {"op": "run", "task": _task_message(self.req.task), "env": dict(self.req.env),
               "in_dir": str(Path(self.req.in_dir).resolve()), "out_dir": scratch or "/out",
               "limits": _fields(self.limits)}
        try:
            self._send(msg)
            ended = self._watch()  # the first result ends it: later messages are never read
        except (OSError, protocol.ProtocolError) as e:
            ended = f"channel: {e}"
        self.slot.kill()
        gone = self._wait_gone()
        self._drain()
        return self._decide(ended, gone, scratch)

    def _send(self, msg: dict[str, Any]) -> None:
        if not self.pool._early_pivot:
            protocol.send(self.slot.sock, msg)
            return
        fd = isolate.detached_tree(msg["in_dir"], readonly=True, userns_fd=self.slot.userns)
        try:
            protocol.send(self.slot.sock, msg, fds=[fd])
        finally:
            protocol.close_quietly(fd)

    def _wait_gone(self) -> bool:
        """Wait until no process of the job is left. The child is pid 1 of its pid
        namespace: its pidfd turns readable when it has exited, which the kernel
        lets happen only after every other process in the namespace is gone
        (zap_pid_ns_processes). Without a pid namespace the cgroup must be empty too."""
        deadline = time.monotonic() + _GONE_TIMEOUT
        poller = select.poll()
        poller.register(self.slot.pidfd, select.POLLIN)
        if not poller.poll(_GONE_TIMEOUT * 1000):
            return False
        if self.pool.isolation.get("pidns") is True:
            return True
        group = self.slot.group
        while group is not None and not group.empty():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return group is not None

    def _watch(self) -> str:
        """Wait for the result; returns why watching stopped."""
        poller = select.poll()
        fds = {self.slot.sock.fileno(): "sock", self.slot.out_r: "out", self.slot.err_r: "err"}
        if self.stop_fd is not None:
            fds[self.stop_fd] = "stop"
        for fd in fds:
            poller.register(fd, select.POLLIN)
        deadline = self.t0 + self.limits.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            for fd, _ev in poller.poll(left * 1000):
                if fds[fd] == "stop":
                    return "stopped"
                data = os.read(fd, 1 << 16)
                if fds[fd] == "sock":
                    if not data:
                        return "died"
                    if self._frames(data):
                        return "result"
                elif not data:
                    poller.unregister(fd)
                elif self._log(fds[fd], data):
                    return "log-overflow:" + fds[fd]

    def _frames(self, data: bytes) -> bool:
        for header, payload in self.frames.feed(data):
            op = header.get("op")
            if op == "started" and self.started is None:
                self.started = {k: bool(v) for k, v in header.get("isolation", {}).items()}
                # Refill now, not before: a spawn competing for the CPU with the
                # request it replaces would only delay that request.
                self.pool._want.set()
            elif op == "result" and self.started is not None:
                self.result = (header, payload)
                return True
        return False

    def _log(self, which: str, data: bytes) -> bool:
        buf = self.out if which == "out" else self.err
        room = self.limits.max_log_bytes - len(buf)
        buf += data[:max(room, 0)]
        return len(data) > room

    def _drain(self) -> None:
        """Take what is already in the pipes; later writers are dead or ignored."""
        for fd, which in ((self.slot.out_r, "out"), (self.slot.err_r, "err")):
            os.set_blocking(fd, False)
            try:
                while data := os.read(fd, 1 << 16):
                    if self._log(which, data):
                        break
            except BlockingIOError:
                pass

    def _decide(self, ended: str, gone: bool, scratch: str | None) -> SandboxOutcome:
        group = self.slot.group
        oom = group.oom_killed() if group else False
        pids_hit = group.pids_exhausted() if group else False
        ok, value, kind, failure, code = False, None, "none", None, None
        if not gone:
            failure = Failure("sandbox", f"the job's processes were still there {_GONE_TIMEOUT:.0f}s after "
                              "it was killed (stuck in the kernel?); its outputs were discarded — "
                              "a memoplane or host problem, retry the job")
        elif ended == "result" and self.result is not None:
            header, payload = self.result
            code = header.get("exit_code")
            ok, value, kind, failure = self._result(header, payload, oom, pids_hit, scratch)
        elif ended == "stopped":
            failure = Failure("timeout", "the job was stopped by its owner (a session killed or past its timeout)")
        elif ended == "timeout":
            failure = Failure("timeout", f"the job ran past its wall-clock limit of "
                              f"{self.limits.timeout_s}s and was killed — raise "
                              "limits.timeout_s or make the job faster")
        elif ended.startswith("log-overflow"):
            stream = "stdout" if ended.endswith("out") else "stderr"
            failure = Failure("output-too-large", f"the job wrote more than max_log_bytes="
                              f"{self.limits.max_log_bytes} to {stream} and was killed — "
                              "write large output to $MEMOPLANE_OUT or raise the limit")
        elif ended == "died":  # the zygote reaps the child and tells us how it ended
            status = self.pool._wait_exit(self.slot.pid, 5.0)
            failure = failure_for_status(status, None, oom, pids_hit, self.limits)
        else:
            failure = Failure("sandbox", f"lost contact with the sandbox child ({ended}) — "
                              "a memoplane or host problem")
        return outcome(ok, value, kind, failure, code, bytes(self.out), bytes(self.err),
                       time.monotonic() - self.t0, self._isolation())

    def _result(self, header: dict[str, Any], payload: bytes, oom: bool, pids_hit: bool,
                scratch: str | None) -> tuple[bool, Any, str, Failure | None]:
        """Decode a result and, when it succeeded, collect the outputs (the job is gone)."""
        src = self.slot.out_fd
        opened = None
        try:
            if src is None:
                src = opened = os.open(scratch or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            out_fd = src
            ok, value, kind, failure = from_result(
                header, payload, lambda: collect.read_return_file(out_fd, self.limits), self.limits,
                oom, pids_hit)
            if ok:
                collect.collect(out_fd, str(self.req.out_dir), self.limits, kind)
            return ok, value, kind, failure
        except collect.Refused as e:
            return False, None, "none", e.failure
        except (OSError, ValueError) as e:
            return False, None, "none", Failure("sandbox", f"the job's result could not be read: {e}")
        finally:
            if opened is not None:
                os.close(opened)

    def _isolation(self) -> dict[str, bool]:
        iso = {k: v is True for k, v in self.pool.isolation.items()}
        iso.update(self.started or {})
        iso.update(self.cg_iso)
        iso["pids_limit"] = iso.get("cgroup_pids", False) or iso.get("rlimit_nproc", False)
        iso["timeout"] = iso["output_caps"] = True
        return iso
