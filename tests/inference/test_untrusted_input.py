"""What a message, a file or a request may hold and what it may cost (issue 24, items 5, 11, 12):
terminal escapes in ``spam-classify``'s output, memory bounded by what the model reads, and what
``spam-serve`` answers, to whom, and how long it waits."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from test_inference_reliability import cli, make_bundle, one_line_error

from spam_lightning.data.tokens import encode_texts, get_tokenizer, token_prefix
from spam_lightning.inference.classify import MAX_MESSAGE_BYTES
from spam_lightning.inference.serve import (
    DEFAULT_READ_TIMEOUT,
    create_app,
    default_allowed_hosts,
    parse_allowed_hosts,
    server_config,
)
from spam_lightning.inference.serve import main as serve_main

# what a hostile message may hold: clear screen, a colour, NUL, BEL, 8-bit CSI, DEL, a bidi override
HOSTILE = "win\x1b[2J\x1b[31m now\x00\x07\x9b6n\x7f \u202eelif\u202c..."


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("untrusted") / "run")


def raw_controls(out: str) -> set[str]:
    """The characters of ``out`` a terminal acts on (line feeds and tabs aside)."""
    return {c for c in out if (ord(c) < 0x20 and c not in "\t\n") or 0x7F <= ord(c) < 0xA0
            or 0x202A <= ord(c) <= 0x202E or 0x2066 <= ord(c) <= 0x2069}


# ------------------------------------------------------------------ 12. terminal output
def test_text_and_json_output_are_terminal_safe(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.txt"
    path.write_text(f"{HOSTILE}\nplain message\n", encoding="utf-8")
    rc, out, err = cli([str(run_dir), HOSTILE[:20], "--file", str(path)], capsys)
    assert rc == 0, err
    assert len(out) == 3 and not raw_controls("\n".join(out))
    assert out[0].split("\t")[2] == r"win\x1b[2J\x1b[31m now\x00\x07\x9b6"
    assert out[1].split("\t")[2] == r"win\x1b[2J\x1b[31m now\x00\x07\x9b6n\x7f \u202eelif\u202c..."
    assert out[2].endswith("\tplain message")
    rc, out, err = cli([str(run_dir), "--json", "--file", str(path)], capsys)
    assert rc == 0, err
    assert not raw_controls("\n".join(out))
    assert [json.loads(x)["text"] for x in out] == [HOSTILE, "plain message"]  # the same values


# -------------------------------------------------------------- 11. spam-serve: hosts, paths, time
@contextlib.contextmanager
def serving(app: Any, read_timeout: float = DEFAULT_READ_TIMEOUT) -> Iterator[tuple[str, int]]:
    """``app`` on a free loopback port, run with spam-serve's own uvicorn settings."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, "127.0.0.1", 0, read_timeout, log_level="warning",
                                          lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def exchange(address: tuple[str, int], request: bytes, wait: float = 15) -> tuple[bytes, float]:
    """Send ``request`` (perhaps incomplete), read until the server closes: (answer, seconds)."""
    start = time.monotonic()
    with socket.create_connection(address, timeout=wait) as s:
        s.sendall(request)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except TimeoutError:
            answer += b"<still open>"
    return answer, time.monotonic() - start


@pytest.fixture(scope="module")
def app(run_dir: Path) -> Any:
    return create_app(run_dir, read_timeout=1.5)  # the default hosts: the loopback names


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.1.nip.io", "10.1.2.3"])
def test_other_host_headers_are_refused(app: Any, host: str) -> None:
    """DNS rebinding: a browser on evil.example whose name now resolves to 127.0.0.1 sends its own
    name as Host; the server answers only the names it is reached by."""
    with TestClient(app, base_url=f"http://{host}") as client:
        for r in (client.get("/"), client.get("/api/health"),
                  client.post("/api/classify", json={"text": "hello"})):
            assert r.status_code == 400 and r.text == "Invalid host header"


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost", "[::1]:8000", "LOCALHOST:1"])
def test_loopback_host_headers_are_answered(app: Any, host: str) -> None:
    with TestClient(app, base_url=f"http://{host}") as client:
        assert client.post("/api/classify", json={"text": "hello"}).status_code == 200


