"""Shared fixtures: the offline data under ``shared/`` and a tiny local HTTP server.

Nothing here sets ``TIKTOKEN_CACHE_DIR``: the GPT-2 BPE files ship inside the package.
"""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``$SPAM_SHARED_DIR``, else ``<repo>/../shared`` (where CI and dev machines keep it)."""
    return Path(os.environ.get("SPAM_SHARED_DIR", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared fixtures folder (``shared_dir()``), which must exist."""
    path = shared_dir()
    if not path.is_dir():
        pytest.fail(f"{path} is missing: set SPAM_SHARED_DIR to the shared fixtures folder")
    return path


@pytest.fixture(scope="session")
def sms_file() -> Path:
    """The real UCI ``SMSSpamCollection`` (477,907 bytes)."""
    path = shared_dir() / "data" / "SMSSpamCollection"
    if not path.is_file():
        pytest.fail(f"{path} is missing: set SPAM_SHARED_DIR to the shared fixtures folder")
    return path


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, bytes | tuple[int, bytes]] = {}

    def do_GET(self) -> None:
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        if isinstance(route, tuple):  # (claimed Content-Length, body): a cut-off transfer
            length, body = route
        else:
            length, body = len(route), route
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[dict[str, bytes | tuple[int, bytes]]], str]]:
    """``serve({"/path": bytes})`` -> base URL of a server on 127.0.0.1 (no proxy).

    A value ``(n, body)`` claims ``Content-Length: n`` but sends ``body`` (a truncated download).
    """
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(routes: dict[str, bytes | tuple[int, bytes]]) -> str:
        handler = type("Handler", (_Handler,), {"routes": dict(routes)})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()
