"""A fake OpenAI-compatible chat endpoint on 127.0.0.1 for the backend, interpret and steer-judge tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

Respond = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class FakeEndpoint:
    """What the server saw and how it misbehaves: the first ``fail_first`` requests get HTTP ``status``."""

    url: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)  # {"body": request JSON, "auth": Authorization}
    fail_first: int = 0
    status: int = 500


@contextmanager
def serve(respond: Respond) -> Iterator[FakeEndpoint]:
    """Serve ``respond(request body) -> response JSON`` at ``FakeEndpoint.url`` (``.../v1``) until exit."""
    state = FakeEndpoint()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.calls.append({"body": body, "auth": self.headers.get("Authorization")})
            if state.fail_first > 0:
                state.fail_first -= 1
                self.send_response(state.status)
                self.end_headers()
                return
            data = json.dumps(respond(body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        yield state
    finally:
        srv.shutdown()
        srv.server_close()
