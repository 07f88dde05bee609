"""Bundles keep what trained (issue 23): the base is rebuilt from ``bundle.json``'s ``base`` and
checked by digest; ``spam-export`` makes the self-contained bundle, which predicts the same."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _weights import hf_weights
from safetensors import safe_open

from spam_lightning.inference.bundle import export_main
from spam_lightning.inference.classify import main as classify_main

MESSAGES = ["You won a free prize, call now to claim", "see you at lunch tomorrow?"]
SCRIPTS = Path(sys.executable).parent


def keys(bundle: Path) -> set[str]:
    with safe_open(str(bundle / "model.safetensors"), framework="pt") as fh:
        return set(fh.keys())


def classify(folder: Path, capsys: pytest.CaptureFixture) -> list[dict]:
    capsys.readouterr()  # what ran before
    assert classify_main([str(folder), *MESSAGES, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def export(run: Path, out: Path, console_script: bool) -> None:
    """``spam-export RUN OUT``: once as the installed console script, else in-process (faster)."""
    if console_script:
        proc = subprocess.run([str(SCRIPTS / "spam-export"), str(run), str(out)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    else:
        assert export_main([str(run), str(out)]) == 0


@pytest.mark.parametrize("trainable", ["last_block", pytest.param("lora", marks=pytest.mark.slow)])
def test_bundle_keeps_the_trained_tensors_and_predicts_as_its_export(
    tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture, trainable: str
) -> None:
    _, _, run = tiny_run(f"trainable={trainable}")
    bundle = run / "bundle"
    config = json.loads((bundle / "bundle.json").read_text())
    assert config["base"]["source"] == "random" and config["base"]["classifier"]["trainable"] == trainable
    kept = keys(bundle)
    assert "tok_emb.weight" not in kept and any(k.startswith("out_head.") for k in kept)
    if trainable == "lora":  # the adapters, unmerged: the frozen Linear weights are not kept
        assert "trf_blocks.0.att.W_query.lora.A" in kept and "trf_blocks.0.att.W_query.linear.weight" not in kept
    else:
        assert {k.split(".")[1] for k in kept if k.startswith("trf_blocks.")} == {"1"}
    export(run, tmp_path / "export", console_script=trainable == "last_block")
    exported = json.loads((tmp_path / "export" / "bundle.json").read_text())
    assert "base" not in exported and "tok_emb.weight" in keys(tmp_path / "export")
    assert not any(".lora." in k for k in keys(tmp_path / "export"))  # merged
    assert (bundle / "model.safetensors").stat().st_size < (tmp_path / "export" / "model.safetensors").stat().st_size / 2
    assert classify(run, capsys) == classify(tmp_path / "export", capsys)


def test_a_bundle_whose_base_is_gone_or_changed_is_refused(
    tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = hf_weights(tmp_path / "model.safetensors", seed=0)
    _, _, run = tiny_run("model.weights=pretrained", f"model.checkpoint={weights}")
    assert json.loads((run / "bundle" / "bundle.json").read_text())["base"]["path"] == str(weights)

    def spam_classify() -> tuple[int, str]:
        capsys.readouterr()
        code = classify_main([str(run), MESSAGES[0]])
        return code, capsys.readouterr().err

    assert spam_classify()[0] == 0
    hf_weights(weights, seed=1)  # another file at the recorded path
    code, err = spam_classify()
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "sha256" in err and f"spam-export {run}" in err
    weights.unlink()
    code, err = spam_classify()
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert str(weights) in err and "needs its base" in err and "spam-export" in err


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_trainable_all_bundles_everything(tiny_run) -> None:
    _, _, run = tiny_run("trainable=all")
    assert "base" not in json.loads((run / "bundle" / "bundle.json").read_text())
    assert "tok_emb.weight" in keys(run / "bundle")
