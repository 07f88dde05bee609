"""End-to-end: `python train.py` on the tiny model, its run folder, the classify CLI (issue 4)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from spam_lightning.calibration import apply as apply_temperature
from spam_lightning.data.tokens import collate, encode_texts
from spam_lightning.inference.bundle import load_bundle
from spam_lightning.inference.classify import Classifier
from spam_lightning.inference.classify import main as classify_main
from spam_lightning.training.callbacks import load_checkpoint_safely

REPO = Path(__file__).resolve().parents[2]

TINY = [
    "model=gpt2-tiny",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=12",
    "eval_freq=5",
    "eval_iter=2",
    "trainer.enable_progress_bar=false",
]


def run_train(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"train.py failed:\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, sms_file) -> tuple[Path, str]:
    """One real training run of the tiny model on the real SMS data, shared by the tests below."""
    work = tmp_path_factory.mktemp("tiny_run")
    run_dir = work / "run"
    proc = run_train(
        [*TINY, f"data.source={sms_file}", f"paths.data_dir={work / 'data'}", f"hydra.run.dir={run_dir}"],
        cwd=work,
    )
    (work / "stderr.txt").write_text(proc.stderr, encoding="utf-8")  # for the quiet-run test
    return run_dir, proc.stdout


def test_run_folder_has_every_artifact(tiny_run):
    run_dir, _ = tiny_run
    m = json.loads((run_dir / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        assert 0.0 <= m[f"{split}_accuracy"] <= 1.0
        assert torch.isfinite(torch.tensor(m[f"{split}_loss"]))
    # validation and test: the full sets, each example once; training: as the chapter measures
    # it, the shuffled training loader (130 batches of 8, the last 5 messages dropped)
    assert (m["train_count"], m["val_count"], m["test_count"]) == (1040, 149, 300)
    assert m["examples_seen"] == m["global_step"] * 8 == 12 * 8
    assert m["max_length"] == 120
    assert m["num_batches"] == {"train": 130, "val": 19, "test": 38}
    assert (m["model"], m["weights"], m["trainable"], m["token"], m["seed"]) == (
        "gpt2-tiny", "random", "last_block", "last", 123,
    )
    assert m["training_seconds"] > 0
    assert (run_dir / "config.yaml").read_text().count("gpt2-tiny") >= 1
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    for name in ("loss-plot", "accuracy-plot"):
        for ext in ("pdf", "png"):
            assert (run_dir / f"{name}.{ext}").stat().st_size > 1000
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "bundle" / "model.safetensors").is_file()
    cfg = json.loads((run_dir / "bundle" / "bundle.json").read_text())
    assert cfg["max_length"] == 120 and cfg["token"] == "last" and cfg["class_names"] == ["ham", "spam"]


def test_tensorboard_events(tiny_run):
    run_dir, _ = tiny_run
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    tags: set[str] = set()
    images: set[str] = set()
    for ev in events:
        acc = EventAccumulator(str(ev), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["tensors"])
        images |= set(acc.Tags()["images"])
        if "test/misclassified/text_summary" in acc.Tags()["tensors"]:
            text = acc.Tensors("test/misclassified/text_summary")[0].tensor_proto.string_val[0].decode()
            assert "| true | predicted |" in text and ("| ham |" in text or "| spam |" in text)
    # the dashboards: confusion matrix, precision-recall curve, misclassified messages, hparams
    assert "test/confusion_matrix" in images
    assert "test/pr_curve_spam" in tags
    assert "test/misclassified/text_summary" in tags
    for tag in (
        "train/loss_step", "val/loss", "val/acc", "train/acc", "examples_seen",
        "chapter/train_loss", "chapter/val_acc", "final/test_accuracy",
    ):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert any(t.startswith("lr-") for t in tags)
    assert "_hparams_/session_start_info" in tags or any("hparams" in t for t in tags), sorted(tags)


def test_chapter_printouts(tiny_run):
    _, stdout = tiny_run
    assert re.search(r"^Ep 1 \(Step 000000\): Train loss \d+\.\d{3}, Val loss \d+\.\d{3}$", stdout, re.M)
    assert re.search(r"^Ep 1 \(Step 000005\): Train loss \d+\.\d{3}, Val loss \d+\.\d{3}$", stdout, re.M)
    assert re.search(
        r"^Training accuracy: \d+\.\d\d% \| Validation accuracy: \d+\.\d\d%$", stdout, re.M
    )
    for title in ("Training", "Validation", "Test"):
        assert re.search(rf"^{title} accuracy: \d+\.\d\d%$", stdout, re.M)
        assert re.search(rf"^{title} loss: \d+\.\d{{3}}$", stdout, re.M)
    assert re.search(r"^Training completed in \d+\.\d\d minutes\.$", stdout, re.M)


MESSAGES = [
    "You are a winner you have been specially selected to receive $1000 cash or a $2000 award.",
    "Hey, just wanted to check if we're still on for dinner tonight? Let me know!",
    "URGENT! Call 09061701461 to claim your prize",
]


def test_classify_cli_agrees_with_module(tiny_run):
    run_dir, _ = tiny_run
    # the installed console script, as a user runs it
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "spam-classify"), str(run_dir), *MESSAGES, "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == MESSAGES
    # the module's own predictions: the last checkpoint's weights, the chapter's preprocessing
    ckpt = load_checkpoint_safely(run_dir / "checkpoints" / "last.ckpt")  # tensors shared with the bundle put back
    model, cfg = load_bundle(run_dir)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)  # the checkpoint keeps what trained
    assert not unexpected and {f"model.{k}" for k in missing} == set(ckpt["frozen_base"]["shapes"])
    ids = encode_texts(MESSAGES, max_length=120, context_length=1024)
    batch = collate(ids, padding="longest", max_length=120, pad_token_id=50256)
    with torch.no_grad():
        probs = torch.softmax(model(batch["input_ids"])[:, -1, :], dim=-1)
    expected = [cfg["class_names"][i] for i in probs.argmax(-1).tolist()]
    assert [r["label"] for r in rows] == expected
    # the reported probabilities carry the run's temperature (the argmax is the same)
    calibrated = apply_temperature(probs, cfg["operating_point"]["temperature"])
    for r, p in zip(rows, calibrated, strict=True):
        assert r["label"] in ("ham", "spam")
        assert abs(r["probability"] - float(p.max())) < 1e-4


def test_classify_plain_output_and_file(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    f = tmp_path / "msgs.txt"
    f.write_text("\n".join(MESSAGES) + "\n\n")
    assert classify_main([str(run_dir), "--file", str(f)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3  # the blank line is not a message
    for line in lines:
        label, prob, _ = line.split("\t")
        assert label in ("ham", "spam") and 0.5 <= float(prob) <= 1.0
    csv_file = tmp_path / "msgs.csv"
    csv_file.write_text('id,Text\n1,hello there\n2,"WIN cash, now"\n')
    assert classify_main([str(run_dir), "--file", str(csv_file), "--json"]) == 0
    got = [json.loads(x)["label"] for x in capsys.readouterr().out.splitlines()]
    assert got == [p.label for p in Classifier(run_dir).predict(["hello there", "WIN cash, now"])]


def test_classify_missing_run_folder(tmp_path, capsys):
    assert classify_main([str(tmp_path / "nope"), "hi"]) == 1
    assert "Run folder not found" in capsys.readouterr().err
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "bundle.json").write_text("{}")
    assert classify_main([str(tmp_path), "hi"]) == 1
    assert "model.safetensors is missing" in capsys.readouterr().err


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    points = []
    for event in sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            points += [(e.step, e.value) for e in acc.Scalars(tag)]
    return points


def test_tensorboard_chapter_curves_are_the_evaluations_at_their_steps(tiny_run):
    """One point per evaluation, at the step the printout names (eval_freq=5 over 12 batches:
    steps 0, 5, 10; the epoch's accuracies after its last batch, step 11), with its value; not
    the last evaluation repeated every `log_every_n_steps`."""
    run_dir, stdout = tiny_run
    printed = re.findall(r"^Ep 1 \(Step (\d+)\): Train loss (\S+), Val loss (\S+)$", stdout, re.M)
    assert [int(s) for s, _, _ in printed] == [0, 5, 10]
    for tag, column in (("chapter/train_loss", 1), ("chapter/val_loss", 2)):
        points = _scalars(run_dir, tag)
        assert [step for step, _ in points] == [0, 5, 10], (tag, points)
        assert [f"{v:.3f}" for _, v in points] == [row[column] for row in printed], tag
    (accuracies,) = re.findall(r"^Training accuracy: (\S+)% \| Validation accuracy: (\S+)%$",
                               stdout, re.M)
    for tag, shown in (("chapter/train_acc", accuracies[0]), ("chapter/val_acc", accuracies[1])):
        ((step, value),) = _scalars(run_dir, tag)
        assert (step, f"{value * 100:.2f}") == (11, shown), tag


def test_train_log_holds_the_lines_the_terminal_shows(tiny_run):
    """The chapter's printout goes to train.log too (the terminal's lines stay as printed)."""
    run_dir, stdout = tiny_run
    log = (run_dir / "train.log").read_text(encoding="utf-8")
    shown = [line for line in stdout.splitlines()
             if line.startswith(("Ep 1 (Step", "Training accuracy: ", "Training completed in "))
             or re.match(r"^(Training|Validation|Test) (accuracy|loss): ", line)]
    assert len(shown) == 3 + 1 + 1 + 6, stdout
    for line in shown:
        assert f"- {line}\n" in log, line


def test_a_run_prints_no_third_party_notices(tiny_run):
    """Lightning's cloud tips and its own deprecation warning are not a user's concern (issue 29,
    item 9; spam_lightning/quiet.py); Lightning's notices about the run itself still show."""
    run_dir, stdout = tiny_run
    stderr = (run_dir.parent / "stderr.txt").read_text(encoding="utf-8")
    for text in ("💡", "Tip:", "litlogger", "litmodels", "is deprecated", "weights_only"):
        assert text not in stdout + stderr, text
    assert "GPU available: " in stderr and "`Trainer.fit` stopped: `max_epochs=1` reached." in stderr


def test_pip_install_build_folder_is_ignored():
    """`pip install .` leaves build/ in the checkout: git ignores it."""
    proc = subprocess.run(["git", "check-ignore", "build/lib/spam_lightning/train.py"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "build/lib/spam_lightning/train.py"