def test_allowed_hosts_widen_and_default_follows_the_bind(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wide = create_app(run_dir, allowed_hosts=["*.example.com", "demo.lan"])
    for host, status in [("a.example.com", 200), ("demo.lan:80", 200), ("localhost", 400)]:
        with TestClient(wide, base_url=f"http://{host}") as client:
            assert client.get("/api/health").status_code == status, host
    any_host = create_app(run_dir, allowed_hosts=["*"])
    with TestClient(any_host, base_url="http://any.where") as client:
        assert client.get("/api/health").status_code == 200
    assert default_allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert default_allowed_hosts("192.168.1.20") == ["192.168.1.20"]
    assert default_allowed_hosts("fe80::1") == ["[fe80::1]"]
    names = {"127.0.0.1", "localhost", socket.gethostname().lower()}
    assert names <= set(default_allowed_hosts("0.0.0.0"))
    assert parse_allowed_hosts("Demo.LAN, ::1") == ["demo.lan", "[::1]"]
    for entry in ("local*host", "localhost:8000", "*example.com", ""):
        assert serve_main([str(run_dir), "--allowed-hosts", f"localhost,{entry}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--allowed-hosts entry {entry!r}" in err
        assert "Traceback" not in err


def test_health_discloses_no_path(app: Any, run_dir: Path) -> None:
    with TestClient(app, base_url="http://127.0.0.1") as client:
        text = client.get("/api/health").text
        openapi = client.get("/openapi.json").text + client.get("/").text
    assert "run_dir" not in text
    for part in (str(run_dir), str(run_dir.parent), str(Path.home())):
        assert part not in text and part not in openapi


def test_a_trickling_body_is_timed_out(app: Any) -> None:
    with serving(app, read_timeout=1.5) as address:
        head = (b"POST /api/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                b"\r\nContent-Length: 100\r\n\r\n")
        answer, seconds = exchange(address, head + b'{"text": "hel')
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"did not arrive within 1.5 s" in answer and 1.4 < seconds < 8
        good = b'{"text": "hello"}'  # a whole body still gets its answer, on its own connection
        answer, _ = exchange(address, head.replace(b"100", str(len(good)).encode()).replace(
            b"1.1", b"1.0", 1) + good)
        assert answer.startswith(b"HTTP/1.1 200 "), answer


def test_trickling_headers_are_timed_out(app: Any) -> None:
    """Slowloris: headers that never end; uvicorn alone keeps such a connection open for ever."""
    with serving(app, read_timeout=1.5) as address:
        never_ends = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: b"
        answer, seconds = exchange(address, never_ends)
        assert answer == b"" and 1.4 < seconds < 8
        answer, _ = exchange(address, b"GET /api/health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ")


# ---------------------------------------------------------------- 5. memory bounded by what is read
# what GPT-2's pattern treats specially: whitespace runs before letters, digits, symbols and line
# ends; contractions; combining marks; multi-byte characters; the special token's text
PIECES = ["a", "b", "ab", "Word", " ", "  ", "\n", "\r\n", "\t", "\u00a0", "'", "'s", "'ll", "'re",
          "s", "1", "23", "!", "?!", ".", "é", "e\u0301", "🎉", "中文", "<|endoftext|>",
          " \n "]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=80), st.integers(1, 24))
def test_token_prefix_gives_the_ids_of_full_tokenization(parts: list[str], limit: int) -> None:
    text = "".join(parts)
    full = get_tokenizer().encode(text, disallowed_special=())
    assert encode_texts([text], max_length=limit) == [full[:limit]]
    assert len(token_prefix(text, limit)) <= len(text)


@pytest.mark.parametrize("limit", [1, 2, 7, 120, 1024])
def test_long_texts_tokenize_as_in_full(limit: int) -> None:
    """Texts far longer than the limit, cut where the proof says, against the whole text's ids."""
    rng = random.Random(limit)
    texts = ["".join(rng.choice(PIECES) for _ in range(3 * limit + 50)) for _ in range(30)]
    texts += [" " * 5000 + "a", "a" * 5000, "\n" * 3000 + "x y", "🎉" * 3000,
              "x" + " \t" * 2000 + "y"]
    full = [ids[:limit] for ids in get_tokenizer().encode_batch(texts, disallowed_special=())]
    assert encode_texts(texts, max_length=limit) == full
    assert sum(len(token_prefix(t, limit)) < len(t) for t in texts) >= 30  # cut, not kept whole


def peak_rss_mib(run_dir: Path, path: Path) -> tuple[int, float, list[str]]:
    """``spam-classify RUN --file PATH`` in a new process: exit code, peak RSS (MiB), its lines."""
    code = ("import resource, sys\nfrom spam_lightning.inference.classify import main\n"
            "rc = main(sys.argv[1:])\nrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(rss, file=sys.stderr)\nsys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(run_dir), "--file", str(path)],
                          capture_output=True, text=True, timeout=300)
    rss_kib = int(done.stderr.strip().splitlines()[-1])
    return done.returncode, rss_kib / 1024, done.stdout.splitlines()


@pytest.mark.slow  # two fresh processes (torch imports): ~25 s
def test_long_lines_cost_what_the_model_reads(run_dir: Path, tmp_path: Path) -> None:
    """Issue 24: 200 lines of 1 MB took 2.3 GB; memory now follows what max_length reads."""
    short = tmp_path / "short.txt"
    short.write_text("win a free prize now\nsee you at dinner\n", encoding="utf-8")
    long = tmp_path / "long.txt"
    line = "WIN a FREE prize 1000 now! call 0800 " * 28_000  # 1 MiB, ~280,000 tokens
    with long.open("w", encoding="utf-8") as fh:
        for i in range(48):
            fh.write(f"{i} {line}\n")
    rc, base, _ = peak_rss_mib(run_dir, short)
    assert rc == 0
    rc, peak, out = peak_rss_mib(run_dir, long)
    assert rc == 0 and len(out) == 48
    assert peak - base < 150, f"{peak - base:.0f} MiB more for 48 MiB of text"  # was 528 MiB more


def test_a_line_longer_than_the_limit_is_named(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "huge.txt"
    longest = b"x " * (MAX_MESSAGE_BYTES // 2)
    path.write_bytes(b"first\n" + longest + b"\r\n" + b"y" * (MAX_MESSAGE_BYTES + 1) + b"\nlast\n")
    rc, out, err = cli([str(run_dir), "--file", str(path)], capsys)
    assert rc == 1 and len(out) == 2  # the lines before it, the longest allowed one among them
    assert f"{path}, line 3: longer than {MAX_MESSAGE_BYTES:,} bytes" in one_line_error(err)
    csv_path = tmp_path / "huge.csv"  # a quoted field over many short lines
    csv_path.write_text('Text\nfirst\n"' + "y\n" * (MAX_MESSAGE_BYTES // 2 + 1) + '"\nlast\n',
                        encoding="utf-8")
    rc, out, err = cli([str(run_dir), "--file", str(csv_path)], capsys)
    assert rc == 1 and len(out) == 1
    assert f"{csv_path}, lines 3-" in one_line_error(err) and "a record longer than" in err
