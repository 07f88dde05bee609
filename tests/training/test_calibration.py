"""The operating point (issue 25 item 5): temperature scaling and its ECE, the threshold for a
target false-positive rate, and both stored in the bundle and applied by spam-classify, the
Python API and spam-serve (each can be told not to)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _compose import compose_train
from fastapi.testclient import TestClient

from spam_lightning import calibration
from spam_lightning.inference.bundle import CONFIG
from spam_lightning.inference.classify import Classifier
from spam_lightning.inference.classify import main as classify_main
from spam_lightning.inference.serve import create_app
from spam_lightning.training.checks import ConfigError

MESSAGES = [
    "You are a winner you have been specially selected to receive $1000 cash or a $2000 award.",
    "Hey, just wanted to check if we're still on for dinner tonight? Let me know!",
    "URGENT! Your mobile number has won a £2000 prize. Call 09061701461 to claim.",
    "ok", "Sorry, I'll call later",
    "FREE entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121",
    "Did you catch the bus? Are you frying an egg? Did you make a tea?",
    "Congratulations! You've won a free ticket to the Bahamas. Reply WIN now",
]


def overconfident(n: int, sharpen: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from ``sigmoid(z)`` and a model that reports ``sigmoid(sharpen * z)``: right
    as often as a calibrated one, ``sharpen`` times too sure of itself."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g) * 2
    labels = (torch.rand(n, generator=g) < torch.sigmoid(z)).long()
    p = torch.sigmoid(sharpen * z)
    return torch.stack([1 - p, p], dim=1), labels


def grid_nll(probs: torch.Tensor, labels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The mean NLL of ``softmax(log p / T)`` for each T of ``grid``, in one batched pass."""
    z = calibration.log_probs(probs)[None] / grid[:, None, None]
    return (z.logsumexp(-1) - z[:, torch.arange(len(labels)), labels]).mean(1)


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model() -> None:
    val_p, val_y = overconfident(4000, 4.0, seed=1)
    test_p, test_y = overconfident(4000, 4.0, seed=2)
    op, m = calibration.fit(val_p, val_y, test_p, test_y)
    # the NLL's minimum is where the fit says (checked on a grid, independently of L-BFGS) ...
    grid = torch.arange(1.0, 8.0, 0.01, dtype=torch.float64)
    best = float(grid[grid_nll(val_p, val_y, grid).argmin()])
    assert op.temperature == pytest.approx(best, abs=0.01)
    assert 3.4 < op.temperature < 4.6  # ... near the 4 the model was sharpened by
    for split in ("val", "test"):
        assert m[f"{split}_ece"] > 0.1, m  # a model 4x too sure of itself is far from calibrated
        assert m[f"{split}_ece_calibrated"] < m[f"{split}_ece"] / 4, m
    # ECE by hand (15 equal-width bins of the top-label confidence), against torchmetrics'
    conf, pred = test_p.max(1)
    which = torch.clamp((conf * 15).ceil().long() - 1, 0, 14)
    by_hand = sum(abs(float((pred[which == b] == test_y[which == b]).float().mean() - conf[which == b].mean()))
                  * int((which == b).sum()) / len(test_y) for b in range(15) if (which == b).any())
    assert m["test_ece"] == pytest.approx(by_hand, abs=1e-5)
    # temperature never changes the argmax; the argmax point's rates are the plain ones
    assert torch.equal(calibration.apply(test_p, op.temperature).argmax(1), test_p.argmax(1))
    assert m["threshold"] is None
    assert m["test_accuracy_op"] == pytest.approx(float((pred == test_y).float().mean()))


@pytest.mark.parametrize("max_fpr", [0.0, 0.01, 0.1, 0.5])
def test_threshold_is_the_lowest_with_at_most_max_fpr(max_fpr: float) -> None:
    probs, labels = overconfident(500, 1.0, seed=3)
    t = calibration.choose_threshold(probs[:, 1], labels, max_fpr)
    rates = calibration.binary_rates(calibration.decide(probs, t), labels)
    assert rates["fpr"] <= max_fpr
    # every lower candidate (each validation score) lets more false positives through
    negatives = probs[labels == 0, 1]
    lower = [float(s) for s in probs[:, 1] if float(s) < t]
    assert all(float((negatives >= s).float().mean()) > max_fpr for s in lower)


