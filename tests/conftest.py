"""Shared fixtures: the offline data under ``shared/``, one tiny training run, a tiny HTTP server.

Nothing here sets ``TIKTOKEN_CACHE_DIR``: the GPT-2 BPE files ship inside the package.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# One tiny, quiet run: gpt2-tiny (random weights) on a few batches of every split (debug=limit:
# 3 train, 2 validation, 2 test batches, one epoch, the chapter monitor every step).
TINY_RUN = [
    "model=gpt2-tiny",
    "debug=limit",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def shared_dir() -> Path:
    """``$SPAM_SHARED_DIR``, else ``<repo>/../shared`` (where CI and dev machines keep it)."""
    return Path(os.environ.get("SPAM_SHARED_DIR", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def sms_file() -> Path:
    """The real UCI ``SMSSpamCollection`` (477,907 bytes): the shared copy beside the checkout
    where there is one (CI, dev machines), else the identical copy bundled in the package, so a
    plain `pytest` in a fresh clone needs nothing beside it."""
    from spam_lightning.data.source import BUNDLED_PATH

    path = shared_dir() / "data" / "SMSSpamCollection"
    return path if path.is_file() else BUNDLED_PATH


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``paths.data_dir`` shared by the tiny runs, so the SMS splits are prepared once."""
    return tmp_path_factory.mktemp("tiny-data")


@pytest.fixture
def tiny_run(
    tmp_path: Path, sms_file: Path, tiny_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[Any, dict[str, Any], Path]]:
    """``tiny_run(*overrides)`` -> (config, metrics, run folder): ``TINY_RUN`` plus the overrides
    on the real SMS file, composed from the package's configs and trained in-process. Each run
    gets ``tmp_path/run``, or ``run-2``, ``run-3``, … once that holds a run (a folder holding a
    run is only resumed): a resume (``ckpt_path=…``) stays in ``run``."""
    from _compose import compose_train
    from omegaconf import open_dict

    from spam_lightning.train import train
    from spam_lightning.training.run_lock import held_run

    def run(*overrides: str) -> tuple[Any, dict[str, Any], Path]:
        data = [f"data.source={sms_file}", f"paths.data_dir={tiny_data_dir}"]
        cfg = compose_train([*TINY_RUN, *data, *overrides], tmp_path)
        folder, n = Path(cfg.paths.output_dir), 1
        while held_run(folder) and not any(o.startswith("ckpt_path=") for o in overrides):
            n += 1
            folder = tmp_path / f"run-{n}"
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder)
        for key, value in (cfg.hydra.job.env_set or {}).items():  # as Hydra's run_job sets them
            monkeypatch.setenv(key, str(value))
        metrics = train(cfg)
        return cfg, metrics, Path(cfg.paths.output_dir)

    return run


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


@contextlib.contextmanager
def uvicorn_server(app: Any) -> Iterator[str]:
    """``app`` served by a real uvicorn on a free loopback port in a background thread -> its URL."""
    import socket
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
