"""Reliability of training and inference (issue 7): bad configs fail before any heavy work,
interrupted runs resume to the same result, checkpoints and bundles never unpickle code, and
``spam-classify`` takes whatever input arrives. The data layer's side (bad data, downloads,
locking) is in tests/data/test_data_reliability.py.

Runs alone: ``pytest tests/test_reliability.py`` (35-55 s on 2 CPU cores). The slow parts,
two training subprocesses that get killed and a 100,000-message ``spam-classify --file`` run,
start in the background when the module starts (only those the selected tests need), and the
in-process tests run meanwhile; the tests that wait for them come last.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from _compose import compose_train
from hydra.errors import MissingConfigException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from spam_lightning.data.tokens import encode_texts
from spam_lightning.inference.bundle import BundleError, load_bundle, save_bundle
from spam_lightning.inference.classify import Classifier
from spam_lightning.inference.classify import main as classify_main
from spam_lightning.model.classifier import make_classifier
from spam_lightning.model.gpt import MODEL_CONFIGS, GPTModel
from spam_lightning.model.weights import CheckpointError, hf_plan
from spam_lightning.train import train
from spam_lightning.training.callbacks import RNGState, SafeCheckpointIO

REPO = Path(__file__).resolve().parents[1]
# One intra-op thread everywhere: the tiny model gains nothing from more, several processes share
# the cores here (spinning thread pools would slow them all down), and the in-process runs and the
# subprocesses they are compared with then compute in exactly the same way.
THREADS = 1
ENV = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# 3 short epochs of the tiny model: each epoch ends with a checkpoint (ModelCheckpoint save_last)
FAST = [
    "trainer.max_epochs=3", "trainer.limit_train_batches=10", "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=4", "data.max_length=32", "eval_freq=5", "eval_iter=1",
    "logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
]
TINY = ["model=gpt2-tiny", *FAST]
DROPOUT = ["model.drop_rate=0.1"]  # random draws in training (and no trunk cache): RNG state matters


# ------------------------------------------------------------------ helpers and fixtures
class _Payload:
    """Pickles to "call open(marker, 'w')": what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def tiny_classifier(num_classes: int = 2, **sizes: Any) -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel({**MODEL_CONFIGS["gpt2-tiny"], **sizes})
    return make_classifier(model, num_classes, "last_block")


