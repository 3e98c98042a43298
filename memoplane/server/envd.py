"""E2B's in-sandbox API (envd), served for every session by the API process itself.

The SDK reaches it at its sandbox URL with the headers E2b-Sandbox-Id / E2b-Sandbox-Port: the
process and filesystem services speak Connect RPC (protobuf or JSON, unary and server
streaming), served here by the `connectrpc` runtime over the service definitions E2B's own SDK
ships (e2b.envd.*: generated from envd's .proto files by protoc-gen-connectrpc-py, so client and
server share one schema); files go over plain HTTP (files.py). Only the subset the SDK's
commands and files use is implemented; the rest answers `unimplemented` with what to use.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from e2b.envd.filesystem import filesystem_pb
from e2b.envd.filesystem.filesystem_connect import Filesystem, FilesystemASGIApplication
from e2b.envd.process import process_pb
from e2b.envd.process.process_connect import Process, ProcessASGIApplication
from protobuf import Oneof
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from .auth import SANDBOX_HEADER, Caller, current_caller
from .errors import ApiError
from .sessions import Session, SessionManager, decode

_CODES = {400: Code.INVALID_ARGUMENT, 403: Code.PERMISSION_DENIED, 404: Code.NOT_FOUND,
          409: Code.ALREADY_EXISTS, 429: Code.RESOURCE_EXHAUSTED, 502: Code.UNAVAILABLE}


def session_of(sessions: SessionManager, caller: Caller, headers: Mapping[str, str]) -> Session:
    sandbox_id = headers.get(SANDBOX_HEADER)
    if not sandbox_id:
        raise ApiError(400, "the E2b-Sandbox-Id header is missing",
                       "set the SDK's sandbox_url to this server: it sends the header itself")
    return sessions.get(caller, sandbox_id)


def connect_error(e: ApiError) -> ConnectError:
    return ConnectError(_CODES.get(e.status, Code.INTERNAL), e.message)


class _Service:
    def __init__(self, sessions: SessionManager) -> None:
        self.sessions = sessions

    def session(self, ctx: RequestContext[Any, Any]) -> Session:
        headers = {k.lower(): v for k, v in ctx.request_headers.items()}
        try:
            return session_of(self.sessions, current_caller.get(), headers)
        except ApiError as e:
            raise connect_error(e) from None

    async def call(self, ctx: RequestContext[Any, Any], op: str, **fields: Any) -> dict[str, Any]:
        try:
            return await self.session(ctx).call(op, **fields)
        except ApiError as e:
            raise connect_error(e) from None


class ProcessService(_Service, Process):  # the rest: Process's own `unimplemented`
    """process.Process: Start (streamed output and exit code), List, SendInput, CloseStdin and
    SendSignal (commands.run/list/send_stdin/close_stdin/kill); Connect (re-attach), Update,
    StreamInput and PTYs are not served yet."""

    async def start(self, request: process_pb.StartRequest,
                    ctx: RequestContext[process_pb.StartRequest, process_pb.StartResponse]
                    ) -> AsyncIterator[process_pb.StartResponse]:
        if request.has_field("pty"):
            raise ConnectError(Code.UNIMPLEMENTED, "a PTY is not supported yet: use commands.run")
        config = request.process or process_pb.ProcessConfig()
        # envd's default for an old client that does not say: stdin open.
        stdin = request.stdin if request.has_field("stdin") else True
        fields = {"cmd": config.cmd, "args": list(config.args), "envs": dict(config.envs),
                  "cwd": config.cwd if config.has_field("cwd") else None, "stdin": stdin}
        session = self.session(ctx)
        try:
            async for reply in session.request("exec", **fields):
                yield process_pb.StartResponse(event=_process_event(reply))
        except ApiError as e:
            raise connect_error(e) from None

    async def list(self, request: process_pb.ListRequest,
                   ctx: RequestContext[process_pb.ListRequest, process_pb.ListResponse]) -> process_pb.ListResponse:
        reply = await self.call(ctx, "ps")
        return process_pb.ListResponse(processes=[
            process_pb.ProcessInfo(pid=p["pid"], config=process_pb.ProcessConfig(
                cmd=p["cmd"], args=list(p["args"]), envs=dict(p["envs"]), cwd=p["cwd"]))
            for p in reply["processes"]])

    async def send_input(self, request: process_pb.SendInputRequest,
                         ctx: RequestContext[process_pb.SendInputRequest, process_pb.SendInputResponse]
                         ) -> process_pb.SendInputResponse:
        data = request.input.input if request.input is not None else None
        if not isinstance(data, Oneof) or data.field != "stdin":
            raise ConnectError(Code.UNIMPLEMENTED, "only stdin input is supported (no PTY yet)")
        await self.call(ctx, "input", pid=_pid(request.process), data=base64.b64encode(data.value).decode())
        return process_pb.SendInputResponse()

    async def close_stdin(self, request: process_pb.CloseStdinRequest,
                          ctx: RequestContext[process_pb.CloseStdinRequest, process_pb.CloseStdinResponse]
                          ) -> process_pb.CloseStdinResponse:
        await self.call(ctx, "close_stdin", pid=_pid(request.process))
        return process_pb.CloseStdinResponse()

    async def send_signal(self, request: process_pb.SendSignalRequest,
                          ctx: RequestContext[process_pb.SendSignalRequest, process_pb.SendSignalResponse]
                          ) -> process_pb.SendSignalResponse:
        pid = _pid(request.process)
        signals = {process_pb.Signal.SIGKILL: 9, process_pb.Signal.SIGTERM: 15}
        number = signals.get(request.signal)
        if number is None:
            raise ConnectError(Code.INVALID_ARGUMENT, f"signal {request.signal} is not supported: send SIGKILL "
                               "or SIGTERM")
        await self.call(ctx, "signal", pid=pid, signal=number)
        return process_pb.SendSignalResponse()


def _pid(selector: process_pb.ProcessSelector | None) -> int:
    chosen = selector.selector if selector is not None else None
    if not isinstance(chosen, Oneof) or chosen.field != "pid":
        raise ConnectError(Code.UNIMPLEMENTED, "only a process selected by pid is supported (not by tag)")
    return int(chosen.value)


def _process_event(reply: dict[str, Any]) -> process_pb.ProcessEvent:
    event = process_pb.ProcessEvent
    if "start" in reply:
        return event(event=Oneof[Literal["start"], process_pb.ProcessEvent.StartEvent]("start", event.StartEvent(pid=reply["start"])))
    if "stdout" in reply:
        data = event.DataEvent(output=Oneof[Literal["stdout"], bytes]("stdout", decode(reply, "stdout")))
    elif "stderr" in reply:
        data = event.DataEvent(output=Oneof[Literal["stderr"], bytes]("stderr", decode(reply, "stderr")))
    else:
        end = reply["end"]
        finished = event.EndEvent(exit_code=end["exit_code"], exited=end["exited"], status=end["status"])
        if not end["exited"]:
            finished.error = end["status"]  # what the SDK reports for a killed command
        return event(event=Oneof[Literal["end"], process_pb.ProcessEvent.EndEvent]("end", finished))
    return event(event=Oneof[Literal["data"], process_pb.ProcessEvent.DataEvent]("data", data))


class FilesystemService(_Service, Filesystem):
    """filesystem.Filesystem: Stat, ListDir, MakeDir, Move, Remove (files.list, exists, ...)."""

    async def stat(self, request: filesystem_pb.StatRequest,
                   ctx: RequestContext[filesystem_pb.StatRequest, filesystem_pb.StatResponse]
                   ) -> filesystem_pb.StatResponse:
        reply = await self.call(ctx, "stat", path=request.path)
        return filesystem_pb.StatResponse(entry=entry_info(reply["entry"]))

    async def list_dir(self, request: filesystem_pb.ListDirRequest,
                       ctx: RequestContext[filesystem_pb.ListDirRequest, filesystem_pb.ListDirResponse]
                       ) -> filesystem_pb.ListDirResponse:
        reply = await self.call(ctx, "list", path=request.path, depth=request.depth or 1)
        return filesystem_pb.ListDirResponse(entries=[entry_info(e) for e in reply["entries"]])

    async def make_dir(self, request: filesystem_pb.MakeDirRequest,
                       ctx: RequestContext[filesystem_pb.MakeDirRequest, filesystem_pb.MakeDirResponse]
                       ) -> filesystem_pb.MakeDirResponse:
        reply = await self.call(ctx, "mkdir", path=request.path)
        return filesystem_pb.MakeDirResponse(entry=entry_info(reply["entry"]))

    async def move(self, request: filesystem_pb.MoveRequest,
                   ctx: RequestContext[filesystem_pb.MoveRequest, filesystem_pb.MoveResponse]
                   ) -> filesystem_pb.MoveResponse:
        reply = await self.call(ctx, "move", source=request.source, destination=request.destination)
        return filesystem_pb.MoveResponse(entry=entry_info(reply["entry"]))

    async def remove(self, request: filesystem_pb.RemoveRequest,
                     ctx: RequestContext[filesystem_pb.RemoveRequest, filesystem_pb.RemoveResponse]
                     ) -> filesystem_pb.RemoveResponse:
        await self.call(ctx, "remove", path=request.path)
        return filesystem_pb.RemoveResponse()


def entry_info(entry: dict[str, Any]) -> filesystem_pb.EntryInfo:
    kinds = {"file": filesystem_pb.FileType.FILE, "dir": filesystem_pb.FileType.DIRECTORY,
             "symlink": filesystem_pb.FileType.SYMLINK}
    seconds = float(entry["mtime"])
    info = filesystem_pb.EntryInfo(
        name=entry["name"], type=kinds[entry["type"]], path=entry["path"], size=entry["size"],
        mode=entry["mode"], permissions=entry["permissions"], owner="user", group="user",
        modified_time=Timestamp(seconds=int(seconds), nanos=int((seconds % 1) * 1e9)),
        is_symlink=entry["type"] == "symlink")
    if entry.get("symlink_target") is not None:
        info.symlink_target = entry["symlink_target"]
    return info


def connect_apps(sessions: SessionManager) -> dict[str, Any]:
    """The ASGI apps of the two Connect services, by their path prefix."""
    return {
        "/process.Process/": ProcessASGIApplication(ProcessService(sessions)),
        "/filesystem.Filesystem/": FilesystemASGIApplication(FilesystemService(sessions)),
    }
