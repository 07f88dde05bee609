"""A tiny random Qwen3 and Llama 3.2 train, resume, cache and classify through the same commands
as GPT-2 (issue 27): the chapter's options on the decoder family, unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_decoders import tokenizer, write_tiny_decoder

from spam_lightning.inference.bundle import export_main
from spam_lightning.inference.classify import Classifier
from spam_lightning.model.classifier import TRAINABLE, first_trainable_block
from spam_lightning.training.checks import ConfigError, TokenizerError, validate_config

TEXTS = ["WIN a FREE prize! Call now", "see you at dinner", "ok"]


def history(run: Path) -> dict:
    return json.loads((run / "history.json").read_text())


def test_tiny_qwen3_trains_resumes_and_classifies(tiny_run) -> None:
    """The README's smoke command in-process: trains (delta bundle on the seeded random base),
    resumes from last.ckpt, classifies with the bundle's own preprocessing."""
    _, first, run = tiny_run("model=qwen3-tiny")
    assert first["model"] == "qwen3-tiny" and first["token"] == "last" and first["global_step"] == 3
    bundle = json.loads((run / "bundle" / "bundle.json").read_text())
    assert bundle["kind"] == "decoder" and bundle["tokenizer"] == "gpt2"
    assert bundle["base"]["source"] == "random" and bundle["model"]["arch"] == "qwen3"
    _, second, _ = tiny_run("model=qwen3-tiny", "ckpt_path=last", "trainer.max_epochs=2")
    assert second["epochs"] == 2 and second["global_step"] == 6
    clf = Classifier(run)
    probs = clf.predict_proba(TEXTS)
    one_by_one = torch.cat([clf.predict_proba([t]) for t in TEXTS])
    torch.testing.assert_close(probs, one_by_one, atol=1e-5, rtol=0)
    from spam_lightning.inference.serve import create_app  # spam-serve describes it via the family

    health = next(
        r for r in create_app(run).routes if getattr(r, "path", "") == "/api/health"
    ).endpoint()
    assert health["kind"] == "decoder" and health["model"]["arch"] == "qwen3"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen3-tiny", "llama3.2-tiny"])
@pytest.mark.parametrize(
    "options",
    [
        ("trainable=last_two_blocks", "token=flexible", "data.padding=batch"),
        ("trainable=last_layer", "token=masked_mean"),
    ],
)
def test_the_trunk_cache_is_exact(tiny_run, model: str, options: tuple[str, ...]) -> None:
    """With and without the frozen-trunk cache: the same run, loss for loss."""
    runs = []
    for cache in ("true", "false"):
        _, metrics, run = tiny_run(f"model={model}", *options, f"cache.trunk={cache}")
        assert metrics["trunk_cache"] is (cache == "true")
        runs.append((history(run), metrics))
    (ha, ma), (hb, mb) = runs
    for key in ("train_losses", "val_losses"):
        torch.testing.assert_close(torch.tensor(ha[key]), torch.tensor(hb[key]), atol=1e-5, rtol=0)
    for key in ("train_loss", "val_loss", "test_loss", "test_accuracy"):
        assert abs(ma[key] - mb[key]) <= 1e-5, key


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen3-tiny", "llama3.2-tiny"])
def test_lora_bf16_and_every_pooling_train_and_bundle(tiny_run, model: str) -> None:
    _, metrics, run = tiny_run(
        f"model={model}",
        "trainable=lora",
        "trainable.rank=4",
        "token=mean",
        "trainer.precision=bf16-true",
    )
    assert metrics["trainable"] == "lora" and metrics["precision"] == "bf16-true"
    bundle = json.loads((run / "bundle" / "bundle.json").read_text())
    assert "base" not in bundle  # bf16 frozen weights: every tensor, LoRA merged
    assert Classifier(run).predict_proba(TEXTS).shape == (3, 2)
    _, metrics, run = tiny_run(
        f"model={model}", "trainable=lora", "trainable.rank=4", "token=first"
    )
    assert (
        json.loads((run / "bundle" / "bundle.json").read_text())["base"]["classifier"]["rank"] == 4
    )
    assert Classifier(run).predict_proba(TEXTS).shape == (3, 2)


