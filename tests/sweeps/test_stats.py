"""Paired comparisons and intervals (issue 25): ``predictions.csv`` in every run, McNemar's exact
test against the formula written out, bootstrap intervals, ``scripts/compare.py`` as run."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spam_lightning.sweeps.stats import StatsError, accuracy_interval, compare, mcnemar_exact

REPO = Path(__file__).resolve().parents[2]


def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar by hand: twice the binomial tail of the smaller count, at most 1."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n) if n else 1.0


def predictions(right: list[bool], labels: list[str]) -> pd.DataFrame:
    wrong = {"ham": "spam", "spam": "ham"}
    return pd.DataFrame({"split": "test", "row": range(len(right)), "label": labels,
                         "predicted": [lab if r else wrong[lab] for r, lab in zip(right, labels, strict=True)]})


def test_mcnemar_on_known_flips() -> None:
    labels = ["ham", "spam"] * 50
    a = [True] * 100
    b = [True] * 100
    for i in (3, 7):  # only A right on two messages
        b[i] = False
    for i in range(10, 22):  # only B right on twelve
        a[i] = False
    result = compare(predictions(a, labels), predictions(b, labels))
    assert (result.only_a, result.only_b, result.n) == (2, 12, 100)
    assert result.p_value == pytest.approx(exact_mcnemar(2, 12), rel=1e-12)
    assert result.verdict.startswith("B better, p = 0.0129")
    assert sorted(result.flips["row"]) == [3, 7, *range(10, 22)]
    assert compare(predictions(a, labels), predictions(a, labels)).verdict == "within noise (p = 1)"
    assert mcnemar_exact(5, 6) == pytest.approx(exact_mcnemar(5, 6)) and mcnemar_exact(5, 6) > 0.05
    with pytest.raises(StatsError, match="did not predict the same test messages"):
        compare(predictions(a, labels), predictions(a[:50], labels[:50]))


def test_accuracy_interval_covers_the_accuracy_and_narrows_with_more_messages() -> None:
    rng = np.random.default_rng(0)
    small, large = (rng.random(n) < 0.9 for n in (100, 2000))
    low, high = accuracy_interval(small)
    normal = 2 * 1.96 * math.sqrt(small.mean() * (1 - small.mean()) / 100)  # the textbook width
    assert low < small.mean() < high and abs((high - low) - normal) < 0.25 * normal
    low2, high2 = accuracy_interval(large)
    assert high2 - low2 < (high - low) / 2  # ~ 1/sqrt(n)
    assert accuracy_interval(np.ones(10)) == (1.0, 1.0)


def test_runs_write_predictions_and_compare_py_tests_them(tiny_run, tmp_path: Path) -> None:
    _, metrics_a, run = tiny_run()
    run_a = shutil.copytree(run, tmp_path / "a")  # tiny_run trains in the same folder each time
    _, _, run_b = tiny_run("optimizer.lr=1e-3")
    with (run_a / "predictions.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    test = [r for r in rows if r["split"] == "test"]
    assert {r["split"] for r in rows} == {"val", "test"} and all(r["text"] for r in rows)
    for r in rows:
        probs = {"ham": float(r["p_ham"]), "spam": float(r["p_spam"])}
        assert abs(sum(probs.values()) - 1) < 1e-5 and r["predicted"] == max(probs, key=probs.get)
    assert sum(r["predicted"] == r["label"] for r in test) / len(test) == pytest.approx(metrics_a["test_accuracy"])
    right = {}
    for name, run in (("a", run_a), ("b", run_b)):
        with (run / "predictions.csv").open(newline="", encoding="utf-8") as fh:
            right[name] = {r["row"]: r["predicted"] == r["label"] for r in csv.DictReader(fh) if r["split"] == "test"}
    only_a = sum(right["a"][k] and not right["b"][k] for k in right["a"])
    only_b = sum(right["b"][k] and not right["a"][k] for k in right["a"])
    assert only_a + only_b > 0  # the two learning rates disagree somewhere: a real test
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "compare.py"), str(run_a), str(run_b)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"only A right: {only_a}, only B right: {only_b}" in proc.stdout
    assert f"McNemar exact p = {exact_mcnemar(only_a, only_b):.4g}" in proc.stdout
    assert f"A: {metrics_a['test_accuracy']:.2%} [95% CI" in proc.stdout
    missing = subprocess.run([sys.executable, str(REPO / "scripts" / "compare.py"), str(run_a), str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "predictions.csv: no such file" in missing.stderr
    assert json.loads((run_a / "metrics.json").read_text())["test_accuracy"] == metrics_a["test_accuracy"]


def test_summary_rows_get_intervals_and_verdicts_against_the_first(tmp_path: Path) -> None:
    """Three rows x three seeds, written as jobs write them: the better row is called better,
    the equal one within noise, and every interval holds its row's mean."""
    import yaml

    from spam_lightning.sweeps.summary import summarize

    rng = np.random.default_rng(1)
    labels = rng.choice(["ham", "spam"], size=300)
    rates = {"last_layer": 0.80, "last_block": 0.80, "all": 0.95}
    for job, (trainable, rate) in enumerate((t, r) for t, r in rates.items() for _ in range(3)):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
            [f"trainable={trainable}", "model.checkpoint=/base.safetensors", f"seed={job}"]))
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": job}))
        right = (rng.random(300) < rate).tolist()
        predictions(right, list(labels)).to_csv(folder / "predictions.csv", index=False)
        (folder / "metrics.json").write_text(json.dumps({
            "test_accuracy": float(np.mean(right)), "trainable": trainable, "seed": job}))
    table = summarize(tmp_path).set_index("Trainable layers")
    assert list(table["vs row 1"]).count("baseline") == 1 and table.loc["last_layer", "vs row 1"] == "baseline"
    assert table.loc["last_block", "vs row 1"].startswith("within noise (")
    assert table.loc["all", "vs row 1"].startswith("better (+")
    for name, row in table.iterrows():
        low, high = (float(x) for x in row["Test acc 95% CI"].strip("[]").split(", "))
        mean = float(row["Test acc"].split(" ")[0])
        assert low < mean < high and high - low < 12, name  # 900 predictions: a few points wide
    assert "Test acc 95% CI" in (tmp_path / "summary.md").read_text()
    # an override every row shares (the sweep's base checkpoint) is not part of the row labels
    assert list(table["Config"]) == ["trainable=last_layer", "trainable=last_block", "trainable=all"]
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"  # the intervals, drawn
