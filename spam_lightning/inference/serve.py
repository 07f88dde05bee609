"""The ``spam-serve`` web demo: a small page and a JSON API around a trained run's classifier.

``GET /`` is a self-contained HTML page (no external assets), ``POST /api/classify`` classifies
``{"text": ...}`` or ``{"texts": [...]}``, ``GET /api/health`` describes the loaded model. The
model is loaded once; requests run in FastAPI's threadpool and inference is serialized by a lock,
so concurrent requests are safe and each gets exactly the answer it would get alone.
"""

from __future__ import annotations

import argparse
import html
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, model_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from spam_lightning.inference.classify import Classifier

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# worst case JSON bytes per character: a non-BMP code point escaped as a surrogate pair "\ud83d\ude00"
JSON_BYTES_PER_CHAR = 12
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# ------------------------------------------------------------------ API models
class ClassifyRequest(BaseModel):
    """Exactly one of ``text`` (one message) or ``texts`` (a batch)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    texts: list[str] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ClassifyRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError('give exactly one of "text" (a string) or "texts" (a list of strings)')
        return self

    def messages(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class PredictionOut(BaseModel):
    label: str
    probability: float
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    predictions: list[PredictionOut]


# ------------------------------------------------------------------ body size limit
class BodyLimit:
    """Reject request bodies over ``max_bytes`` with 413 before they are parsed (pure ASGI)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body is larger than {self.max_bytes:,} bytes"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        chunks: list[bytes] = []
        total = 0
        while True:  # also bounds chunked bodies that carry no Content-Length
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ------------------------------------------------------------------ page
# the demo page, with {classes}, {max_length} and {max_chars} filled in by `render_page`
PAGE = Path(__file__).with_name("page.html")


def render_page(class_names: list[str], max_length: int, max_chars: int) -> str:
    """The demo page with the model's facts filled in (HTML-escaped)."""
    values = {
        "classes": html.escape(", ".join(class_names)),
        "max_length": str(int(max_length)),
        "max_chars": str(int(max_chars)),
    }
    page = PAGE.read_text(encoding="utf-8")
    for key, value in values.items():
        page = page.replace("{" + key + "}", value)
    return page


# ------------------------------------------------------------------ app
def create_app(
    run_dir: str | Path, precision: str = "32", max_chars: int = 10_000, max_batch: int = 64,
    device: str = "cpu",
) -> FastAPI:
    """The demo app for a run folder; raises ``BundleError``/``ValueError`` for a bad run or option."""
    if max_chars < 1 or max_batch < 1:
        raise ValueError(f"max_chars and max_batch must be >= 1, got {max_chars} and {max_batch}")
    from spam_lightning.inference.bundle import find_bundle  # torch: after --help, not at import

    find_bundle(run_dir)  # a bad folder fails fast, before the model loads
    from spam_lightning.inference.classify import Classifier

    clf: Classifier = Classifier(run_dir, device=device, precision=precision, batch_size=max_batch)
    lock = threading.Lock()
    page = render_page(clf.class_names, clf.max_length, max_chars)
    health: dict[str, Any] = {
        "status": "ok", "run_dir": str(run_dir), "class_names": clf.class_names,
        "max_length": clf.max_length, "token": clf.token, "padding": clf.padding,
        "precision": precision, "device": str(clf.device),
        "model": {k: clf.config["model"][k] for k in ("emb_dim", "n_layers", "n_heads", "context_length")},
        "max_chars": max_chars, "max_batch": max_batch,
    }

    app = FastAPI(
        title="spam-lightning demo",
        summary="Classify SMS messages with a fine-tuned GPT-2.",
        docs_url=None,  # the Swagger/ReDoc pages load assets from a CDN; /openapi.json stays
        redoc_url=None,
    )
    # one body may carry max_batch messages of max_chars characters, JSON-escaped, plus framing
    app.add_middleware(BodyLimit, max_bytes=max_batch * (max_chars * JSON_BYTES_PER_CHAR + 16) + 1024)
    app.state.classifier = clf

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/api/health")
    def api_health() -> dict[str, Any]:
        """The loaded model and the request limits."""
        return health

    @app.post(
        "/api/classify",
        response_model=ClassifyResponse,
        responses={413: {"description": "too many or too long messages"}},
    )
    def api_classify(req: ClassifyRequest) -> ClassifyResponse:
        """Label, its probability and every class's probability, one per message, in order."""
        texts = req.messages()
        if not texts:
            raise HTTPException(422, '"texts" is empty; give at least one message')
        if len(texts) > max_batch:
            raise HTTPException(413, f"{len(texts)} messages in one request; the limit is {max_batch}")
        for i, text in enumerate(texts, 1):
            if not text.strip():
                raise HTTPException(422, f"message {i} is empty or only whitespace; nothing to classify")
            if len(text) > max_chars:
                raise HTTPException(
                    413, f"message {i} has {len(text):,} characters; the limit is {max_chars:,}"
                )
        try:
            with lock:  # one forward pass at a time: safe and exact under concurrent requests
                preds = clf.predict(texts)
        except (ValueError, TypeError) as err:
            raise HTTPException(422, str(err)) from err
        return ClassifyResponse(
            predictions=[
                PredictionOut(label=p.label, probability=p.probability, probabilities=p.probabilities)
                for p in preds
            ]
        )

    return app


# ------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spam-serve",
        description="Serve a web demo and JSON API for a trained spam-lightning run.",
    )
    p.add_argument("run_dir", help="a training run folder (outputs/runs/...) or its bundle/ folder")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind ({DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT})")
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--max-chars", type=int, default=10_000, help="longest message accepted (10000)")
    p.add_argument("--max-batch", type=int, default=64, help="most messages per request (64)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``spam-serve RUN_DIR``: load the run (errors exit 1 before serving), then run uvicorn."""
    args = build_parser().parse_args(argv)
    from spam_lightning.inference.bundle import BundleError

    if not 0 <= args.port <= 65535:
        print(f"spam-serve: error: --port {args.port} is not in 0..65535", file=sys.stderr)
        return 2
    try:
        app = create_app(
            args.run_dir,
            precision=args.precision,
            max_chars=args.max_chars,
            max_batch=args.max_batch,
            device=args.device,
        )
    except (BundleError, ValueError, RuntimeError, OSError) as err:
        print(f"spam-serve: error: {err}", file=sys.stderr)
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"spam-serve: warning: binding {args.host}; the demo has no authentication",
            file=sys.stderr,
        )
    import uvicorn

    shown = f"[{args.host}]" if ":" in args.host else args.host
    classes = ", ".join(app.state.classifier.class_names)
    print(f"spam-serve: {args.run_dir} ({classes}) on http://{shown}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
