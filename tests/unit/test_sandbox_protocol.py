"""Protocol frames: the prebuilt JSON encoder and scanner agree with json, and
a hostile peer's malformed header is a ProtocolError, never another exception."""

from __future__ import annotations

import json
from typing import Any

import pytest

from memoplane.sandbox import protocol
from memoplane.sandbox.runner import _dumps_value


@pytest.mark.parametrize("value", [{}, {"op": "run", "task": {"inputs": {"x": [1, 2.5, None, True]}}},
                                   {"s": "é\u2028\"\\\x00", "t": (1, 2), "big": 10**30}])
def test_encoder_and_scanner_agree_with_json(value: dict[str, Any]) -> None:
    text = protocol.dumps(value)
    assert text == json.dumps(value, separators=(",", ":"))
    assert protocol._parse(text.encode()) == json.loads(text)
    header, payload = protocol.FrameReader().feed(protocol.encode(value, b"xyz"))[0]
    assert (header, payload) == (json.loads(text), b"xyz")


@pytest.mark.parametrize("value", [[1, float("nan")], {"x": object()}, {"k": {1, 2}}, [1, 2, [3]]])
def test_value_encoding_agrees_with_json(value: Any) -> None:
    try:
        want: Any = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        want = (type(e), str(e))
    try:
        got: Any = _dumps_value(value)
    except (TypeError, ValueError) as e:
        got = (type(e), str(e))
    assert got == want
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular"):
        _dumps_value(loop)


@pytest.mark.parametrize("body", [b"", b" {}", b"{} x", b"{", b"\xff", b"[1]", b"[" * 100_000,
                                  b'{"a":' * 100_000])
def test_malformed_headers_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol._parse(body)