def make_bundle(folder: Path, token: str) -> Path:
    """An untrained tiny classifier as a bundle: inference needs no training run."""
    save_bundle(
        folder, tiny_classifier(), class_names=["ham", "spam"], token=token, max_length=16,
        padding="longest", pad_token_id=50256,
    )
    return folder


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """``last``: the chapter's pooling (padding matters); ``first``: the cheapest forward."""
    root = tmp_path_factory.mktemp("bundles")
    return {token: make_bundle(root / token, token) for token in ("last", "first")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def sms_texts(sms_file: Path) -> list[str]:
    """The SMS messages, one per line of the file (a quoted record's other lines are skipped)."""
    lines = sms_file.read_text("utf-8").splitlines()
    return [t for line in lines if "\t" in line and (t := line.split("\t", 1)[1].strip())]


class KilledRun:
    """``train.py`` in a subprocess, sent ``sig`` during epoch 2 of 3: once epoch 1's
    ``last.ckpt`` exists and epoch 2's first batch has printed its chapter line."""

    def __init__(self, sig: signal.Signals, run_dir: Path, overrides: list[str]) -> None:
        self.sig, self.run_dir = sig, run_dir
        self.output: list[str] = []
        self.signalled = False
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
            cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
        )
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            checkpoint = self.run_dir / "checkpoints" / "last.ckpt"
            if not self.signalled and line.startswith("Ep 2 (") and checkpoint.is_file():
                self.proc.send_signal(self.sig)
                self.signalled = True

    def result(self, timeout: float = 300) -> tuple[int, str]:
        self.thread.join(timeout)
        return self.proc.wait(timeout), "".join(self.output)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class StreamedClassify:
    """``spam-classify --file FIFO`` in a subprocess, fed by the test through a named pipe.

    The first 10,240 lines go in, and only once 10,000 predictions are out do the other 89,760
    follow: output before the input ends shows the messages are streamed, not read in whole. The
    peak RSS then against the peak at the end shows memory does not grow with the input. Peaks
    are ``VmHWM`` polled from /proc: ``wait4``'s ``ru_maxrss`` would count the forked test
    process's own RSS from before ``exec``.
    """

    FIRST = 10_240  # ten of classify's 1,024-message chunks

    def __init__(self, bundle: Path, lines: list[str], work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.fifo, self.out, self.err = work / "in.fifo", work / "out.txt", work / "err.txt"
        os.mkfifo(self.fifo)
        exe = Path(sys.executable).with_name("spam-classify")
        cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "spam_lightning.inference.classify"]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [*cmd, str(bundle), "--file", str(self.fifo), "--batch-size", "1024"],
                stdout=out, stderr=err, env=ENV,
            )
        self.returncode: int | None = None
        self.peak_first_mb: float | None = None  # after the first 10,000 predictions
        self.peak_mb = 0.0  # after all of them (the last reading before it exits)
        self.thread = threading.Thread(target=self._feed, args=(lines,), daemon=True)
        self.thread.start()

    def _lines_out(self) -> int:
        with self.out.open("rb") as fh:
            return sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))

    def _vm_hwm_mb(self) -> float | None:
        """The child's peak RSS so far, or None once it has exited."""
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return None

    def _feed(self, lines: list[str]) -> None:
        try:
            with open(self.fifo, "w", encoding="utf-8") as fifo:  # blocks until the reader opens
                fifo.write("\n".join(lines[: self.FIRST]) + "\n")
                fifo.flush()
                deadline = time.monotonic() + 180
                while self.proc.poll() is None and time.monotonic() < deadline:
                    if self._lines_out() >= 10_000:  # the rest may sit in stdout's buffer
                        self.peak_first_mb = self._vm_hwm_mb()
                        break
                    time.sleep(0.02)
                if self.peak_first_mb is not None:
                    fifo.write("\n".join(lines[self.FIRST :]) + "\n")
        except BrokenPipeError:  # the reader died: its exit status and stderr tell why
            pass
        while (peak := self._vm_hwm_mb()) is not None:  # until it exits
            self.peak_mb = peak
            time.sleep(0.02)
        self.returncode = self.proc.wait()

    def result(self, timeout: float = 300) -> tuple[int | None, float | None, float]:
        self.thread.join(timeout)
        return self.returncode, self.peak_first_mb, self.peak_mb

    def stop(self) -> None:
        if self.returncode is None:
            self.proc.kill()
            with contextlib.suppress(OSError):  # unblock a feeder still waiting in open()
                os.close(os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK))
            self.thread.join(10)