@pytest.mark.slow
@pytest.mark.parametrize("arch,model", [("qwen3", "qwen3-tiny"), ("llama", "llama3.2-tiny")])
def test_a_checkpoint_folder_with_its_own_tokenizer(
    tiny_run, tmp_path: Path, arch: str, model: str
) -> None:
    """A save_pretrained folder: its weights, its tokenizer (no pad token: padded with EOS), a
    bundle that names the folder as its base and keeps the tokenizer; spam-export makes it
    self-contained, predicting the same."""
    folder = write_tiny_decoder(tmp_path / "ckpt", arch)
    eos = tokenizer().eos_token_id
    _, metrics, run = tiny_run(
        f"model={model}",
        "model.weights=pretrained",
        f"model.checkpoint={folder}",
        "model.tokenizer_source=null",
    )
    bundle = json.loads((run / "bundle" / "bundle.json").read_text())
    assert bundle["base"] == {**bundle["base"], "source": "file", "path": str(folder.resolve())}
    assert bundle["tokenizer"] == "bundle" and bundle["pad_token_id"] == eos
    assert (run / "bundle" / "tokenizer.json").is_file()
    clf = Classifier(run)
    ids = clf.predictor.encode(["ok ok"])
    assert max(ids[0]) < 400  # the folder's own tokens, not GPT-2's
    assert export_main([str(run), str(tmp_path / "export")]) == 0
    torch.testing.assert_close(
        Classifier(tmp_path / "export").predict_proba(TEXTS),
        clf.predict_proba(TEXTS),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize("trainable", TRAINABLE)
def test_every_trainable_option(trainable: str, tmp_path: Path) -> None:
    """make_classifier's options on a decoder: what trains, and where the frozen trunk ends."""
    from _compose import compose_train

    rank = ["trainable.rank=4"] if trainable == "lora" else []
    cfg = compose_train(["model=llama3.2-tiny", f"trainable={trainable}", *rank], tmp_path)
    family, _ = validate_config(cfg)
    model = family.build(cfg, 2)
    trains = {
        n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("trf") else "")
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    first = first_trainable_block(trainable, 2)
    want = {
        "last_layer": {"out_head"},
        "last_block": {"out_head", "final_norm", "trf_blocks.1"},
        "last_two_blocks": {"out_head", "final_norm", "trf_blocks.0", "trf_blocks.1"},
        "all": {"tok_emb", "out_head", "final_norm", "trf_blocks.0", "trf_blocks.1"},
        "lora": {"out_head", "trf_blocks.0", "trf_blocks.1"},
    }[trainable]
    assert trains == want and first == {"last_layer": 2, "last_block": 1, "last_two_blocks": 0}.get(
        trainable
    )


def test_bad_options_and_a_missing_tokenizer_are_named(tmp_path: Path) -> None:
    from _compose import compose_train

    cfg = compose_train(
        ["model=qwen3-tiny", "model.n_kv_groups=3", "model.vocab_size=1000", "model.arch=gpt"],
        tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    lines = str(err.value).splitlines()
    assert (
        "  - model.n_heads=4 is not divisible by model.n_kv_groups=3 (each key/value head serves a "
        "group of query heads)" in lines
    )
    assert (
        "  - model.vocab_size=1000: must be >= 50257 with model.tokenizer_source=gpt2 (its token "
        "ids go up to 50256)" in lines
    )
    assert any(line.startswith("  - model.arch='gpt'") for line in lines)
    # random weights, the model's own tokenizer, no Hub here: one error naming the option
    cfg = compose_train(["model=qwen3-0.6b", "model.weights=random"], tmp_path)
    family, _ = validate_config(cfg)
    with pytest.raises(TokenizerError) as err:
        family.preflight(cfg)
    assert "model.repo=Qwen/Qwen3-0.6B-Base" in str(err.value)
    assert "model.tokenizer_source=gpt2" in str(err.value)
