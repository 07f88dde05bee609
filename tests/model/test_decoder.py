"""The decoder family (issue 27): Qwen3 and Llama 3.2 written in PyTorch equal transformers' own
implementations on the same random checkpoint, and keep GPT-2's shortcuts exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_decoders import tiny_config, write_tiny_decoder

from spam_lightning.model.classifier import make_classifier
from spam_lightning.model.decoder import (
    DecoderClassifier,
    DecoderModel,
    load_decoder,
    rope_inv_freq,
)
from spam_lightning.model.weights import CheckpointError


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_logits_equal_transformers_on_the_same_checkpoint(arch: str, tmp_path: Path) -> None:
    import transformers

    folder = write_tiny_decoder(tmp_path / arch, arch)
    ours = load_decoder(folder, tiny_config(arch)).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(theirs).__name__ == ("Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM")
    ids = torch.randint(
        0, ours.cfg["vocab_size"], (3, 37), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        got = ours(ids)
    assert want.abs().max() > 0.1  # a real signal, not near-zero logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # tied embeddings: one tensor, as in the checkpoint (which stores no lm_head)
    assert ours.out_head.weight is ours.tok_emb.weight


def test_llama3_rope_scaling_is_transformers(tmp_path: Path) -> None:
    """Llama 3's frequency bands (kept, interpolated, slowed by ``factor``), real head size."""
    from hf_decoders import hf_config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = {**tiny_config("llama"), "head_dim": 64, "n_heads": 4, "emb_dim": 256}
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config(cfg), "cpu")
    got = rope_inv_freq(64, cfg["rope_base"], cfg["rope_scaling"])
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)
    plain = rope_inv_freq(64, cfg["rope_base"])
    assert (got < plain).any() and (got == plain).any()  # both slowed and kept frequencies


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_classifier_shortcuts_are_exact(arch: str) -> None:
    """The last block at the pooled position only, and a forward from block k (the trunk
    cache's), give the full forward's class logits."""
    torch.manual_seed(0)
    model = make_classifier(DecoderModel(tiny_config(arch)), num_classes=2, trainable="last_block")
    ids = torch.randint(0, 50257, (4, 20))
    lengths = torch.tensor([20, 7, 13, 1])
    for token in ("last", "flexible", "first", "mean", "masked_mean"):
        clf = DecoderClassifier(model, token=token).eval()
        with torch.no_grad():
            hidden = clf.final_norm(clf.run_blocks(clf.embed(ids)))
            full = clf.out_head(clf.pooling(hidden, lengths))
            torch.testing.assert_close(clf(ids, lengths), full, atol=1e-5, rtol=0)
            states = clf.run_blocks(clf.embed(ids), 0, 1)
            torch.testing.assert_close(clf(states, lengths, start_block=1), full, atol=1e-5, rtol=0)


def test_a_checkpoint_of_other_sizes_is_named_in_one_error(tmp_path: Path) -> None:
    folder = write_tiny_decoder(tmp_path / "q", "qwen3")
    cfg = {**tiny_config("qwen3"), "n_layers": 3, "rope_base": 10000.0}
    with pytest.raises(CheckpointError) as err:
        load_decoder(folder, cfg)
    text = str(err.value)
    assert "model.n_layers=3 but its config.json has 2" in text
    assert "model.rope_base=10000.0 but its config.json has 1000000.0" in text
    assert "missing (11): model.layers.2." in text
