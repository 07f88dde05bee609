"""``spam-serve``: ``GET /`` a self-contained demo page, ``POST /api/classify`` classifies
``{"text": ...}`` or ``{"texts": [...]}``, ``GET /api/health`` describes the model. Requests run in
FastAPI's threadpool and a lock serializes inference: each gets the answer it would get alone.
Only requests naming an allowed host are answered (DNS rebinding), and a request's headers and
body each have ``--read-timeout`` seconds to arrive (a trickling client holds nothing for long)."""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import socket
import sys
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

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# the Host header values of a server bound to loopback (an IPv6 host is written in brackets)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
DEFAULT_READ_TIMEOUT = 30.0  # seconds for a request's headers, and again for its body
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle keep-alive connection stays open (uvicorn's default)
MAX_HEADER_BYTES = 16 * 1024  # h11's default limit on a request's headers, made explicit
# characters per request, all messages together: bounds tokenizing and the forward pass
DEFAULT_MAX_TOTAL_CHARS = 100_000
# worst case JSON bytes per character: a non-BMP code point escaped as a surrogate pair "\ud83d\ude00"
JSON_BYTES_PER_CHAR = 12
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


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


class BadRequest(Exception):
    """A request the API refuses: the status and a short message, never the input itself."""

    def __init__(self, status: int, message: str, loc: tuple[str | int, ...] = (), error_type: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.loc, self.error_type = status, message, loc, error_type

    def response(self) -> JSONResponse:
        # with an error type: the shape of FastAPI's validation errors, one entry and no "input"
        errors = [{"type": self.error_type, "loc": ["body", *self.loc], "msg": self.message}]
        detail = errors if self.error_type else self.message
        return JSONResponse({"detail": detail}, status_code=self.status)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def parse_request(body: bytes, max_batch: int, max_chars: int, max_total_chars: int) -> list[str]:
    """The messages of a ``/api/classify`` body, or ``BadRequest`` for the first problem (never
    repeating the input). Cheap checks first: an absurd body costs one ``json.loads``."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise BadRequest(422, "body is nested too deeply to be a request", (), "json_invalid") from None
    except ValueError as err:  # JSONDecodeError, bad UTF-8, an integer of > 4,300 digits
        where = f" at line {err.lineno}, column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise BadRequest(422, f"body is not valid JSON{where}", (), "json_invalid") from None
    if not isinstance(data, dict):
        raise BadRequest(422, f'body is {_type_name(data)}; expected an object {{"text": ...}} or '
                         '{"texts": [...]}', (), "model_type")
    if unknown := [k for k in data if k not in ("text", "texts")]:
        raise BadRequest(422, f'{len(unknown)} unknown field(s); the allowed fields are "text" and '
                         '"texts"', (), "extra_forbidden")
    if ("text" in data) == ("texts" in data) or any(v is None for v in data.values()):
        raise BadRequest(422, 'give exactly one of "text" (a string) or "texts" (a list of strings)',
                         (), "value_error")
    if "text" in data:
        if not isinstance(data["text"], str):
            raise BadRequest(422, f'"text" is {_type_name(data["text"])}; expected a string',
                             ("text",), "string_type")
        texts, field = [data["text"]], "text"
    else:
        texts, field = data["texts"], "texts"
        if not isinstance(texts, list):
            raise BadRequest(422, f'"texts" is {_type_name(texts)}; expected a list of strings',
                             ("texts",), "list_type")
        if not texts:
            raise BadRequest(422, '"texts" is empty; give at least one message')
        if len(texts) > max_batch:
            raise BadRequest(413, f"{len(texts):,} messages in one request; the limit is {max_batch}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise BadRequest(422, f'"texts" item {i} is {_type_name(text)}; expected a string',
                                 ("texts", i), "string_type")
    for i, text in enumerate(texts, 1):
        if len(text) > max_chars:
            raise BadRequest(413, f"message {i} has {len(text):,} characters; the limit is {max_chars:,}")
        if not text.strip():
            raise BadRequest(422, f"message {i} is empty or only whitespace; nothing to classify")
    if (total := sum(map(len, texts))) > max_total_chars:
        raise BadRequest(413, f"{total:,} characters in one request; the limit is {max_total_chars:,} "
                         f"(--max-total-chars); send fewer or shorter {field}")
    return texts


PAGE = Path(__file__).with_name("page.html")  # with {classes}, {length_note} and {max_chars}


def render_page(class_names: list[str], max_length: int | None, max_chars: int) -> str:
    """The demo page with the model's facts filled in; ``max_length`` None: a bag-of-words baseline."""
    note = ("A bag-of-words baseline: every word counts." if max_length is None
            else f"Messages longer than {int(max_length)} tokens are truncated, as in training.")
    return (PAGE.read_text(encoding="utf-8").replace("{classes}", html.escape(", ".join(class_names)))
            .replace("{length_note}", note).replace("{max_chars}", str(int(max_chars))))


def body_limit(max_chars: int, max_batch: int, max_total_chars: int) -> int:
    """The largest body a valid request can need: its characters JSON-escaped, plus framing."""
    chars = min(max_total_chars, max_batch * max_chars)
    return chars * JSON_BYTES_PER_CHAR + max_batch * 16 + 1024


def default_allowed_hosts(host: str) -> list[str]:
    """The ``Host`` names a server bound to ``host`` answers by default: the loopback names for a
    loopback bind, the bound address itself for another, and for a wildcard bind (0.0.0.0, ::) the
    loopback names, this machine's names and their addresses; ``--allowed-hosts`` widens it."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return list(LOOPBACK_HOSTS)
    if host not in WILDCARD_BINDS:
        return [f"[{host}]" if ":" in host else host.lower()]
    names = {socket.gethostname(), socket.getfqdn()}
    found = list(LOOPBACK_HOSTS) + sorted(n.lower() for n in names if n)
    for name in sorted(names):
        try:
            infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        except OSError:  # a name this machine cannot resolve: the others still work
            continue
        found += [f"[{i[4][0]}]" if ":" in i[4][0] else i[4][0] for i in infos]
    return list(dict.fromkeys(found))


def parse_allowed_hosts(option: str) -> list[str]:
    """``--allowed-hosts a.example,::1`` -> ``["a.example", "[::1]"]`` (a ``Host`` header writes
    an IPv6 address in brackets)."""
    hosts = [h.strip().lower() for h in option.split(",")]
    return [f"[{h}]" if h.count(":") > 1 and not h.startswith("[") else h for h in hosts]


def host_problems(hosts: Sequence[str]) -> list[str]:
    """``--allowed-hosts`` entries that are not a name, an address, ``*`` or ``*.domain`` (a port
    never matches: the port is not part of the name compared)."""

    def bad(h: str) -> bool:
        pattern = h != "*" and h.startswith("*")
        port = ":" in (h.rsplit("]", 1)[-1] if h.startswith("[") else h)
        return (not h or h != h.strip() or "*" in h[1:] or (pattern and not h.startswith("*."))
                or port)

    return [f"--allowed-hosts entry {h!r}: use a host name or an address without a port, * (any) "
            "or *.example.com" for h in hosts if bad(h)]


def create_app(run_dir: str | Path, precision: str = "32", max_chars: int = 10_000,
               max_batch: int = 64, device: str = "cpu",
               max_total_chars: int = DEFAULT_MAX_TOTAL_CHARS,
               allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
               read_timeout: float = DEFAULT_READ_TIMEOUT) -> FastAPI:
    """The demo app for a run folder; raises ``BundleError``/``ValueError`` for a bad run or option.
    It answers requests whose ``Host`` is one of ``allowed_hosts`` (``*``: any), others get 400."""
    if min(max_chars, max_batch, max_total_chars) < 1:
        raise ValueError(f"--max-chars, --max-batch and --max-total-chars must be >= 1, got {max_chars}, "
                         f"{max_batch} and {max_total_chars}")
    if not read_timeout > 0:
        raise ValueError(f"--read-timeout must be > 0 seconds, got {read_timeout}")
    problems = host_problems(allowed_hosts) or ([] if allowed_hosts else ["no --allowed-hosts"])
    if problems:
        raise ValueError("; ".join(problems))
    from spam_lightning.inference.classify import Classifier  # torch: after --help, not at import

    clf = Classifier(run_dir, device=device, precision=precision, batch_size=max_batch)
    lock = threading.Lock()
    page = render_page(clf.class_names, clf.max_length, max_chars)
    health: dict[str, Any] = {  # no paths: what is on this machine is not the API's to tell
        "status": "ok", "class_names": clf.class_names, "max_length": clf.max_length,
        "token": clf.token, "padding": clf.padding, "precision": precision, "device": str(clf.device),
        "kind": clf.kind, "model": clf.predictor.describe(),
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spam-serve",
                                description="Serve a web demo and JSON API for a trained spam-lightning run.")
    p.add_argument("run_dir", help="a training run folder (outputs/runs/...) or its bundle/ folder")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind ({DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT})")
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--max-chars", type=int, default=10_000, help="longest message accepted (10000)")
    p.add_argument("--max-batch", type=int, default=64, help="most messages per request (64)")
    p.add_argument("--max-total-chars", type=int, default=DEFAULT_MAX_TOTAL_CHARS,
                   help=f"most characters per request, all messages together ({DEFAULT_MAX_TOTAL_CHARS})")
    p.add_argument("--allowed-hosts", metavar="HOST,...",
                   help="Host header values to answer, comma-separated; * for any, *.example.com "
                   "for a domain (default: the names of the --host address; loopback: 127.0.0.1, "
                   "localhost, [::1])")
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT, metavar="SECONDS",
                   help=f"time a request's headers, and then its body, may take to arrive "
                   f"({DEFAULT_READ_TIMEOUT:g})")
    return p


def main(argv: list[str] | None = None) -> int:
    """``spam-serve RUN_DIR``: load the run (errors exit 1 before serving), then run uvicorn."""
    args = build_parser().parse_args(argv)
    from spam_lightning.inference.bundle import BundleError

    if not 0 <= args.port <= 65535:
        print(f"spam-serve: error: --port {args.port} is not in 0..65535", file=sys.stderr)
        return 2
    if args.allowed_hosts is None:
        allowed = default_allowed_hosts(args.host)
    else:
        allowed = parse_allowed_hosts(args.allowed_hosts)
        if problems := host_problems(allowed):
            print(f"spam-serve: error: {problems[0]}", file=sys.stderr)
            return 2
    try:
        app = create_app(args.run_dir, args.precision, args.max_chars, args.max_batch, args.device,
                         args.max_total_chars, allowed, args.read_timeout)
    except (BundleError, ValueError, RuntimeError, OSError) as err:
        print(f"spam-serve: error: {err}", file=sys.stderr)
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"spam-serve: warning: binding {args.host}; the demo has no authentication", file=sys.stderr)
    import uvicorn

    shown = f"[{args.host}]" if ":" in args.host else args.host
    classes = ", ".join(app.state.classifier.class_names)
    print(f"spam-serve: {args.run_dir} ({classes}) on http://{shown}:{args.port}/", flush=True)
    print(f"spam-serve: answering Host {', '.join(allowed)} (--allowed-hosts)", flush=True)
    config = server_config(app, args.host, args.port, args.read_timeout, log_level="info")
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
