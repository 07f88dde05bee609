"""GPTModel: the book's structure and names, the maths of each part, and the config group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llms_from_scratch import ch03 as book_ch03
from llms_from_scratch import ch04 as book_ch04
from omegaconf import OmegaConf
from torch import nn

from spam_lightning.model.gpt import (
    GELU,
    MODEL_CONFIGS,
    GPTModel,
    LayerNorm,
    MultiHeadAttention,
    generate_text_simple,
    text_to_token_ids,
    token_ids_to_text,
)

REPO = Path(__file__).resolve().parents[2]
TINY = MODEL_CONFIGS["gpt2-tiny"]


def tiny(**overrides: object) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel({**TINY, **overrides}).eval()


def test_print_reads_like_the_chapter() -> None:
    text = str(GPTModel(TINY))
    for name in (
        "(tok_emb): Embedding(50257, 64)",
        "(pos_emb): Embedding(1024, 64)",
        "(drop_emb): Dropout",
        "(trf_blocks): Sequential",
        "(0): TransformerBlock",
        "(att): MultiHeadAttention",
        "(W_query): Linear(in_features=64, out_features=64, bias=True)",
        "(W_key): Linear",
        "(W_value): Linear",
        "(out_proj): Linear",
        "(ff): FeedForward",
        "(layers): Sequential",
        "(1): GELU()",
        "(norm1): LayerNorm",
        "(norm2): LayerNorm",
        "(drop_resid): Dropout",
        "(final_norm): LayerNorm",
        "(out_head): Linear(in_features=64, out_features=50257, bias=False)",
    ):
        assert name in text


def test_sizes_and_parameter_count() -> None:
    expected = {
        "gpt2-small": (768, 12, 12),
        "gpt2-medium": (1024, 24, 16),
        "gpt2-large": (1280, 36, 20),
        "gpt2-xl": (1600, 48, 25),
    }
    for name, (emb, layers, heads) in expected.items():
        cfg = MODEL_CONFIGS[name]
        assert (cfg["emb_dim"], cfg["n_layers"], cfg["n_heads"]) == (emb, layers, heads)
        assert (cfg["vocab_size"], cfg["context_length"]) == (50257, 1024)
        assert cfg["qkv_bias"] is True and cfg["drop_rate"] == 0.0
    with torch.device("meta"):  # no storage: counting gpt2-small's parameters is free
        model = GPTModel(MODEL_CONFIGS["gpt2-small"])
    total = sum(p.numel() for p in model.parameters())
    assert total == 163_037_184  # the chapter's count, plus the qkv biases
    assert total - model.out_head.weight.numel() == 124_439_808  # "GPT-2 124M" (head tied)


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_model_config_group_reads_the_size_registry(name: str) -> None:
    import spam_lightning.resolvers  # noqa: F401  (${gpt2:NAME,KEY})

    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.weights == ("random" if name == "gpt2-tiny" else "pretrained")
    assert cfg.checkpoint is None and cfg.causal_mask is True and cfg.compile is False
    if name == "gpt2-tiny":  # a DictConfig with the group's extra keys is accepted as cfg
        assert GPTModel(cfg).cfg == {**MODEL_CONFIGS[name], "causal_mask": True}
    cfg.n_layers = 1  # an override replaces the registry's value
    assert OmegaConf.to_container(cfg, resolve=True)["n_layers"] == 1


def test_forward_is_embed_blocks_head() -> None:
    model = tiny()
    ids = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        logits = model(ids)
        x = model.embed(ids)
        split = model.run_blocks(model.run_blocks(x, 0, 1), start=1)
        assert torch.equal(model.head(split), logits)
        assert torch.equal(model.run_blocks(x, 2), x)  # an empty range is the identity
    assert logits.shape == (2, 9, 50257)


def test_gelu_is_gpt2s_tanh_approximation() -> None:
    from transformers.activations import ACT2FN

    x = torch.linspace(-8, 8, 2001)
    assert torch.allclose(GELU()(x), book_ch04.GELU()(x), atol=1e-6)
    assert torch.allclose(GELU()(x), ACT2FN["gelu_new"](x), atol=1e-6)


def test_layernorm_is_the_books() -> None:
    norm, book = LayerNorm(16), book_ch04.LayerNorm(16)
    with torch.no_grad():
        norm.scale.normal_()
        norm.shift.normal_()
    book.load_state_dict(norm.state_dict())  # the same names: scale, shift
    x = torch.randn(3, 5, 16) * 4 + 2
    assert torch.allclose(norm(x), book(x), atol=1e-5)
    assert norm.eps == book.eps == 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_attention_is_the_books_masked_softmax(causal: bool) -> None:
    torch.manual_seed(0)
    att = MultiHeadAttention(8, 8, context_length=6, dropout=0.0, num_heads=2, qkv_bias=True)
    att.causal = causal
    # chapter 3's module with the same weights; its mask buffer zeroed: no causal mask
    book = book_ch03.MultiHeadAttention(8, 8, context_length=6, dropout=0.0, num_heads=2, qkv_bias=True)
    book.load_state_dict({**att.state_dict(), "mask": book.mask * causal})
    x = torch.randn(2, 6, 8)
    assert torch.allclose(att(x), book(x), atol=1e-6)


@pytest.mark.parametrize("causal_mask", [True, False])
def test_causal_mask_option(causal_mask: bool) -> None:
    model = tiny(causal_mask=causal_mask)
    assert model.causal_mask is causal_mask
    ids = torch.tensor([[5211, 345, 423, 640]])
    changed = ids.clone()
    changed[0, 3] = 11
    with torch.no_grad():
        a, b = model(ids), model(changed)
    sees_the_future = not torch.allclose(a[0, 0], b[0, 0], atol=1e-6)
    assert sees_the_future is (not causal_mask)
    assert not torch.allclose(a[0, 3], b[0, 3])  # the changed position always changes


def test_dropout_only_in_training() -> None:
    model = tiny(drop_rate=0.5)
    ids = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model(ids))


def test_sequence_longer_than_context_is_an_error() -> None:
    model = tiny(context_length=8)
    with pytest.raises(ValueError, match="exceeds context_length=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_missing_config_key_is_named() -> None:
    cfg = {k: v for k, v in TINY.items() if k != "n_heads"}
    with pytest.raises(ValueError, match="n_heads"):
        GPTModel(cfg)


def test_generate_text_simple_is_greedy_and_crops_context() -> None:
    model = tiny(context_length=8)
    idx = torch.tensor([[5211, 345, 423, 640, 11, 12]])
    out = generate_text_simple(model, idx, max_new_tokens=5, context_size=8)
    assert out.shape == (1, 11) and torch.equal(out[:, :6], idx)
    # each new token is the argmax given the last (at most) 8 tokens
    for t in range(6, 11):
        with torch.no_grad():
            logits = model(out[:, max(0, t - 8) : t])
        assert out[0, t] == logits[0, -1].argmax()


def test_token_helpers_round_trip() -> None:
    ids = text_to_token_ids("Every effort moves you<|endoftext|>")
    assert ids.tolist() == [[6109, 3626, 6100, 345, 50256]]
    assert token_ids_to_text(ids) == "Every effort moves you<|endoftext|>"


def test_modules_are_plain_torch() -> None:
    model = GPTModel(TINY)
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linear) == 2 * 6 + 1  # q, k, v, out_proj, 2 ff layers per block + head
