"""``spam-serve``: ``GET /`` a self-contained demo page, ``POST /api/classify`` classifies
``{"text": ...}`` or ``{"texts": [...]}``, ``GET /api/health`` describes the model. Requests run in
FastAPI's threadpool and a lock serializes inference: each gets the answer it would get alone.
Only requests naming an allowed host are answered (DNS rebinding), and a request's headers and
body each have ``--read-timeout`` seconds to arrive (a trickling client holds nothing for long).
The app itself (``inference/app.py``) needs the ``serve`` extra; without it ``spam-serve`` says
so in one line."""

from __future__ import annotations

import argparse
import html
import json
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spam_lightning.inference.classify import add_operating_point_options

if TYPE_CHECKING:
    from fastapi.responses import JSONResponse

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
# what the app imports (the serve extra and what it brings): missing, spam-serve names the extra
SERVE_MODULES = ("fastapi", "uvicorn", "starlette", "pydantic", "pydantic_core", "h11", "anyio",
                 "annotated_types", "sniffio", "click", "typing_inspection")
SERVE_EXTRA = 'pip install "spam-lightning[serve]"'
# the app's names, importable from here as before (loaded on first use: they need the extra)
APP_NAMES = ("ClassifyRequest", "PredictionOut", "ClassifyResponse", "create_app",
             "header_deadline_protocol", "server_config")
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class BadRequest(Exception):
    """A request the API refuses: the status and a short message, never the input itself."""

    def __init__(self, status: int, message: str, loc: tuple[str | int, ...] = (), error_type: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.loc, self.error_type = status, message, loc, error_type

    def response(self) -> JSONResponse:
        from fastapi.responses import JSONResponse

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


def render_page(class_names: list[str], max_length: int | None, max_chars: int,
                threshold: float | None = None) -> str:
    """The demo page with the model's facts filled in; ``max_length`` None: a bag-of-words baseline;
    ``threshold``: the decision threshold on P(class 1) (None: the most probable class)."""
    note = ("A bag-of-words baseline: every word counts." if max_length is None
            else f"Messages longer than {int(max_length)} tokens are truncated, as in training.")
    if threshold is not None and len(class_names) == 2:
        note += f" Labelled {html.escape(class_names[1])} when its probability is at least {threshold:.4g}."
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


def __getattr__(name: str) -> Any:
    if name in APP_NAMES:
        from spam_lightning.inference import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def missing_extra() -> str | None:
    """The serve extra's module that cannot be imported (a plain ``pip install .``), or None."""
    try:
        import uvicorn  # noqa: F401

        from spam_lightning.inference import app  # noqa: F401
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] in SERVE_MODULES:
            return err.name
        raise
    return None


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
    add_operating_point_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """``spam-serve RUN_DIR``: load the run (errors exit 1 before serving), then run uvicorn."""
    args = build_parser().parse_args(argv)
    if missing := missing_extra():
        print(f"spam-serve: error: the web demo needs the serve extra ({missing} is not installed): "
              f"{SERVE_EXTRA}", file=sys.stderr)
        return 1
    from spam_lightning.inference.app import create_app, server_config
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
                         args.max_total_chars, allowed, args.read_timeout, args.threshold, args.raw)
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
