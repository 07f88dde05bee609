"""Errors: one clear message, early (issue 11). Every known failure of ``python train.py`` prints
its message without a traceback, exits non-zero and lands in the run's ``train.log``; the
pre-flight check lists every bad value at once and knows within about a second whether the
pretrained weights can be had, before any data is prepared or tokenized.

The end-user commands run from a fresh working directory with no path, ``hydra.*``, logger or
callback overrides; they start together when the first of them is needed (each costs seconds of
imports) and the in-process tests run meanwhile.
"""

from __future__ import annotations

import http.server
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _compose import compose_train

from spam_lightning.data import SpamDataModule
from spam_lightning.model.trunk_cache import TrunkCacheError
from spam_lightning.model.weights import (
    HUB_CHECK_TIMEOUT,
    HUB_REPOS,
    WeightsUnavailableError,
    check_weights_available,
    resolve_weights_file,
)
from spam_lightning.sweeps.summary import summarize
from spam_lightning.train import train
from spam_lightning.training.checks import ConfigError, validate_config

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model=gpt2-tiny", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "eval_freq=100",
    "eval_iter=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
]
WEIGHT_FIXES = ("model.weights=random", "model.checkpoint=/path/to/model.safetensors", "go online")


def assert_no_data_work(work: Path) -> None:
    """Nothing was prepared, tokenized or trained below ``work``."""
    assert not (work / "data").exists()
    assert not list(work.rglob("metrics.json")) and not list(work.rglob("*.ckpt"))


# ------------------------------------------------------------------ the commands, run as a user would
def _user_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The caller's environment with an empty Hugging Face cache and no data-folder override."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SPAM_", "HYDRA_"))}
    return {**env, "HF_HOME": str(tmp / "hf-home"), "OMP_NUM_THREADS": "1", **extra}


COMMANDS: dict[str, tuple[list[str], dict[str, str]]] = {
    # a file that is not safetensors, given as the pretrained checkpoint
    "checkpoint": (["model.checkpoint=model.safetensors"], {}),
    # six bad values: one message, no traceback
    "config": (
        ["model=gpt2-tiny", "optimizer.lr=fast", "model.drop_rate=1.5", "eval_iter=0"], {}
    ),
    # the same switch as Hydra's own errors: the full traceback of the original error
    "full-error": (["model=gpt2-tiny", "data.source=/no/such/SMSSpamCollection"],
                   {"HYDRA_FULL_ERROR": "1"}),
    "data": (["model=gpt2-tiny", "data.source=/no/such/SMSSpamCollection"], {}),
    # the README's first command, offline with an empty cache
    "weights": ([], {"HF_HUB_OFFLINE": "1"}),
    "multirun": (["-m", *TINY, "optimizer.lr=-1,0.001"], {}),
}


@pytest.fixture(scope="module", autouse=True)
def commands(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple]]:
    """Start every command when the module starts, each in its own fresh folder (the in-process
    tests run meanwhile); name -> (folder, process, start time)."""
    started = {}
    for name, (args, extra) in COMMANDS.items():
        work = tmp_path_factory.mktemp(f"cmd-{name}")
        if name == "checkpoint":
            (work / "model.safetensors").write_bytes(b"<html>not the weights</html>")
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *args],
            cwd=work, env=_user_env(work, **extra), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        started[name] = (work, proc, time.perf_counter())
    yield started
    for _, proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def finished(commands, name: str) -> tuple[Path, subprocess.CompletedProcess]:
    work, proc, _ = commands[name]
    out, err = proc.communicate(timeout=300)
    return work, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_logs(work: Path) -> list[str]:
    """The ``train.log`` of every run (and sweep job) below ``work/outputs``."""
    logs = sorted((work / "outputs").rglob("train.log"))
    assert logs, f"no train.log below {work / 'outputs'}"
    return [p.read_text(encoding="utf-8") for p in logs]


