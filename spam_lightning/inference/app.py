"""The FastAPI app of ``spam-serve`` (``serve.py`` has the command line and the request checks):
this module needs the ``serve`` extra (fastapi, uvicorn)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.middleware.trustedhost import TrustedHostMiddleware

from spam_lightning.inference.serve import (
    DEFAULT_HOST,
    DEFAULT_MAX_TOTAL_CHARS,
    DEFAULT_PORT,
    DEFAULT_READ_TIMEOUT,
    KEEP_ALIVE_TIMEOUT,
    LOOPBACK_HOSTS,
    MAX_HEADER_BYTES,
    PAGE_CSP,
    BadRequest,
    body_limit,
    host_problems,
    parse_request,
    render_page,
)


class ClassifyRequest(BaseModel):
    """Exactly one of ``text`` or ``texts``: the schema ``/openapi.json`` documents. Bodies are
    checked by ``parse_request``, which stops at the first problem and never echoes the input."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    texts: list[str] | None = None


class PredictionOut(BaseModel):
    label: str
    probability: float
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    predictions: list[PredictionOut]


def create_app(run_dir: str | Path, precision: str = "32", max_chars: int = 10_000,
               max_batch: int = 64, device: str = "cpu",
               max_total_chars: int = DEFAULT_MAX_TOTAL_CHARS,
               allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
               read_timeout: float = DEFAULT_READ_TIMEOUT, threshold: float | None = None,
               raw: bool = False) -> FastAPI:
    """The demo app for a run folder; raises ``BundleError``/``ValueError`` for a bad run or option.
    It answers requests whose ``Host`` is one of ``allowed_hosts`` (``*``: any), others get 400.
    ``threshold``, ``raw``: as ``Classifier``'s (default: the run's operating point)."""
    if min(max_chars, max_batch, max_total_chars) < 1:
        raise ValueError(f"--max-chars, --max-batch and --max-total-chars must be >= 1, got {max_chars}, "
                         f"{max_batch} and {max_total_chars}")
    if not read_timeout > 0:
        raise ValueError(f"--read-timeout must be > 0 seconds, got {read_timeout}")
    problems = host_problems(allowed_hosts) or ([] if allowed_hosts else ["no --allowed-hosts"])
    if problems:
        raise ValueError("; ".join(problems))
    from spam_lightning.inference.classify import Classifier  # torch: after --help, not at import

    clf = Classifier(run_dir, device=device, precision=precision, batch_size=max_batch,
                     threshold=threshold, raw=raw)
    lock = threading.Lock()
    page = render_page(clf.class_names, clf.max_length, max_chars, clf.threshold)
    health: dict[str, Any] = {  # no paths: what is on this machine is not the API's to tell
        "status": "ok", "class_names": clf.class_names, "max_length": clf.max_length,
        "token": clf.token, "padding": clf.padding, "precision": precision, "device": str(clf.device),
        "kind": clf.kind, "model": clf.predictor.describe(),
        # the operating point applied: temperature (1: raw probabilities), threshold on P(class 1)
        # (null: the argmax)
        "temperature": clf.temperature, "threshold": clf.threshold,
        "max_chars": max_chars, "max_batch": max_batch, "max_total_chars": max_total_chars,
        "read_timeout": read_timeout,
    }
    # no Swagger/ReDoc pages: they load assets from a CDN; /openapi.json stays
    app = FastAPI(title="spam-lightning demo", summary="Classify SMS messages with a fine-tuned GPT-2.",
                  docs_url=None, redoc_url=None)
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 still sends Host: evil.example
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)
    max_bytes = body_limit(max_chars, max_batch, max_total_chars)
    app.state.classifier = clf

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    app.get("/api/health", summary="The loaded model and the request limits.")(lambda: health)

    def classify(body: bytes) -> ClassifyResponse:
        texts = parse_request(body, max_batch, max_chars, max_total_chars)
        try:
            with lock:  # one forward pass at a time: safe and exact under concurrent requests
                preds = clf.predict(texts)
        except (ValueError, TypeError) as err:
            raise BadRequest(422, str(err)) from err
        return ClassifyResponse(predictions=[PredictionOut(**asdict(p)) for p in preds])

    @app.post("/api/classify", response_model=ClassifyResponse, responses={
        413: {"description": "too many or too long messages"}, 415: {"description": "the body is not JSON"},
        422: {"description": "not a request of this API, or an empty message"},
    }, openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": ClassifyRequest.model_json_schema()}}}})
    async def api_classify(request: Request) -> Any:
        """Label, its probability and every class's probability, one per message, in order."""
        too_large = BadRequest(413, f"request body is larger than {max_bytes:,} bytes").response()
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes:  # refused before it is read
            return too_large
        async def read() -> bytes | None:
            body = b""
            async for chunk in request.stream():  # bounds chunked bodies without Content-Length too
                if len(body := body + chunk) > max_bytes:
                    return None
            return body

        try:  # a body that trickles in holds a connection for read_timeout seconds at most
            body = await asyncio.wait_for(read(), read_timeout)
        except asyncio.TimeoutError:
            late = f"the request body did not arrive within {read_timeout:g} s"
            return JSONResponse({"detail": late}, status_code=408, headers={"Connection": "close"})
        if body is None:
            return too_large
        media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            return BadRequest(415, "send the body as JSON (Content-Type: application/json)").response()
        try:  # parsing and inference in the threadpool: the event loop stays free for others
            return await run_in_threadpool(classify, body)
        except BadRequest as err:
            return err.response()

    return app


def header_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request's headers: uvicorn times out idle
    keep-alive connections but waits forever for headers that trickle in (slowloris)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _watch_headers(self) -> None:
            waiting = self.conn.their_state is h11.IDLE  # a request started, its headers incomplete
            if waiting and self._deadline is None:
                self._deadline = self.loop.call_later(seconds, self._headers_overdue)
            elif not waiting and self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_overdue(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def server_config(app: FastAPI, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                  read_timeout: float = DEFAULT_READ_TIMEOUT, **options: Any) -> Any:
    """The ``uvicorn.Config`` spam-serve runs ``app`` with: keep-alive, header size and the header
    deadline explicit (the body's deadline is the app's)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=header_deadline_protocol(read_timeout),
                          timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, **options)