@pytest.fixture(scope="module", autouse=True)
def background(request, sms_file, data_dir, bundles, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Start the slow subprocesses the selected tests need, all at once, so that they overlap
    with each other and with the in-process tests; stop whatever is left at the end.

    The in-process runs use one thread, like the subprocesses (see ``THREADS``).
    """
    selected = {i.originalname for i in request.session.items if i.module is request.module}
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    data = [f"data.source={sms_file}", f"paths.data_dir={data_dir}"]
    jobs: dict[str, Any] = {}
    if "test_sigterm_then_resume_ends_like_an_uninterrupted_run" in selected:
        run = tmp_path_factory.mktemp("sigterm") / "run"
        jobs["SIGTERM"] = KilledRun(signal.SIGTERM, run, [*TINY, *data])
    if "test_ctrl_c_then_resume_ends_like_an_uninterrupted_run" in selected:
        run = tmp_path_factory.mktemp("sigint") / "run"
        jobs["SIGINT"] = KilledRun(signal.SIGINT, run, [*TINY, *data])
    if "test_sigkill_then_resume_ends_like_an_uninterrupted_run" in selected:
        run = tmp_path_factory.mktemp("sigkill") / "run"
        jobs["SIGKILL"] = KilledRun(signal.SIGKILL, run, [*TINY, *DROPOUT, *data])
    if "test_classify_streams_100k_lines_in_bounded_memory" in selected:
        texts = sms_texts(sms_file)
        lines = [texts[i % len(texts)] for i in range(100_000)]
        jobs["classify"] = StreamedClassify(bundles["first"], lines, tmp_path_factory.mktemp("classify"))
    yield jobs
    for job in jobs.values():
        job.stop()
    torch.set_num_threads(threads)


_RUNS: dict[tuple[str, ...], Path] = {}


@pytest.fixture(scope="module")
def run_in_process(sms_file, data_dir, tmp_path_factory):
    """``run(*overrides) -> run folder`` of a full in-process training run (memoised)."""

    def run(*overrides: str, fresh: bool = False) -> Path:
        if overrides not in _RUNS or fresh:
            work = tmp_path_factory.mktemp("run")
            cfg = compose_train([*TINY, f"data.source={sms_file}", f"paths.data_dir={data_dir}", *overrides], work)
            train(cfg)
            _RUNS.setdefault(overrides, work / "run")
            return work / "run"
        return _RUNS[overrides]

    return run


def resume_in_process(run_dir: Path, sms_file: Path, data_dir: Path, *overrides: str) -> Path:
    """The documented resume: the same overrides, the same run folder, ``ckpt_path=last``."""
    cfg = compose_train(
        [*TINY, *overrides, f"data.source={sms_file}", f"paths.data_dir={data_dir}", "ckpt_path=last"],
        run_dir.parent,
    )
    assert cfg.paths.output_dir == str(run_dir)
    train(cfg)
    return run_dir


def assert_same_run(a: Path, b: Path) -> None:
    """Identical metrics.json apart from timing, identical history and final weights."""
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        assert m.pop("training_seconds") > 0
    assert ma == mb
    assert json.loads((a / "history.json").read_text()) == json.loads((b / "history.json").read_text())
    weights = "bundle/model.safetensors"
    assert (a / weights).read_bytes() == (b / weights).read_bytes()


def assert_no_heavy_work(work: Path) -> None:
    """Nothing was prepared, tokenized or trained: no data folder, no checkpoint, no metrics."""
    assert not (work / "data").exists()
    assert not (work / "run" / "checkpoints").exists()
    assert not (work / "run" / "metrics.json").exists()


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model gets built (download or random init)."""

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was built before the configuration error")

    monkeypatch.setattr("spam_lightning.model.gpt2.build_gpt", boom)


# ------------------------------------------------------------------ 1. bad configuration
@pytest.mark.parametrize(
    ("group", "allowed"),
    [("model", "gpt2-small"), ("trainable", "last_two_blocks"), ("token", "flexible")],
)
def test_unknown_group_option_lists_the_allowed_ones(group: str, allowed: str, tmp_path: Path) -> None:
    with pytest.raises(MissingConfigException) as err:
        compose_train([f"{group}=nope"], tmp_path)
    assert f"Could not find '{group}/nope'" in str(err.value)
    assert f"Available options in '{group}'" in str(err.value) and allowed in str(err.value)


BAD_CONFIGS = {
    "model name": (
        ["model.name=gpt2-huge"],
        "model.name='gpt2-huge' is unknown; allowed: gpt2-small, gpt2-medium, gpt2-large, "
        "gpt2-xl, gpt2-tiny",
    ),
    "trainable name": (
        ["trainable.name=everything"],
        "trainable.name='everything' is unknown; allowed: last_layer, last_block, "
        "last_two_blocks, all, lora",
    ),
    "token name": (
        ["token.name=middle"], "token.name='middle' is unknown; allowed: last, first, flexible, mean"
    ),
    "max_length": (
        ["data.max_length=2048"], "data.max_length=2048 exceeds the model's context length 1024"
    ),
    "batch size": (["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
    "padding none": (
        ["data.padding=none"],
        "data.padding=none cannot batch sequences of different lengths, but data.batch_size=8",
    ),
    "learning rate": (["optimizer.lr=-1"], "optimizer.lr=-1: must be a finite number > 0"),
    "learning rate word": (["optimizer.lr=fast"], "optimizer.lr='fast': must be a finite number > 0"),
    "dropout": (["model.drop_rate=1.5"], "model.drop_rate=1.5: must be a number in [0, 1)"),
    "lora rank": (
        ["trainable=lora", "trainable.rank=-4"],
        "trainable.rank=-4: must be an integer >= 1 for trainable=lora",
    ),
    "val fraction": (["data.val_frac=0"], "data.val_frac=0: must be a number with 0 < value < 1"),
    "one block": (
        ["trainable=last_two_blocks", "model.n_layers=1"],
        "trainable=last_two_blocks needs at least 2 transformer blocks; model gpt2-tiny has "
        "n_layers=1",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_fails_before_heavy_work(case: str, tmp_path: Path, sms_file: Path, no_model) -> None:
    overrides, message = BAD_CONFIGS[case]
    cfg = compose_train([*TINY, f"data.source={sms_file}", *overrides], tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        train(cfg)
    assert_no_heavy_work(tmp_path)


def test_every_config_problem_is_listed_at_once(tmp_path: Path, sms_file: Path, no_model) -> None:
    overrides = ["model.name=gpt2-huge", "token.name=middle", "data.batch_size=0"]
    cfg = compose_train([*TINY, f"data.source={sms_file}", *overrides], tmp_path)
    with pytest.raises(ValueError) as err:
        train(cfg)
    text = str(err.value)
    assert text.startswith("Invalid configuration:")
    assert "model.name='gpt2-huge'" in text and "token.name='middle'" in text
    assert "data.batch_size=0" in text
    assert_no_heavy_work(tmp_path)


def test_pretrained_checkpoint_of_another_size_is_refused_before_heavy_work(
    tmp_path: Path, sms_file: Path, no_model
) -> None:
    tiny = tmp_path / "tiny" / "model.safetensors"
    tiny.parent.mkdir()
    plan = hf_plan({**MODEL_CONFIGS["gpt2-tiny"], "emb_dim": 32, "n_layers": 1})
    save_file({k: torch.zeros(e.shape) for k, e in plan.items()}, tiny)
    cfg = compose_train(
        ["model=gpt2-small", f"model.checkpoint={tiny}", *FAST, f"data.source={sms_file}"], tmp_path
    )
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    text = str(err.value)
    assert f"checkpoint {tiny} does not match GPT-2 (emb_dim=768, n_layers=12" in text
    assert "wrong shape" in text and "wte.weight expected [50257, 768] found [50257, 32]" in text
    assert "the checkpoint looks like: emb_dim=32, n_layers=1" in text
    assert_no_heavy_work(tmp_path)


def fake_training_checkpoint(path: Path, num_classes: int = 2, **sizes: Any) -> Path:
    """What Lightning saves for TextClassifier, reduced to the parts a resume checks."""
    model = tiny_classifier(num_classes, **sizes)
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"num_classes": num_classes, "trainable": "last_block", "token": "last"},
        },
        path,
    )
    return path


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        (
            {"n_layers": 1},
            [
                "expected (this run, model=gpt2-tiny): n_layers=2, emb_dim=64",
                "found (the checkpoint): n_layers=1, emb_dim=64",
                "missing (16): trf_blocks.1.",
            ],
        ),
        (
            {"num_classes": 3},
            [
                "expected (this run, model=gpt2-tiny): n_layers=2, emb_dim=64, vocab_size=50257, "
                "context_length=1024, 2 classes",
                "found (the checkpoint): n_layers=2, emb_dim=64, vocab_size=50257, "
                "context_length=1024, 3 classes",
                "wrong shape (2): out_head.weight expected [2, 64] found [3, 64], "
                "out_head.bias expected [2] found [3]",
            ],
        ),
    ],
    ids=["other-size", "other-class-count"],
)
def test_resuming_a_checkpoint_of_another_model_names_expected_and_found(
    sizes: dict, expected: list[str], tmp_path: Path, sms_file: Path, no_model
) -> None:
    ckpt = fake_training_checkpoint(tmp_path / "other.ckpt", **sizes)
    cfg = compose_train([*TINY, f"data.source={sms_file}", f"ckpt_path={ckpt}"], tmp_path)
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    text = str(err.value)
    assert text.startswith(f"ckpt_path={ckpt} does not fit this run:")
    for line in expected:
        assert line in text
    assert_no_heavy_work(tmp_path)


# ------------------------------------------------------------------ 3. safe loading
@pytest.mark.parametrize("kind", ["torch.save", "raw pickle"])
def test_crafted_checkpoint_is_refused_and_runs_no_code(
    kind: str, tmp_path: Path, sms_file: Path, no_model
) -> None:
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    payload = {"state_dict": {}, "epoch": 0, "x": _Payload(marker)}
    if kind == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    cfg = compose_train([*TINY, f"data.source={sms_file}", f"ckpt_path={evil}"], tmp_path)
    with pytest.raises(CheckpointError, match=r"refusing to load checkpoint .*evil\.ckpt: it is not a plain"):
        train(cfg)
    assert_no_heavy_work(tmp_path)
    # Lightning's own loading path (trainer.fit(ckpt_path=...)) refuses it as well
    with pytest.raises(CheckpointError, match="torch.load\\(weights_only=True\\)"):
        SafeCheckpointIO().load_checkpoint(evil)
    assert not marker.exists()
    # the file really is armed: an unrestricted load runs its code
    loaded = torch.load(evil, weights_only=False) if kind == "torch.save" else pickle.loads(evil.read_bytes())
    loaded["x"].close()
    assert marker.exists()


def test_bundle_weights_are_read_as_safetensors_only(
    tmp_path: Path, bundles: dict[str, Path], capsys
) -> None:
    bundle, marker = tmp_path / "run" / "bundle", tmp_path / "pwned"
    shutil.copytree(bundles["last"] / "bundle", bundle)
    (bundle / "model.safetensors").write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=2))
    with pytest.raises(BundleError, match="model.safetensors is not a readable safetensors file"):
        load_bundle(bundle.parent)
    assert classify_main([str(bundle.parent), "hello"]) == 1
    assert "spam-classify: error:" in capsys.readouterr().err
    assert not marker.exists()


