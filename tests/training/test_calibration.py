"""The operating point (issue 25 item 5): temperature scaling and ECE, the threshold for a
target false-positive rate, and both in the bundle, spam-classify and spam-serve."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from spam_lightning import calibration


def test_tiny_run_writes_the_operating_point(tiny_run) -> None:
    cfg, metrics, run = tiny_run("threshold.max_fpr=0.05")
    print(json.dumps({k: metrics[k] for k in metrics if "ece" in k or k.endswith("_op") or k in ("temperature", "threshold")}, indent=1))
    print(json.loads((run / "bundle" / "bundle.json").read_text())["operating_point"])
    assert (run / "reliability.png").is_file()
