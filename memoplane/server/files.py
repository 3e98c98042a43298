"""envd's /files: a file's bytes down, one or more files up (multipart or octet-stream)."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from .errors import ApiError
from .sessions import MAX_FILE_BYTES, Session, decode


async def read_file(session: Session, path: str) -> bytes:
    return decode(await session.call("read", path=path, max_bytes=MAX_FILE_BYTES), "data")


async def write_files(session: Session, request: Request) -> list[dict[str, Any]]:
    path = request.query_params.get("path")
    if request.headers.get("content-encoding"):
        raise ApiError(400, "compressed uploads are not supported yet", "upload without gzip")
    if request.headers.get("content-type", "").startswith("application/octet-stream"):
        if not path:
            raise ApiError(400, "an octet-stream upload needs ?path=", "give the file's path in the query")
        return [await _write(session, path, await _bounded(request))]
    written = []
    async with request.form(max_part_size=MAX_FILE_BYTES) as form:
        for _, part in form.multi_items():
            if not isinstance(part, UploadFile):
                continue
            target = path if path and len(form) == 1 else part.filename
            if not target:
                raise ApiError(400, "an uploaded file has no path", "name each part with its path")
            written.append(await _write(session, target, await part.read()))
    return written


async def _bounded(request: Request) -> bytes:
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_FILE_BYTES:
            raise ApiError(413, f"the file is larger than {MAX_FILE_BYTES} bytes",
                           "write large data from a command in the sandbox")
    return bytes(data)


async def _write(session: Session, path: str, data: bytes) -> dict[str, Any]:
    entry = (await session.call("write", path=path, data=base64.b64encode(data).decode()))["entry"]
    return {"name": entry["name"], "type": entry["type"], "path": entry["path"]}
