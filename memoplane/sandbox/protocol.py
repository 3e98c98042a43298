"""Messages between the pool, the zygote and the children.

A frame is `u32 header length, u32 payload length, JSON header, payload`.
Frames from a child are untrusted: sizes are capped and only JSON is parsed
(never pickle), so a hostile job can at worst send a wrong answer about itself.
"""

from __future__ import annotations

import json
import json.encoder
import json.scanner
import os
import socket
import struct
from typing import Any

_HEAD = struct.Struct("!II")
MAX_HEADER = 64 << 20      # a request's JSON inputs travel in the header
MAX_PAYLOAD = 1 << 20      # bigger return values go through a file in out_dir


class ProtocolError(Exception):
    """A peer sent a frame that does not follow this protocol."""


def _not_serialisable(o: object) -> Any:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


# json.dumps(header, separators=(",", ":")) without the Python layers that
# build a new encoder on every call: made once (in the zygote, before it
# forks), it saves a child ~20 copy-on-write faults per message. No circular
# reference check: a self-containing value fails with RecursionError.
_ENCODER = json.encoder.c_make_encoder and json.encoder.c_make_encoder(  # type: ignore[attr-defined]
    None, _not_serialisable, json.encoder.encode_basestring_ascii, None, ":", ",",
    False, False, True)


def dumps(header: dict[str, Any]) -> str:
    if _ENCODER:
        return "".join(_ENCODER(header, 0))
    return json.dumps(header, separators=(",", ":"))


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    body = dumps(header).encode()
    return _HEAD.pack(len(body), len(payload)) + body + payload


def send(sock: socket.socket, header: dict[str, Any], payload: bytes = b"",
         fds: list[int] | None = None) -> None:
    data = encode(header, payload)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the channel")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """Blocking read of one frame from a stream socket."""
    hlen, plen = _HEAD.unpack(_recv_exact(sock, _HEAD.size))
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
        raise ProtocolError(f"frame too large ({hlen}+{plen} bytes)")
    return _parse(_recv_exact(sock, hlen)), _recv_exact(sock, plen) if plen else b""


def recv_stream_with_fds(sock: socket.socket, maxfds: int = 4
                         ) -> tuple[dict[str, Any], bytes, list[int]]:
    """Blocking read of one frame, and the fds sent with its first byte."""
    data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, maxfds)
    try:
        if not data:
            raise EOFError("peer closed the channel")
        if len(data) < _HEAD.size:
            data += _recv_exact(sock, _HEAD.size - len(data))
        hlen, plen = _HEAD.unpack_from(data)
        if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
            raise ProtocolError(f"frame too large ({hlen}+{plen} bytes)")
        need = _HEAD.size + hlen + plen - len(data)
        if need > 0:
            data += _recv_exact(sock, need)
        body = data[_HEAD.size:]
        return _parse(body[:hlen]), body[hlen:hlen + plen], fds
    except BaseException:
        close_quietly(*fds)  # a bad frame's descriptors are nobody's
        raise


def recv_with_fds(sock: socket.socket, maxfds: int = 8) -> tuple[dict[str, Any], list[int]]:
    """One small frame and its file descriptors from a SEQPACKET socket."""
    data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, maxfds)
    try:
        if not data:
            raise EOFError("peer closed the channel")
        if len(data) < _HEAD.size or len(data) < _HEAD.size + _HEAD.unpack_from(data)[0]:
            raise ProtocolError(f"short frame ({len(data)} bytes)")
        hlen, _plen = _HEAD.unpack_from(data)
        return _parse(data[_HEAD.size:_HEAD.size + hlen]), fds
    except BaseException:
        close_quietly(*fds)
        raise


# json.loads through the C scanner directly (made once, by the zygote): the
# Python layers (encoding detection, a regular expression) cost a child ~20
# copy-on-write faults per message. Strict: no whitespace around the value.
_SCAN = json.scanner.c_make_scanner and json.scanner.c_make_scanner(  # type: ignore[attr-defined]
    json.JSONDecoder())


def _parse(body: bytes) -> dict[str, Any]:
    try:
        if _SCAN:
            text = body.decode()
            header, end = _SCAN(text, 0)
            if end != len(text):
                raise ValueError(f"extra data at {end}")
        else:
            header = json.loads(body)
    except StopIteration:
        raise ProtocolError("bad JSON header: no value") from None
    except (ValueError, RecursionError) as e:  # a hostile child may nest deeply
        raise ProtocolError(f"bad JSON header: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not an object")
    return header


class FrameReader:
    """Incremental, size-capped frame parser for a non-blocking reader."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        self._buf += data
        frames = []
        while len(self._buf) >= _HEAD.size:
            hlen, plen = _HEAD.unpack_from(self._buf)
            if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
                raise ProtocolError(f"frame too large ({hlen}+{plen} bytes)")
            end = _HEAD.size + hlen + plen
            if len(self._buf) < end:
                break
            header = _parse(bytes(self._buf[_HEAD.size:_HEAD.size + hlen]))
            frames.append((header, bytes(self._buf[_HEAD.size + hlen:end])))
            del self._buf[:end]
        return frames


def close_quietly(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