# ------------------------------------------------------------------ the pre-flight check
SIX_BAD = {
    "optimizer.lr=-1": "optimizer.lr=-1: must be a finite number > 0",
    "optimizer.weight_decay=-0.5": "optimizer.weight_decay=-0.5: must be a finite number >= 0",
    "model.drop_rate=1.0": "model.drop_rate=1.0: must be a number in [0, 1)",
    "trainable.rank=-4": "trainable.rank=-4: must be an integer >= 1 for trainable=lora",
    "trainable.alpha=0": "trainable.alpha=0: must be a finite number > 0 for trainable=lora",
    # the data module's own check (its constructor runs inside the pre-flight check)
    "data.val_frac=0": "data.val_frac=0: must be a number with 0 < value < 1",
    "trainer.max_epochs=0": (
        "trainer.max_epochs=0: must be an integer >= 1, or -1 (no limit, with trainer.max_steps)"
    ),
    "eval_freq=2.5": "eval_freq=2.5: must be an integer >= 1",
}


def test_every_bad_value_is_listed_at_once(tmp_path: Path, sms_file: Path) -> None:
    cfg = compose_train(
        ["model=gpt2-tiny", "trainable=lora", f"data.source={sms_file}", *SIX_BAD], tmp_path
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    lines = str(err.value).splitlines()
    assert lines[0] == "Invalid configuration:"
    assert sorted(lines[1:]) == sorted(f"  - {line}" for line in SIX_BAD.values())
    assert_no_data_work(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.lr=fast"], "optimizer.lr='fast': must be a finite number > 0"),
        (["optimizer.lr=nan"], "optimizer.lr=nan: must be a finite number > 0"),
        (["model.drop_rate=1.5"], "model.drop_rate=1.5: must be a number in [0, 1)"),
        (
            ["trainable=lora", "trainable.rank=0"],
            "trainable.rank=0: must be an integer >= 1 for trainable=lora",
        ),
        (
            ["data.train_frac=0.8", "data.val_frac=0.2"],
            "data.train_frac=0.8 + data.val_frac=0.2 = 1: must be < 1 (the test split gets the rest",
        ),
        (["data=imdb", "data.val_size=0"], "data.val_size=0: must be an integer >= 1"),
        (["cache.memory_budget_gb=-1"], "cache.memory_budget_gb=-1: must be a number >= 0"),
    ],
)
def test_bad_value_is_named_with_what_is_allowed(overrides: list[str], message: str, tmp_path) -> None:
    cfg = compose_train(["model=gpt2-tiny", *overrides], tmp_path)
    with pytest.raises(ConfigError, match="Invalid configuration:") as err:
        validate_config(cfg)
    assert message in str(err.value)


def test_what_lightning_refuses_is_its_message_before_any_work(tmp_path: Path) -> None:
    """Trainer flags Lightning's Trainer checks itself are not checked twice: its message, which
    names the flag and what it accepts, comes out as the run's error before any data work."""
    cfg = compose_train(["model=gpt2-tiny", "trainer.limit_train_batches=1.5"], tmp_path)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value) == (
        "trainer: You have passed invalid value 1.5 for limit_train_batches, it has to be in "
        "[0.0, 1.0] or an int."
    )
    assert_no_data_work(tmp_path)


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_defaults_and_legal_edge_values_pass(tmp_path: Path) -> None:
    table = tmp_path / "all.csv"  # the data module is built too: it checks that its source exists
    table.write_text("text,label\nhi,ham\n")
    for overrides in (
        [],
        ["model=gpt2-tiny", "trainable=lora", "optimizer.weight_decay=0", "model.drop_rate=0.99"],
        ["trainer.max_epochs=-1", "trainer.max_steps=10", "trainer.limit_val_batches=0"],
        ["data=csv", f"data.source={table}", "data.train_frac=0.5", "data.val_frac=0.25"],
        ["data=imdb", "data.test_size=null"],
    ):
        validate_config(compose_train(overrides, tmp_path))


# ------------------------------------------------------------------ pretrained weights, early
@pytest.fixture
def empty_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty Hugging Face cache; nothing from the caller's environment."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return tmp_path / "hf-home"


