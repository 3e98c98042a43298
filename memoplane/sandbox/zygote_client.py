"""The pool's handle on its zygote process: start it, ask for children, hear exits."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memoplane.sandbox import protocol

_PKG_PARENT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class Spawned:
    pid: int
    pidfd: int


class ZygoteClient:
    """Thread-safe: any thread may spawn; one reader thread routes replies."""

    def __init__(self, config: dict[str, Any], env: dict[str, str],
                 on_exit: Callable[[int, int], None]) -> None:
        self._on_exit = on_exit
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memoplane.sandbox.zygote", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=self._clean_env(env), cwd="/",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self._sock = ours
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, tuple[dict[str, Any], list[int]]] = {}
        self._next_id = 0
        self._closed = False
        protocol.send(ours, {"op": "config", **config})
        self.hello, _ = protocol.recv_with_fds(ours)
        self._reader = threading.Thread(target=self._read_loop, name="memoplane-zygote",
                                        daemon=True)
        self._reader.start()

    @staticmethod
    def _clean_env(extra: dict[str, str]) -> dict[str, str]:
        # Nothing from the caller's environment: it may hold credentials.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
               "PYTHONPATH": _PKG_PARENT, "PYTHONDONTWRITEBYTECODE": "1"}
        env.update(extra)
        return env

    def spawn(self, fds: list[int], timeout: float = 30.0) -> Spawned:
        with self._cond:
            self._next_id += 1
            rid = self._next_id
        with self._send_lock:
            protocol.send(self._sock, {"op": "spawn", "id": rid}, fds=fds)
        with self._cond:
            if not self._cond.wait_for(lambda: rid in self._replies or self._closed, timeout):
                raise OSError("the zygote did not answer a spawn request")
            if rid not in self._replies:
                raise OSError("the zygote exited")
            msg, got = self._replies.pop(rid)
        if msg.get("op") != "spawned" or not got:
            protocol.close_quietly(*got)
            raise OSError(f"the zygote could not start a child: {msg.get('error', msg)}")
        return Spawned(int(msg["pid"]), got[0])

    def _read_loop(self) -> None:
        while True:
            try:
                msg, fds = protocol.recv_with_fds(self._sock)
            except (EOFError, OSError, protocol.ProtocolError):
                break
            if msg.get("op") == "exit":
                self._on_exit(int(msg["pid"]), int(msg["status"]))
                continue
            with self._cond:
                self._replies[int(msg.get("id", -1))] = (msg, fds)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return not self._closed and self.proc.poll() is None

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child process, by its handle
            self.proc.wait()
