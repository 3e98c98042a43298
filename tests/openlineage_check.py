"""OpenLineage in tests: an HTTP endpoint on loopback that keeps the events it receives, and the
check each event passes: the structure the OpenLineage RunEvent schema (spec 2-0-2) requires for
the parts memoplane sends (required fields, eventType, uuid/date-time/uri formats, facets' _producer
and _schemaURL), written from the spec, and the memoplane run facet's fields."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import jsonschema

FACET = {"type": "object", "required": ["_producer", "_schemaURL"],
         "properties": {"_producer": {"type": "string", "format": "uri"},
                        "_schemaURL": {"type": "string", "format": "uri"}}}
DATASET = {"type": "object", "required": ["namespace", "name"],
           "properties": {"namespace": {"type": "string"}, "name": {"type": "string"}}}
SCHEMA = {  # OpenLineage 2-0-2 RunEvent: required fields, eventType, formats (uuid, date-time, uri)
    "type": "object", "required": ["eventTime", "producer", "schemaURL", "run", "job"],
    "properties": {
        "eventType": {"enum": ["START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"]},
        "eventTime": {"type": "string", "format": "date-time"},
        "producer": {"type": "string", "format": "uri"},
        "schemaURL": {"type": "string", "format": "uri"},
        "run": {"type": "object", "required": ["runId"],
                "properties": {"runId": {"type": "string", "format": "uuid"},
                               "facets": {"type": "object", "additionalProperties": FACET}}},
        "job": {"type": "object", "required": ["namespace", "name"],
                "properties": {"namespace": {"type": "string"}, "name": {"type": "string"}}},
        "inputs": {"type": "array", "items": DATASET},
        "outputs": {"type": "array", "items": DATASET},
    },
}
MEMOPLANE_FACET = {"type": "object", "required": ["cacheKey", "cached", "computeSecondsSaved", "runId"]}  # resultDigest: once there is one


def valid(event: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(
        event)
    jsonschema.validate(event["run"]["facets"]["memoplane"], MEMOPLANE_FACET)


class LineageReceiver:
    """An OpenLineage endpoint on loopback that keeps what it receives."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        received, lock = self.events, threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with lock:
                    received.append(json.loads(body))
                self.send_response(201)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
