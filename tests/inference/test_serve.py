"""The ``spam-serve`` web demo over real HTTP: a uvicorn server on 127.0.0.1 and an httpx client."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import uvicorn_server

from spam_lightning.inference.bundle import save_bundle
from spam_lightning.inference.classify import Classifier
from spam_lightning.inference.serve import build_parser, create_app, main
from spam_lightning.model.classifier import make_classifier
from spam_lightning.model.gpt import MODEL_CONFIGS, GPTModel

REPO = Path(__file__).resolve().parents[2]
MAX_CHARS = 2_000
MAX_BATCH = 8
CLASSES = ["ham", "spam"]
MESSAGES = [
    "You are a winner you have been specially selected to receive $1000 cash or a $2000 award.",
    "Hey, just wanted to check if we're still on for dinner tonight? Let me know!",
    "URGENT! Your mobile number has won a £2000 prize. Call 09061701461 to claim.",
    "ok",
    "Sorry, I'll call later",
    "FREE entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121",
    "Did you catch the bus? Are you frying an egg? Did you make a tea?",
    "Congratulations! You've won a free ticket to the Bahamas. Reply WIN now 🎉",
]


def write_bundle(run_dir: Path) -> Path:
    """A tiny untrained classifier saved as a run folder's bundle."""
    torch.manual_seed(0)
    model = make_classifier(GPTModel(MODEL_CONFIGS["gpt2-tiny"]), num_classes=2, trainable="last_block")
    save_bundle(
        run_dir, model, class_names=CLASSES, token="last", max_length=120,
        padding="longest", pad_token_id=50256,
    )
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def reference(run_dir: Path) -> Classifier:
    return Classifier(run_dir)


@pytest.fixture(scope="module")
def base_url(run_dir: Path) -> Iterator[str]:
    """A real uvicorn server on a free loopback port, in a background thread."""
    with uvicorn_server(create_app(run_dir, max_chars=MAX_CHARS, max_batch=MAX_BATCH)) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as c:
        yield c


def classify(client: httpx.Client, text: str) -> dict:
    r = client.post("/api/classify", json={"text": text})
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    return pred


def test_page_has_form_and_no_external_assets(client: httpx.Client) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<textarea" in page and 'id="go"' in page and "Classify</button>" in page
    assert 'fetch("api/classify"' in page
    assert f'maxlength="{MAX_CHARS}"' in page and "ham, spam" in page
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert "default-src 'none'" in r.headers["content-security-policy"]


def test_health(client: httpx.Client) -> None:
    info = client.get("/api/health").json()
    assert info["status"] == "ok"
    assert info["class_names"] == CLASSES
    assert info["max_length"] == 120 and info["token"] == "last"
    assert info["max_chars"] == MAX_CHARS and info["max_batch"] == MAX_BATCH
    assert info["model"]["n_layers"] == MODEL_CONFIGS["gpt2-tiny"]["n_layers"]


def test_good_input_matches_classifier(client: httpx.Client, reference: Classifier) -> None:
    text = MESSAGES[0]
    pred = classify(client, text)
    assert pred["label"] in CLASSES
    assert 0.5 <= pred["probability"] <= 1.0
    assert set(pred["probabilities"]) == set(CLASSES)
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert pred["probabilities"][pred["label"]] == pred["probability"]
    (ref,) = reference.predict(text)
    assert pred["label"] == ref.label
    assert pred["probability"] == pytest.approx(ref.probability, abs=1e-5)


def test_longest_allowed_message(client: httpx.Client) -> None:
    pred = classify(client, "win cash " * (MAX_CHARS // 9))  # truncated to max_length tokens
    assert pred["label"] in CLASSES


@pytest.mark.parametrize("payload", [{"text": ""}, {"text": "  \n\t "}, {"texts": ["hi", " "]}, {"texts": []}])
def test_empty_input_is_422(client: httpx.Client, payload: dict) -> None:
    r = client.post("/api/classify", json=payload)
    assert r.status_code == 422
    assert "empty" in r.json()["detail"]


def test_oversized_input_is_413(client: httpx.Client) -> None:
    r = client.post("/api/classify", json={"text": "a" * (MAX_CHARS + 1)})
    assert r.status_code == 413
    assert f"limit is {MAX_CHARS:,}" in r.json()["detail"]
    r = client.post("/api/classify", json={"texts": ["hello"] * (MAX_BATCH + 1)})
    assert r.status_code == 413
    assert f"limit is {MAX_BATCH}" in r.json()["detail"]
    # an absurd body is refused before it is parsed
    r = client.post(
        "/api/classify", content=b'{"text": "' + b"x" * 2_000_000 + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413
    assert "request body is larger than" in r.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"txt": "hello"},
        {"text": 5},
        {"text": "a", "texts": ["b"]},
        {"texts": "not a list"},
        {"texts": ["ok", None]},
        ["hello"],
        "hello",
    ],
)
def test_wrong_shape_is_422(client: httpx.Client, body: object) -> None:
    r = client.post("/api/classify", json=body)
    assert r.status_code == 422
    assert isinstance(r.json()["detail"], list)


def test_not_json_is_422(client: httpx.Client) -> None:
    r = client.post("/api/classify", content=b"text=hello", headers={"Content-Type": "application/json"})
    assert r.status_code == 422


def test_batch(client: httpx.Client, reference: Classifier) -> None:
    texts = MESSAGES[:5]
    r = client.post("/api/classify", json={"texts": texts})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == len(texts)
    for pred, ref in zip(preds, reference.predict(texts), strict=True):
        assert pred["label"] == ref.label
        assert pred["probability"] == pytest.approx(ref.probability, abs=1e-5)


def test_concurrent_requests_match_sequential(base_url: str) -> None:
    texts = [f"{MESSAGES[i % len(MESSAGES)]} #{i}" for i in range(16)]
    with httpx.Client(base_url=base_url, timeout=60, trust_env=False) as c:
        sequential = [classify(c, t) for t in texts]

    def one(text: str) -> dict:
        with httpx.Client(base_url=base_url, timeout=60, trust_env=False) as c:
            return classify(c, text)

    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(one, texts, timeout=120))
    assert len({p["probability"] for p in sequential}) > 1  # the texts really differ
    for got, want in zip(concurrent, sequential, strict=True):
        assert got["label"] == want["label"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)


def test_default_host_is_loopback() -> None:
    args = build_parser().parse_args(["some/run"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.precision == "32"


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_cli_missing_folder_exits_1() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "spam_lightning.inference.serve", "/nonexistent/run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("spam-serve: error: Run folder not found: /nonexistent/run")
    assert "Uvicorn running" not in proc.stdout + proc.stderr


def test_cli_folder_without_bundle_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("spam-serve: error: No inference bundle in") and "\n" not in err