def test_threshold_problems_name_the_option() -> None:
    assert calibration.threshold_problems(None, 3) == []
    assert calibration.threshold_problems(0.01, 2) == []
    for value, count in ((1.5, 2), ("low", 2), (True, 2), (0.01, 3)):
        (line,) = calibration.threshold_problems(value, count)
        assert line.startswith(f"threshold.max_fpr={value!r}" if count == 2 else "threshold.max_fpr=0.01")
        assert "null" in line


def test_calibration_options_are_checked_before_work(tmp_path: Path) -> None:
    from spam_lightning.train import train

    cfg = compose_train(["calibration.bins=0", "calibration.temperature=maybe", "threshold.max_fpr=2",
                         "paths.data_dir=/nonexistent"], tmp_path)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value).splitlines() == [
        "Invalid configuration:", "  - calibration.temperature='maybe': must be true or false",
        "  - calibration.bins=0: the number of ECE bins, an integer >= 1 (15)",
        "  - threshold.max_fpr=2: a false-positive rate in [0, 1) such as 0.01, or null for the argmax "
        "(the book)"]


def labels_of(capsys: pytest.CaptureFixture[str], run: Path, *options: str) -> list[str]:
    capsys.readouterr()
    assert classify_main([str(run), *MESSAGES, "--json", *options]) == 0
    return [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]


