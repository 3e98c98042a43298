"""The agent inside a session sandbox: its source is the PythonTask a session's child runs.

Standard library only, and self-contained: it runs in the sandbox child (its view holds the
runtime, not memoplane). It dials the host's unix socket under $MEMOPLANE_IN and serves
requests until told to exit or the host goes away. Every path it opens is opened inside the
child's isolation, so the files API reaches exactly what a command in the sandbox could.

Wire: one JSON object per line each way. A request carries "id" and "op"; every reply
carries the request's "id", and the last reply of a request has "done": true. Bytes travel
base64-encoded. Host -> agent ops: env, exec, signal, input, close_stdin, ps, read, write, list,
stat, mkdir, remove, move, code, snapshot, snapshot_taken, restore, exit. An exec is started
as soon as it is read; every other request, and the rest of an exec, runs in a thread of its own.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

SOCKET_NAME = "session.sock"


class Agent:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.configs: dict[int, dict[str, Any]] = {}   # how each running command was started
        self.namespace: dict[str, Any] = {"__name__": "__main__"}
        self.code_lock = threading.Lock()  # one cell at a time: they share a namespace

    def send(self, message: dict[str, Any]) -> None:
        line = (json.dumps(message) + "\n").encode()
        with self.send_lock:
            self.sock.sendall(line)

    def serve(self) -> None:
        for line in self.sock.makefile("rb"):
            request = json.loads(line)
            if request.get("op") == "exit":
                os._exit(0)  # pid 1 of the sandbox: everything in it ends with us
            if request.get("op") == "exec":
                # Started here, not after a thread of its own started: on the way to its first output.
                started = self.replying(request, self.start_process)
                if started is not None:
                    rest = functools.partial(self.finish_process, *started)
                    threading.Thread(target=self.handle, args=(request, rest), daemon=True).start()
                continue
            threading.Thread(target=self.handle, args=(request,), daemon=True).start()
        os._exit(0)  # the host went away

    def handle(self, request: dict[str, Any], op: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None
               ) -> None:
        """Run `op` (default: the request's op_ method) and send its reply, the request's last."""
        reply = self.replying(request, op or getattr(self, "op_" + request["op"]))
        if reply is not None:
            self.send({**reply, "id": request["id"], "done": True})

    def replying(self, request: dict[str, Any], op: Callable[[int, dict[str, Any]], T]) -> T | None:
        """op's answer to the request; None once its failure was sent as the request's last reply."""
        try:
            return op(request["id"], request)
        except OSError as e:
            error = {"kind": _os_error_kind(e), "message": f"{e.strerror}: {e.filename or ''}".strip()}
        except Exception as e:  # noqa: BLE001 - any failure of a request is reported to the host
            error = {"kind": "internal", "message": f"{type(e).__name__}: {e}"}
        self.send({"error": error, "id": request["id"], "done": True})
        return None

    # -- processes ------------------------------------------------------------------

    def start_process(self, rid: int, req: dict[str, Any]
                      ) -> tuple[subprocess.Popen[bytes], list[threading.Thread]]:
        """exec, up to its output flowing: the process and its output's pumps."""
        env = dict(os.environ)
        env.update(req.get("envs") or {})
        cwd = resolve(req.get("cwd") or os.environ.get("HOME", "/tmp"))
        stdin = subprocess.PIPE if req.get("stdin") else subprocess.DEVNULL
        proc = subprocess.Popen([req["cmd"], *req.get("args", [])], cwd=cwd, env=env, stdin=stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.procs[proc.pid] = proc
        self.configs[proc.pid] = {"cmd": req["cmd"], "args": req.get("args", []), "envs": req.get("envs") or {},
                                  "cwd": cwd}
        self.send({"id": rid, "start": proc.pid})
        pumps = [threading.Thread(target=self.pump, args=(rid, stream, name), daemon=True)
                 for stream, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))]
        for pump in pumps:
            pump.start()
        return proc, pumps

    def finish_process(self, proc: subprocess.Popen[bytes], pumps: list[threading.Thread], rid: int,
                       req: dict[str, Any]) -> dict[str, Any]:
        """exec, the rest: its end, once all its output was sent."""
        code = proc.wait()
        for pump in pumps:
            pump.join()
        self.procs.pop(proc.pid, None)
        self.configs.pop(proc.pid, None)
        if code < 0:
            return {"end": {"exit_code": -1, "status": f"signal: {signal.Signals(-code).name.lower()}",
                            "exited": False}}
        return {"end": {"exit_code": code, "status": f"exit status {code}", "exited": True}}

    def pump(self, rid: int, stream: Any, name: str) -> None:
        while chunk := stream.read1(1 << 16):
            self.send({"id": rid, name: base64.b64encode(chunk).decode()})

    def process(self, pid: int) -> subprocess.Popen[bytes]:
        proc = self.procs.get(pid)
        if proc is None:
            raise ProcessLookupError(3, "No such process", str(pid))
        return proc

    def op_signal(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        os.killpg(self.process(req["pid"]).pid, req.get("signal", signal.SIGKILL))
        return {}

    def op_input(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        stdin = self.process(req["pid"]).stdin
        if stdin is None:
            return {"error": {"kind": "invalid", "message": f"process {req['pid']} was started without stdin"}}
        stdin.write(base64.b64decode(req["data"]))
        stdin.flush()
        return {}

    def op_close_stdin(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        stdin = self.process(req["pid"]).stdin
        if stdin is not None:
            stdin.close()
        return {}

    def op_ps(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        return {"processes": [{"pid": pid, **config} for pid, config in list(self.configs.items())]}

    def op_env(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        """The sandbox's envVars, given when it was handed out: every command started from now has them."""
        os.environ.update({str(k): str(v) for k, v in req["envs"].items()})
        return {}

    # -- files ----------------------------------------------------------------------

    def op_read(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        with open(resolve(req["path"]), "rb") as f:
            data = f.read(req["max_bytes"] + 1)
        if len(data) > req["max_bytes"]:
            return {"error": {"kind": "too_large", "message": f"{req['path']} is larger than {req['max_bytes']} "
                              "bytes: read it in parts with a command"}}
        return {"data": base64.b64encode(data).decode()}

    def op_write(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        path = resolve(req["path"])
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(req["data"]))
        return {"entry": entry(path)}

    def op_list(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        root = resolve(req["path"])
        if not stat.S_ISDIR(os.stat(root).st_mode):
            raise NotADirectoryError(20, "Not a directory", root)
        found: list[dict[str, Any]] = []
        level = [root]
        for _ in range(max(int(req.get("depth") or 1), 1)):
            deeper = []
            for directory in level:
                for name in sorted(os.listdir(directory)):
                    path = os.path.join(directory, name)
                    found.append(entry(path))
                    if os.path.isdir(path) and not os.path.islink(path):
                        deeper.append(path)
            level = deeper
        return {"entries": found}

    def op_stat(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        return {"entry": entry(resolve(req["path"]))}

    def op_mkdir(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        path = resolve(req["path"])
        os.makedirs(path)
        return {"entry": entry(path)}

    def op_remove(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        path = resolve(req["path"])
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        return {}

    def op_move(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        destination = resolve(req["destination"])
        os.rename(resolve(req["source"]), destination)
        return {"entry": entry(destination)}

    # -- snapshots ------------------------------------------------------------------------

    def op_snapshot(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        """Copy the writable tree ($HOME) into $MEMOPLANE_OUT, emptied first, for the host to
        collect as it collects a job's outputs (and refuse there what a job may not leave)."""
        self.op_snapshot_taken(rid, req)
        home = os.environ.get("HOME", "/tmp")
        copy_tree(home, os.environ["MEMOPLANE_OUT"], os.lstat(home).st_dev)
        return {}

    def op_snapshot_taken(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        """Empty $MEMOPLANE_OUT: the host has the snapshot (its copy holds the sandbox's memory)."""
        out = os.environ["MEMOPLANE_OUT"]
        for name in os.listdir(out):
            remove_entry(os.path.join(out, name))
        return {}

    def op_restore(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        """Copy a snapshot the host restored under $MEMOPLANE_IN into $HOME."""
        src = os.path.join(os.environ["MEMOPLANE_IN"], str(req["name"]))
        home = os.environ.get("HOME", "/tmp")
        copy_tree(src, home, os.lstat(src).st_dev)
        return {}

    # -- code cells (state kept between them) -------------------------------------------

    def op_code(self, rid: int, req: dict[str, Any]) -> dict[str, Any]:
        with self.code_lock:
            return self.run_cell(rid, req["code"])

    def run_cell(self, rid: int, source: str) -> dict[str, Any]:
        """Run a cell in the session's namespace; its prints reach the host as they happen, and
        a last expression is its result (as in a notebook)."""
        import ast

        result: Any = None
        out, err = CellStream(self, rid, "cell_stdout"), CellStream(self, rid, "cell_stderr")
        try:
            tree = ast.parse(source, "<cell>", "exec")
            last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            if last is not None:
                tree.body.pop()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                exec(compile(tree, "<cell>", "exec"), self.namespace)  # noqa: S102 - the sandbox's own code, in it
                if isinstance(last, ast.Expr):
                    expression = ast.Expression(last.value)
                    result = eval(compile(expression, "<cell>", "eval"), self.namespace)  # noqa: S307 - likewise
        except BaseException as e:  # noqa: BLE001 - a cell's failure (SystemExit too) is its result
            return {"exception": {"name": type(e).__name__, "value": str(e),
                                  "traceback": "".join(traceback.format_exception(e))}}
        finally:
            out.end()
            err.end()
        return {"result": None if result is None else repr(result)}


class CellStream(io.TextIOBase):
    """A cell's stdout or stderr: sent to the host line by line as the cell runs, the rest when
    it ends; nothing after (a thread the cell left behind prints nowhere)."""

    def __init__(self, agent: Agent, rid: int, name: str) -> None:
        self.agent, self.rid, self.name = agent, rid, name
        self.pending = ""
        self.ended = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not self.ended:
            self.pending += text
            if "\n" in self.pending:
                cut = self.pending.rindex("\n") + 1
                self.send(self.pending[:cut])
                self.pending = self.pending[cut:]
        return len(text)

    def end(self) -> None:
        self.send(self.pending)
        self.ended = True

    def send(self, text: str) -> None:
        if text:
            self.agent.send({"id": self.rid, self.name: text})


def copy_tree(src: str, dst: str, device: int) -> None:
    """Copy src's entries into dst: files with their exec bit, links as links; what another
    mount laid over the tree (the runtime's read-only view) is not the sandbox's and is skipped."""
    for name in sorted(os.listdir(src)):
        source, target = os.path.join(src, name), os.path.join(dst, name)
        info = os.lstat(source)
        if info.st_dev != device:
            continue
        if stat.S_ISDIR(info.st_mode):
            os.makedirs(target, exist_ok=True)
            copy_tree(source, target, device)
        elif stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(source), target)
        elif stat.S_ISREG(info.st_mode):
            shutil.copyfile(source, target, follow_symlinks=False)
            os.chmod(target, 0o755 if info.st_mode & stat.S_IXUSR else 0o644)
        else:
            raise OSError(22, "not a regular file, directory or link: a snapshot cannot keep it", source)


def remove_entry(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def resolve(path: str) -> str:
    """A path as envd resolves it: relative to the user's home."""
    return path if path.startswith("/") else os.path.join(os.environ.get("HOME", "/tmp"), path)


def entry(path: str) -> dict[str, Any]:
    info = os.lstat(path)
    kind = "dir" if stat.S_ISDIR(info.st_mode) else "symlink" if stat.S_ISLNK(info.st_mode) else "file"
    return {"name": os.path.basename(path) or path, "path": path, "type": kind, "size": info.st_size,
            "mode": stat.S_IMODE(info.st_mode), "permissions": stat.filemode(info.st_mode),
            "mtime": info.st_mtime, "symlink_target": os.readlink(path) if kind == "symlink" else None}


def _os_error_kind(e: OSError) -> str:
    if isinstance(e, (FileNotFoundError, ProcessLookupError)):
        return "not_found"
    if isinstance(e, FileExistsError):
        return "exists"
    if isinstance(e, PermissionError) or e.errno == 30:  # EROFS: outside the writable tree
        return "permission"
    return "invalid"


def main() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.path.join(os.environ["MEMOPLANE_IN"], SOCKET_NAME))
    sys.stdin.close()
    Agent(sock).serve()
