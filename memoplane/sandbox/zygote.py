"""The zygote: a fresh interpreter that preloads a profile and forks children.

Started by the pool as `python -m memoplane.sandbox.zygote <fd>` with a clean
environment and no inherited descriptors except its control socket, so no
credential of the agent is ever in its memory (children inherit all of it).

Control messages (SEQPACKET, see protocol.py):
  pool -> zygote  {"op": "config", ...}                       once, first
  zygote -> pool  {"op": "hello", "preloaded": [...], ...}
  pool -> zygote  {"op": "spawn", "id": n} + fds [channel, stdout_w, stderr_w]
  zygote -> pool  {"op": "spawned", "id": n, "pid": p} + [pidfd]  or  {"op": "spawn-failed", ...}
  zygote -> pool  {"op": "exit", "pid": p, "status": s}       for every child that ended
"""

from __future__ import annotations

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
from typing import Any, NoReturn

from memoplane.sandbox import child, isolate, protocol, runner

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
    binds, links = isolate.view_binds(tuple(cfg.get("extra_paths", ())))
    notes: dict[str, str] = {}
    bpf = None
    try:
        from memoplane.sandbox.seccomp_filter import compile_bpf
        bpf = compile_bpf()
    except Exception as e:  # noqa: BLE001 - recorded; the pool decides whether to refuse
        notes["seccomp"] = f"libseccomp unavailable: {type(e).__name__}: {e}"
    root = tempfile.mkdtemp(prefix="memoplane-view-")
    os.chmod(root, 0o755)
    return child.ChildConfig(root=root, binds=binds, links=links, bpf=bpf, uid=os.getuid(),
                             gid=os.getgid(), early_pivot=bool(cfg.get("early_pivot")),
                             last_cap=isolate.last_cap(),
                             disable=frozenset(cfg.get("disable", ())), notes=notes)


def spawn(cfg: child.ChildConfig, fds: list[int]) -> tuple[int, int]:
    """Fork W, which unshares and forks I; return I's pid and a pidfd for it."""
    r, w = os.pipe()
    wpid = os.fork()
    if wpid == 0:
        _w_main(cfg, fds, w)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(wpid, 0)
    reply = json.loads(data) if data else {"error": "the child died during setup"}
    if "error" in reply:
        raise OSError(reply["error"])
    pid = int(reply["pid"])
    return pid, os.pidfd_open(pid)  # I cannot be reaped (pid reused) before we do it


def _w_main(cfg: child.ChildConfig, fds: list[int], w: int) -> NoReturn:
    try:
        child.close_fds_except({*fds, w})
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        iso = child.enter_namespaces(cfg)
        pid = os.fork()  # the first child after unshare(CLONE_NEWPID) is pid 1 there
        if pid:
            os.write(w, json.dumps({"pid": pid}).encode())
            os._exit(0)
        os.close(w)
        child.warm_main(cfg, iso, *fds)
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(w, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(1)


class Zygote:
    def __init__(self, ctrl: socket.socket, cfg: child.ChildConfig) -> None:
        self.ctrl = ctrl
        self.cfg = cfg
        self.children: dict[int, int] = {}   # pid -> pidfd (kept to kill on shutdown)

    def serve(self) -> None:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        poller = select.poll()
        poller.register(self.ctrl.fileno(), 1)
        poller.register(rfd, 1)
        while True:
            for fd, _ev in poller.poll():
                if fd == rfd:
                    os.read(rfd, 4096)
                    self.reap()
                elif not self.handle():
                    return

    def handle(self) -> bool:
        try:
            msg, fds = protocol.recv_with_fds(self.ctrl)
        except (EOFError, OSError):
            return False
        if msg.get("op") == "spawn":
            try:
                pid, pidfd = spawn(self.cfg, fds)
                self.children[pid] = pidfd
                protocol.send(self.ctrl, {"op": "spawned", "id": msg["id"], "pid": pid}, fds=[pidfd])
            except OSError as e:
                protocol.send(self.ctrl, {"op": "spawn-failed", "id": msg["id"], "error": str(e)})
            finally:
                protocol.close_quietly(*fds)
        return True

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
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
        shutil.rmtree(self.cfg.root, ignore_errors=True)


def main() -> None:
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    conf, _ = protocol.recv_with_fds(ctrl)
    done, failed = preload(list(conf.get("preload", ())))
    cfg = make_config(conf)
    isolate.prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphaned I processes come back to us
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stdout.flush()
    runner.rehearse()
    gc.collect()
    gc.freeze()  # children never touch these objects' GC headers: fewer copied pages
    protocol.send(ctrl, {"op": "hello", "preloaded": done, "preload_failed": failed,
                         "notes": cfg.notes, "root": cfg.root})
    z = Zygote(ctrl, cfg)
    try:
        z.serve()
    finally:
        z.shutdown()


if __name__ == "__main__":
    main()