def test_a_run_with_a_threshold_predicts_by_it_everywhere(tiny_run, capsys) -> None:
    cfg, metrics, run = tiny_run("threshold.max_fpr=0.2")
    op = json.loads((run / "bundle" / CONFIG).read_text())["operating_point"]
    assert op["temperature"] == metrics["temperature"] > 0 and op["max_fpr"] == 0.2
    assert op["threshold"] == metrics["threshold"] is not None
    assert metrics["val_fpr_op"] <= 0.2 and 0 <= metrics["test_fpr_op"] <= 1
    assert {"val_ece", "val_ece_calibrated", "test_ece", "test_ece_calibrated"} <= set(metrics)
    assert metrics["val_ece_calibrated"] <= metrics["val_ece"] + 1e-6  # T minimizes the val NLL
    assert (run / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a threshold that splits these messages otherwise than the argmax: the bundle's from now on
    clf = Classifier(run, raw=True)
    raw = clf.predict_proba(MESSAGES)
    t = op["temperature"]
    p = calibration.apply(raw, t)[:, 1].sort().values
    argmax_spam = int((raw[:, 1] > raw[:, 0]).sum())
    cut = next(k for k in range(1, len(p)) if len(p) - k != argmax_spam and p[k - 1] < p[k])
    threshold = float(p[cut - 1] + p[cut]) / 2
    config = json.loads((run / "bundle" / CONFIG).read_text())
    config["operating_point"]["threshold"] = threshold
    (run / "bundle" / CONFIG).write_text(json.dumps(config))

    calibrated = Classifier(run)
    probs = calibrated.predict_proba(MESSAGES)
    assert torch.allclose(probs, calibration.apply(raw, t))  # the API applies the temperature
    by_threshold = ["spam" if float(q) >= threshold else "ham" for q in probs[:, 1]]
    by_argmax = ["spam" if float(r[1]) > float(r[0]) else "ham" for r in raw]
    assert by_threshold != by_argmax
    assert [x.label for x in calibrated.predict(MESSAGES)] == by_threshold
    assert labels_of(capsys, run) == by_threshold
    assert labels_of(capsys, run, "--raw") == by_threshold  # raw probabilities, the same decisions
    assert labels_of(capsys, run, "--threshold", "0.5") == by_argmax  # the override
    assert labels_of(capsys, run, "--raw", "--threshold", "0.5") == by_argmax  # as before calibration
    capsys.readouterr()
    assert classify_main([str(run), MESSAGES[0], "--json", "--raw"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["probabilities"]["spam"] == pytest.approx(float(raw[0, 1]), abs=1e-6)

    for options, expected in (({}, by_threshold), ({"threshold": 0.5}, by_argmax)):
        with TestClient(create_app(run, **options), base_url="http://127.0.0.1") as client:
            health = client.get("/api/health").json()
            assert health["threshold"] == options.get("threshold", threshold)
            assert health["temperature"] == t
            page = client.get("/").text
            assert (f"Labelled spam when its probability is at least {threshold:.4g}." in page) == (
                not options)
            body = client.post("/api/classify", json={"texts": MESSAGES}).json()
            assert [x["label"] for x in body["predictions"]] == expected


def test_max_fpr_on_three_classes_is_refused_before_training(tmp_path: Path) -> None:
    from spam_lightning.train import train

    files = {}
    for split, n in (("train", 24), ("validation", 9), ("test", 9)):
        rows = [f"message {i} about {'abc'[i % 3]},{'abc'[i % 3]}" for i in range(n)]
        files[split] = tmp_path / f"{split}.csv"
        files[split].write_text("text,label\n" + "\n".join(rows) + "\n")
    data = [f"data.{s}={p}" for s, p in files.items()]
    base = ["data=csv", "model=gpt2-tiny", "logger=none", "trainer.enable_progress_bar=false",
            "threshold.max_fpr=0.01", *data]
    # the classes come from the data: refused once it is read, before the first step
    cfg = compose_train(base, tmp_path)
    with pytest.raises(ConfigError, match=r"threshold\.max_fpr=0\.01: a threshold needs two classes"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    # named in the config: refused before the data is read
    cfg = compose_train([*base, "data.class_names=[a,b,c]", "paths.data_dir=/nonexistent"], tmp_path)
    with pytest.raises(ConfigError, match=r"Invalid configuration:\n  - threshold\.max_fpr=0\.01"):
        train(cfg)


def test_bundles_without_an_operating_point_load_as_before(tmp_path: Path) -> None:
    from spam_lightning.inference.bundle import BundleError, operating_point

    assert operating_point({"num_classes": 2}) == calibration.OperatingPoint(1.0, None, None)
    probs = torch.tensor([[0.3, 0.7]])
    assert calibration.apply(probs, 1.0) is probs
    for bad, field in (({"temperature": 0}, "temperature"), ({"temperature": math.inf}, "temperature"),
                       ({"threshold": 2}, "threshold"), ("x", "operating_point")):
        with pytest.raises(BundleError, match=field):
            operating_point({"num_classes": 2, "operating_point": bad})


def test_summary_shows_the_operating_point_where_jobs_have_it(tmp_path: Path) -> None:
    import yaml

    from spam_lightning.sweeps.summary import summarize

    jobs = [("a", 1, {"threshold": 0.9, "test_precision_op": 1.0, "test_recall_op": 0.5, "test_fpr_op": 0.0}),
            ("a", 2, {"threshold": 0.8, "test_precision_op": 0.9, "test_recall_op": 0.7, "test_fpr_op": 0.01}),
            ("b", 1, {"threshold": None, "test_precision_op": 0.8, "test_recall_op": 0.9, "test_fpr_op": 0.02}),
            ("c", 1, {})]  # a run from before calibration, or a baseline
    for job, (trainable, seed, op) in enumerate(jobs):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"trainable={trainable}", f"seed={seed}"]))
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
        (folder / "metrics.json").write_text(json.dumps({"test_accuracy": 0.9, "trainable": trainable,
                                                         "seed": seed, **op}))
    table = summarize(tmp_path, write=False).set_index("Trainable layers")
    assert list(table.loc["a", ["Test precision", "Test recall", "Test FPR", "Threshold"]]) == [
        "95.00 ± 7.07%", "60.00 ± 14.14%", "0.50 ± 0.71%", "0.8–0.9"]
    assert list(table.loc["b", ["Test FPR", "Threshold"]]) == ["2.00%", "argmax"]
    assert list(table.loc["c", ["Test FPR", "Threshold"]]) == ["—", "—"]
    for folder in tmp_path.iterdir():  # no job with an operating point: no such columns
        metrics = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items()
                                                         if k != "threshold" and not k.endswith("_op")}))
    assert "Test FPR" not in summarize(tmp_path, write=False).columns
