"""Fixtures of the generator tests: a real recording HTTP server on 127.0.0.1 that answers like OpenAI."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class RecordedRequest:
    """One request the server received: method, path with query, headers (lower-cased names), JSON body."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class ScriptedResponse:
    """A response to send instead of the default answer: status, JSON body (or raw text), extra headers."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class OpenAILikeServer:
    """A stdlib ThreadingHTTPServer that records every request and answers chat completions.

    By default it answers ``"echo: <user message>"`` (as SSE pieces when the body asks to stream). Responses put
    in ``script`` are sent first, one per request, in order (to test retries and error paths).
    """

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.script: list[ScriptedResponse] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                owner.requests.append(RecordedRequest("POST", self.path, {k.lower(): v for k, v in
                                                                          self.headers.items()}, body))
                if owner.script:
                    scripted = owner.script.pop(0)
                    data = scripted.body if isinstance(scripted.body, (str, bytes)) else json.dumps(scripted.body)
                    data = data.encode() if isinstance(data, str) else data
                    self.send_response(scripted.status)
                    for k, v in scripted.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                text = "echo: " + body["messages"][-1]["content"]
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for i, word in enumerate(text.split(" ")):
                        piece = word if i == 0 else " " + word
                        event = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.close_connection = True
                    return
                data = json.dumps({
                    "id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def openai_like_server():
    """A fresh recording OpenAI-like server per test."""
    server = OpenAILikeServer()
    yield server
    server.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
