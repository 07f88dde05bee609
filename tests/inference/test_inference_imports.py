"""Inference stands alone: no Lightning, no Hydra, and `--help` without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = ("lightning", "pytorch_lightning", "hydra")

PREDICT = f"""
FORBIDDEN = {FORBIDDEN!r}
import json, sys
import torch
from spam_lightning.inference.bundle import save_bundle
from spam_lightning.inference.classify import Classifier, main
from spam_lightning.inference.serve import create_app
from spam_lightning.model.classifier import make_classifier
from spam_lightning.model.gpt import GPTModel
from spam_lightning.model.sizes import MODEL_CONFIGS

torch.manual_seed(0)
model = make_classifier(GPTModel(MODEL_CONFIGS["gpt2-tiny"]), num_classes=2)
save_bundle(sys.argv[1], model, class_names=["ham", "spam"], token="last", max_length=16,
            padding="longest", pad_token_id=50256)
label = Classifier(sys.argv[1]).predict("hello")[0].label
create_app(sys.argv[1])
assert main([sys.argv[1], "hello"]) == 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
print(json.dumps({{"label": label, "loaded": loaded}}))
"""


def test_inference_entry_points_import_no_lightning_nor_hydra(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PREDICT, str(tmp_path / "run")],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["label"] in ("ham", "spam")
    assert result["loaded"] == []


@pytest.mark.parametrize("command", ["classify", "serve"])
def test_help_does_not_import_torch(command: str) -> None:
    code = (
        "import sys\n"
        f"from spam_lightning.inference.{command} import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'hydra')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert f"usage: spam-{command}" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"