def test_offline_pretrained_run_fails_in_preflight_within_a_second(
    empty_hf_home: Path, tmp_path: Path, sms_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_train(["model=gpt2-small", *TINY[1:], f"data.source={sms_file}"], tmp_path)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        train(cfg)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.5, elapsed  # measured: about 0.1 s
    text = str(err.value)
    assert str(empty_hf_home / "hub") in text and "HF_HUB_OFFLINE is set" in text
    for fix in WEIGHT_FIXES:
        assert fix in text
    assert_no_data_work(tmp_path)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """An endpoint that accepts connections and never answers (a stalled network)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_unanswering_hub_is_given_up_after_the_timeout(
    empty_hf_home: Path, silent_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", silent_server)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        check_weights_available("gpt2-medium")
    elapsed = time.perf_counter() - start
    assert HUB_CHECK_TIMEOUT * 0.9 < elapsed < HUB_CHECK_TIMEOUT + 1.0, elapsed
    assert f"the Hub ({silent_server}) cannot serve them" in str(err.value)
    assert "did not answer within 1 s" in str(err.value)


def test_unreachable_hub_is_known_at_once(empty_hf_home: Path, monkeypatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="it is unreachable"):
        check_weights_available("gpt2-small")
    assert time.perf_counter() - start < 1.0


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """HEAD of the Hub's resolve URL: a redirect to storage for known files, else 404."""

    files: set[str] = set()

    def do_HEAD(self) -> None:
        if self.path in self.files:
            self.send_response(302)
            self.send_header("Location", "https://storage.invalid/blob")
        else:
            self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[str]:
    handler = type("Handler", (_HubHandler,), {"files": {
        f"/{HUB_REPOS['gpt2-small']}/resolve/main/model.safetensors"
    }})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_hub_that_serves_the_file_passes_and_one_that_does_not_fails(
    empty_hf_home: Path, hub: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub)
    assert check_weights_available("gpt2-small") == "hub"
    with pytest.raises(WeightsUnavailableError, match=r"no such file \(HTTP 404\)"):
        check_weights_available("gpt2-large")


def test_cached_weights_need_no_network(empty_hf_home: Path, monkeypatch) -> None:
    """The Hub's cache layout (refs/main -> snapshots/<commit>/model.safetensors): found offline,
    and loading takes the cached file without asking the Hub again."""
    repo = empty_hf_home / "hub" / "models--openai-community--gpt2"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    cached = repo / "snapshots" / commit / "model.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not read by the check")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_weights_available("gpt2-small") == "cache"
    assert resolve_weights_file("gpt2-small") == cached
    with pytest.raises(WeightsUnavailableError):  # another size: not cached
        check_weights_available("gpt2-medium")