def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies half-way (a kill, a full disk) leaves the previous checkpoint intact."""
    io_, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    io_.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def dies_half_way(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"half a checkpoint")  # torch.save writes into the file atomic_write opened
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        io_.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(io_.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    callback = RNGState()
    torch.save({"rng": callback.state_dict()}, tmp_path / "rng.ckpt")
    import random

    import numpy as np

    expected = (torch.rand(3), random.random(), np.random.rand())
    callback.load_state_dict(torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


# ------------------------------------------------------------------ 4. classify input
@pytest.fixture(scope="module")
def clf(bundles: dict[str, Path]) -> Classifier:
    return Classifier(bundles["last"], batch_size=4)


def test_empty_and_whitespace_messages_name_the_message(clf: Classifier, bundles, capsys) -> None:
    for texts, number in ((["hello", ""], 2), (["", "x"], 1), (["a", "b", " \t\n\u3000"], 3)):
        with pytest.raises(ValueError, match=f"message {number} is empty or only whitespace"):
            clf.predict(texts)
    assert classify_main([str(bundles["last"]), "fine", "   "]) == 1
    err = capsys.readouterr().err
    assert "spam-classify: error: message 2 is empty or only whitespace" in err


def test_long_text_is_truncated_as_in_training(clf: Classifier, bundles) -> None:
    words = "WIN cash now call 0800 free prize claim your reward today".split()
    text = " ".join(words[i * 7 % len(words)] for i in range(12_000))[:50_000]
    assert len(text) == 50_000
    pred = clf.predict(text)[0]
    # the chapter's classify_review: encode, keep max_length tokens, pad, last position
    model, config = load_bundle(bundles["last"])
    ids = encode_texts([text])[0][: config["max_length"]]
    assert len(ids) == config["max_length"] == 16
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids]))[:, -1, :], dim=-1)[0]
    assert pred.label == config["class_names"][int(probs.argmax())]
    assert pred.probabilities == pytest.approx(dict(zip(config["class_names"], probs.tolist(), strict=True)), abs=1e-5)
    assert pred.text == text


WORLD = [
    "😀🎉 WIN a prize 🎁", "你好，你中奖了，请致电", "Привет! Вы выиграли приз", "مرحبا، لقد ربحت جائزة",
    "नमस्ते, आपने इनाम जीता", "👨‍👩‍👧‍👦🇯🇵", "e\u0301\u0301 combining", "\u200bzero width", "<|endoftext|>",
]


def test_emoji_and_non_latin_scripts(clf: Classifier, bundles, capsys) -> None:
    preds = clf.predict(WORLD)
    assert [p.text for p in preds] == WORLD
    for p in preds:
        assert p.label in ("ham", "spam") and sum(p.probabilities.values()) == pytest.approx(1.0)
    assert classify_main([str(bundles["last"]), *WORLD, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.split("\n") if line]
    assert [r["text"] for r in rows] == WORLD
    assert [r["label"] for r in rows] == [p.label for p in preds]


# ------------------------------------------------------------------ 5. fuzzing
# any code point, lone surrogates included (a Python str can hold them; tiktoken replaces them)
TEXT = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=200)


@FUZZ
@given(text=st.one_of(TEXT, st.sampled_from(WORLD), st.text(" \t\n\r\x0b\x0c\u3000\u2028", max_size=5)))
def test_fuzz_any_text_is_classified_or_named_empty(clf: Classifier, text: str) -> None:
    if not text.strip():
        with pytest.raises(ValueError, match="message 1 is empty or only whitespace"):
            clf.predict(text)
        return
    (pred,) = clf.predict(text)
    assert pred.text == text and pred.label in ("ham", "spam")
    assert 0.5 <= pred.probability <= 1.0


@pytest.fixture(scope="module")
def clf_first(bundles: dict[str, Path]) -> Classifier:
    return Classifier(bundles["first"], batch_size=4)


def run_cli(args: list[str], clf: Classifier) -> tuple[int, list[dict], str]:
    """``spam-classify ARGS --json`` in-process: (exit code, output rows, stderr).

    ``clf`` stands in for the bundle ARGS name, so each example costs a file read and a
    forward pass, not a model load; reading, streaming and printing are the real ones.
    """
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch("spam_lightning.inference.classify.Classifier", lambda *a, **k: clf),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        rc = classify_main([*args, "--json"])
    return rc, [json.loads(x) for x in out.getvalue().split("\n") if x], err.getvalue()


# one message per line: no \n or \r inside (the only line breaks a text file has); a BOM at the
# very start of a file is taken as an encoding mark, so none is generated
LINE_TEXT = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\n\r\ufeff"), min_size=1, max_size=60
)


@FUZZ
@given(
    messages=st.lists(LINE_TEXT.filter(str.strip), min_size=1, max_size=8),
    blanks=st.lists(st.sampled_from(["", "  ", "\t"]), max_size=3),
    crlf=st.booleans(),
)
def test_fuzz_text_file_one_prediction_per_line(
    messages: list[str], blanks: list[str], crlf: bool, clf_first, tmp_path_factory
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "messages.txt"
    newline = "\r\n" if crlf else "\n"
    path.write_bytes(newline.join([*blanks, *messages, *blanks]).encode("utf-8"))
    rc, rows, err = run_cli(["bundle", "--file", str(path)], clf_first)
    assert rc == 0, err
    assert [r["text"] for r in rows] == messages  # blank lines are not messages


CSV_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)  # quotes, commas, newlines


@FUZZ
@given(
    messages=st.lists(st.one_of(CSV_TEXT, st.sampled_from(['"quoted, with comma"', "a\nb", "x\r\ny", ""])), min_size=1, max_size=8),
    bom=st.booleans(),
)
def test_fuzz_csv_one_prediction_per_row_in_order(
    messages: list[str], bom: bool, clf_first, tmp_path_factory
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "messages.csv"
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Text", "id", "note"])  # first: a BOM must not rename it
        writer.writerows([text, i, "x,y"] for i, text in enumerate(messages))
    rc, rows, err = run_cli(["bundle", "--file", str(path)], clf_first)
    blank = [i for i, text in enumerate(messages) if not text.strip()]
    if blank:
        assert rc == 1 and f"message {blank[0] + 1} is empty or only whitespace" in err
        return
    assert rc == 0, err
    assert [r["text"] for r in rows] == messages


# ------------------------------------------------------------------ 2. interrupted runs
@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_same_seed_twice_gives_the_same_metrics(run_in_process, monkeypatch) -> None:
    """Twice in one process, with dropout drawing random numbers; the second run also shows
    what trainer.fit gets: weights-only loading through the safe, atomic checkpoint IO."""
    import lightning

    seen: dict[str, Any] = {}
    fit = lightning.Trainer.fit

    def spy(self, *args: Any, **kwargs: Any) -> Any:
        seen.update(weights_only=kwargs.get("weights_only"), io=self.strategy.checkpoint_io)
        return fit(self, *args, **kwargs)

    first = run_in_process(*DROPOUT)
    monkeypatch.setattr(lightning.Trainer, "fit", spy)
    second = run_in_process(*DROPOUT, fresh=True)
    assert first != second
    assert_same_run(first, second)
    assert seen["weights_only"] is True and isinstance(seen["io"], SafeCheckpointIO)


def check_killed(job: KilledRun, returncode: int, name: str = "SIGTERM") -> str:
    rc, output = job.result()
    assert job.signalled, output[-3000:]
    assert rc == returncode, output[-3000:]
    checkpoint = torch.load(job.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    if returncode == -signal.SIGKILL:  # nothing ran: epoch 1's end is what is left
        assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 10)
    else:  # SIGTERM: the very step it stopped at, mid-epoch 2 (10 batches per epoch)
        stopped = re.search(rf"{name}: stopped at epoch 2, step (\d+)\.", output)
        assert stopped, output[-3000:]
        assert checkpoint["epoch"] == 1 and 10 < checkpoint["global_step"] < 20
        assert checkpoint["global_step"] == int(stopped.group(1))
    assert not (job.run_dir / "metrics.json").exists()
    leftovers = [p.name for p in (job.run_dir / "checkpoints").iterdir() if p.suffix != ".ckpt"]
    assert not leftovers
    return output


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_sigterm_then_resume_ends_like_an_uninterrupted_run(
    background, run_in_process, sms_file, data_dir
) -> None:
    """SIGTERM: Lightning stops after the current batch, which is saved; the run exits 143 and
    prints how to resume. The resumed run rebuilds the frozen-trunk cache and continues from
    that very step, mid-epoch: weights, history and metrics equal an uninterrupted run's."""
    job = background["SIGTERM"]
    output = check_killed(job, 128 + signal.SIGTERM)
    assert "SIGTERM: stopped at epoch 2" in output and "Resume with:" in output
    assert "the resume continues from it" in output
    assert "`weights_only` was not set" not in output  # the full state saved: no Lightning notice
    assert f"hydra.run.dir={job.run_dir} ckpt_path=last" in output
    resumed = resume_in_process(job.run_dir, sms_file, data_dir)
    assert json.loads((resumed / "metrics.json").read_text())["trunk_cache"] is True
    assert_same_run(resumed, run_in_process())


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_ctrl_c_then_resume_ends_like_an_uninterrupted_run(
    background, run_in_process, sms_file, data_dir
) -> None:
    """Ctrl-C (SIGINT) as SIGTERM: the step saved, the resume command printed and in train.log,
    exit 130 (128 + SIGINT); the resume ends like an uninterrupted run."""
    job = background["SIGINT"]
    output = check_killed(job, 128 + signal.SIGINT, "SIGINT")
    assert "the resume continues from it" in output
    assert "`weights_only` was not set" not in output  # the full state saved: no Lightning notice
    resume = f"hydra.run.dir={job.run_dir} ckpt_path=last"
    log = (job.run_dir / "train.log").read_text(encoding="utf-8")
    assert resume in output and "SIGINT: stopped at epoch 2" in log and resume in log
    resumed = resume_in_process(job.run_dir, sms_file, data_dir)
    assert_same_run(resumed, run_in_process())


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(
    background, run_in_process, sms_file, data_dir
) -> None:
    """SIGKILL: no handler runs. Resuming restores weights, optimizer, loops, the shuffling
    generator, the chapter monitor's history and the random generators dropout draws from."""
    job = background["SIGKILL"]
    check_killed(job, -signal.SIGKILL)
    resumed = resume_in_process(job.run_dir, sms_file, data_dir, *DROPOUT)
    assert_same_run(resumed, run_in_process(*DROPOUT))


# ------------------------------------------------------------------ 4. classify: a 100k-line file
def test_classify_streams_100k_lines_in_bounded_memory(background, sms_file) -> None:
    job = background["classify"]
    returncode, peak_first, peak = job.result()
    assert returncode == 0, job.err.read_text()[-2000:]
    assert peak_first is not None, "no predictions before the input ended: not streamed"
    texts = sms_texts(sms_file)
    lines = job.out.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == 100_000
    for i in (0, 1, 5573, 5574, 99_999):  # in input order, one line per message
        label, prob, snippet = lines[i].split("\t")
        text = texts[i % len(texts)]
        assert label in ("ham", "spam") and 0.5 <= float(prob) <= 1.0
        assert snippet == (text if len(text) <= 60 else text[:57] + "...")
    assert peak < 1500, f"peak RSS {peak:.0f} MB"
    # ten times the input does not raise the peak (keeping 100k predictions would: ~60 MB)
    assert peak - peak_first < 32, (peak_first, peak)