# ------------------------------------------------------------------ the trunk cache's budget, early
@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_trunk_cache_over_budget_on_the_test_split_fails_before_training(
    tmp_path: Path, sms_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The budget holds train + val but not train + val + test: cache.trunk=true must fail
    before the first training step, not after training when the test split is cached."""
    max_length, emb_dim = 32, 64  # token=last stores max_length float32 states per example
    dm = SpamDataModule(source=str(sms_file), data_dir=str(tmp_path / "probe"), max_length=max_length)
    dm.prepare_data()
    dm.setup("fit")
    per_example = max_length * emb_dim * torch.float32.itemsize
    fit_bytes = (len(dm.train_dataset) + len(dm.val_dataset)) * per_example
    all_bytes = fit_bytes + len(dm.test_dataset) * per_example
    budget = (fit_bytes + all_bytes) / 2 / 2**30
    cfg = compose_train(
        [*TINY, "logger=none", f"data.source={sms_file}", f"data.max_length={max_length}",
         "cache.trunk=true", f"cache.memory_budget_gb={budget}"],
        tmp_path,
    )
    with pytest.raises(TrunkCacheError) as err:
        train(cfg)
    text = str(err.value)
    assert "the cache of train, val and test would need" in text
    assert f"over cache.memory_budget_gb={budget}" in text and "cache.trunk=auto" in text
    assert not (tmp_path / "run" / "checkpoints").exists()  # no epoch was trained

    # with the budget it names, the same run trains and caches all three splits
    needed = float(text.split("raise cache.memory_budget_gb to ")[1].split(" ")[0])
    assert needed * 2**30 >= all_bytes
    cfg = compose_train(
        [*TINY, "logger=none", f"data.source={sms_file}", f"data.max_length={max_length}",
         "cache.trunk=true", f"cache.memory_budget_gb={needed}"],
        tmp_path / "again",
    )
    caplog.set_level(logging.INFO, logger="spam_lightning.training.callbacks.trunk_caching")
    assert train(cfg)["trunk_cache"] is True
    built = [r.getMessage() for r in caplog.records if "computed once for" in r.getMessage()]
    assert [m.split("computed once for ")[1].split(" (")[0] for m in built] == ["train, val", "test"]


# ------------------------------------------------------------------ the commands' results
@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_bad_config_prints_one_message_and_logs_it(commands) -> None:
    work, proc = finished(commands, "config")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    for line in (
        "Error: Invalid configuration:",
        "optimizer.lr='fast': must be a finite number > 0",
        "model.drop_rate=1.5: must be a number in [0, 1)",
        "eval_iter=0: must be an integer >= 1",
    ):
        assert proc.stderr.count(line) == 1, proc.stderr
        assert line.removeprefix("Error: ") not in proc.stdout  # printed once, not logged twice
    (log,) = run_logs(work)
    assert "[ERROR] - ConfigError: Invalid configuration:" in log
    assert "optimizer.lr='fast'" in log and "eval_iter=0" in log
    assert_no_data_work(work)


def test_data_error_prints_its_message_without_a_traceback(commands) -> None:
    work, proc = finished(commands, "data")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "Error: data.source: /no/such/SMSSpamCollection: no such file" in proc.stderr
    (log,) = run_logs(work)
    assert "DataError: data.source: /no/such/SMSSpamCollection: no such file" in log


def test_hydra_full_error_shows_the_original_traceback(commands) -> None:
    _, proc = finished(commands, "full-error")
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "spam_lightning.data.source.DataError: data.source: /no/such" in proc.stderr
    assert "The above exception was the direct cause" in proc.stderr


def test_offline_first_run_fails_at_once_naming_the_fixes(commands) -> None:
    """`python train.py` offline with an empty cache: the weights error, before the data is
    prepared or tokenized, in the time it takes to start (not after the Hub's retries)."""
    work, proc = finished(commands, "weights")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    message = proc.stderr
    assert "needs the weights of gpt2-small (openai-community/gpt2/model.safetensors)" in message
    assert "HF_HUB_OFFLINE is set" in message and str(work / "hf-home") in message
    for fix in WEIGHT_FIXES:
        assert fix in message
    (log,) = run_logs(work)
    assert "WeightsUnavailableError" in log and "data: train" not in log  # nothing tokenized
    assert_no_data_work(work)


def test_failed_sweep_jobs_log_their_errors_and_become_failed_rows(commands) -> None:
    work, proc = finished(commands, "multirun")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "Error: Invalid configuration:\n  - optimizer.lr=-1: must be a finite number > 0" in (
        proc.stderr
    )
    (sweep,) = (work / "outputs" / "multirun").iterdir()
    assert "optimizer.lr=-1" in (sweep / "0" / "train.log").read_text()
    assert (sweep / "1" / "metrics.json").is_file()  # the good job of the sweep still ran
    table = summarize(sweep).set_index("Config")
    statuses = {cfg.split("optimizer.lr=")[1].split(",")[0]: s for cfg, s in table["Status"].items()}
    assert statuses == {"-1": "failed (1/1)", "0.001": "ok"}


def test_unreadable_checkpoint_is_named_without_a_traceback(commands) -> None:
    work, proc = finished(commands, "checkpoint")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "Error: cannot read model.safetensors as safetensors" in proc.stderr
    (log,) = run_logs(work)
    assert "CheckpointError: cannot read" in log and "data: train" not in log
