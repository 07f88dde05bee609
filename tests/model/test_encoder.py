"""Encoder models (BERT family) through AutoModelForSequenceClassification: loading, masking,
what trains, tokenizer, save/load, the availability check, and a real training signal.

Every family is a tiny random model of the real transformers class (tests/hf_encoders.py), so
module names and masking code are the real ones; nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hf_encoders import FAMILIES, MAX_POSITIONS, write_tiny_encoder

from spam_lightning.model.encoder import (
    ENCODER_TRAINABLE,
    EncoderClassifier,
    EncoderTokenizer,
    EncoderUnavailableError,
    build_encoder,
    check_encoder_available,
    load_encoder,
    set_trainable,
)

REPO = Path(__file__).resolve().parents[2]
MESSAGES = [
    "Free entry in 2 a wkly comp to win FA Cup final tkts",
    "Ok lar... Joking wif u oni...",
    "WINNER!! You have been selected to receive a £900 prize reward! Txt CLAIM now",
    "Sorry, I'll call later",
]
LABELS = torch.tensor([1, 0, 1, 0])
# What each `trainable` must train, written out here from the book's scripts (not read from the
# module), as parameter-name prefixes of the tiny 2-layer models: layer 1 is the last one.
EXPECTED = {
    "distilbert": {
        "last_layer": ("classifier.",),
        "last_block": ("classifier.", "pre_classifier.", "distilbert.transformer.layer.1."),
    },
    "bert": {
        "last_layer": ("classifier.",),
        "last_block": ("classifier.", "bert.pooler.dense.", "bert.encoder.layer.1."),
    },
    "roberta": {
        "last_layer": ("classifier.",),
        "last_block": ("classifier.", "roberta.encoder.layer.1."),
    },
    "modernbert": {
        "last_layer": ("classifier.",),
        "last_block": ("classifier.", "head.", "model.layers.1."),
    },
    "deberta-v2": {
        "last_layer": ("classifier.",),
        "last_block": ("classifier.", "pooler.", "deberta.encoder.layer.1."),
    },
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> folder holding a tiny random bare encoder and its tokenizer (Hub-like)."""
    root = tmp_path_factory.mktemp("encoders")
    return {family: write_tiny_encoder(root / family, family) for family in FAMILIES}


def padded(
    tok: EncoderTokenizer, texts: list[str], extra: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (with the tokenizer's pad id, ``extra`` columns beyond the longest)
    and the true lengths."""
    ids = tok.encode(texts, limit=None)
    width = max(map(len, ids)) + extra
    rows = [row + [tok.pad_token_id] * (width - len(row)) for row in ids]
    return torch.tensor(rows), torch.tensor([len(row) for row in ids])


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_weights_are_loaded(tiny: dict[str, Path], family: str) -> None:
    from transformers import AutoModel, AutoModelForSequenceClassification

    model = build_encoder(str(tiny[family]), num_classes=2, weights="pretrained").eval()
    assert isinstance(model, EncoderClassifier) and model.family == family
    # the encoder's tensors are the file's ...
    saved = AutoModel.from_pretrained(tiny[family]).state_dict()
    prefix = model.hf.base_model_prefix
    ours = model.hf.state_dict()
    base = {k.removeprefix(f"{prefix}."): v for k, v in ours.items() if k.startswith(f"{prefix}.")}
    assert base and all(torch.equal(v, saved[k]) for k, v in base.items())  # (roberta: no pooler)
    assert all(v.dtype == torch.float32 for v in ours.values() if v.is_floating_point())
    # ... and with the same new head, the logits are transformers' own given explicit masks
    ref = AutoModelForSequenceClassification.from_pretrained(tiny[family], num_labels=2).eval()
    head = {k: v for k, v in ours.items() if not k.startswith(f"{prefix}.")}
    assert head and set(ref.state_dict()) == set(ours)
    ref.load_state_dict(head, strict=False)
    tok = EncoderTokenizer(str(tiny[family]))
    ids, lengths = padded(tok, MESSAGES)
    mask = torch.tensor([[1] * n + [0] * (ids.shape[1] - n) for n in lengths.tolist()])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = model(ids, lengths)
    assert got.shape == (len(MESSAGES), 2)
    assert torch.equal(got, expected)


def test_half_precision_checkpoint_is_trained_in_float32(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModel

    bf16 = AutoModel.from_pretrained(tiny["bert"]).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(tiny["bert"] / "tokenizer.json", tmp_path)
    model = build_encoder(str(tmp_path), num_classes=2)
    ours = model.hf.bert.state_dict()
    assert all(v.dtype == torch.float32 for v in ours.values() if v.is_floating_point())
    assert all(torch.equal(ours[k], v.float()) for k, v in bf16.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_new_head_is_seeded(tiny: dict[str, Path], family: str) -> None:
    def head(seed: int) -> dict[str, torch.Tensor]:
        hf = build_encoder(str(tiny[family]), num_classes=3, seed=seed).hf
        return {k: v for k, v in hf.state_dict().items() if not k.startswith(hf.base_model_prefix)}

    first, again, other = head(123), head(123), head(7)
    assert any(v.shape[0] == 3 for v in first.values())  # the new 3-class head
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padding_does_not_change_logits(tiny: dict[str, Path], family: str) -> None:
    model = build_encoder(str(tiny[family]), num_classes=2).eval()
    tok = EncoderTokenizer(str(tiny[family]))
    ids, lengths = padded(tok, MESSAGES, extra=9)
    with torch.no_grad():
        batch = model(ids, lengths)
        for row, text in enumerate(MESSAGES):
            alone = model(torch.tensor(tok.encode([text], limit=None)))  # no padding, no lengths
            torch.testing.assert_close(batch[row], alone[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_set_trainable_follows_the_book(tiny: dict[str, Path], family: str) -> None:
    model = build_encoder(str(tiny[family]), num_classes=2, trainable="all")
    names = [n for n, _ in model.hf.named_parameters()]
    assert all(p.requires_grad for p in model.parameters())
    for trainable in ("last_layer", "last_block", "all", "last_layer"):  # re-applying re-freezes
        set_trainable(model, trainable)
        trains = {n for n, p in model.hf.named_parameters() if p.requires_grad}
        if trainable == "all":
            assert trains == set(names)
            continue
        prefixes = EXPECTED[family][trainable]
        assert trains == {n for n in names if n.startswith(prefixes)}
        assert all(any(n.startswith(p) for n in trains) for p in prefixes)  # each one exists
    built = build_encoder(str(tiny[family]), num_classes=2, trainable="last_block")
    trains = {n for n, p in built.hf.named_parameters() if p.requires_grad}
    assert trains == {n for n in names if n.startswith(EXPECTED[family]["last_block"])}


def test_unknown_trainable_and_family_are_clear(tiny: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModel, ElectraConfig

    with pytest.raises(ValueError, match=r"trainable='lora'.*last_layer, last_block, all"):
        build_encoder(str(tiny["bert"]), num_classes=2, trainable="lora")
    model = build_encoder(str(tiny["bert"]), num_classes=2)
    with pytest.raises(ValueError, match=r"trainable='last_two_blocks'"):
        set_trainable(model, "last_two_blocks")
    assert ENCODER_TRAINABLE == ("last_layer", "last_block", "all")

    # electra: a family the mapping does not know
    config = ElectraConfig(
        vocab_size=64,
        embedding_size=16,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    AutoModel.from_config(config).save_pretrained(tmp_path, safe_serialization=True)
    for trainable in ("last_layer", "last_block"):
        with pytest.raises(
            ValueError, match=rf"trainable={trainable}.*distilbert.*'electra'.*trainable=all"
        ):
            build_encoder(str(tmp_path), num_classes=2, trainable=trainable)
    electra = build_encoder(str(tmp_path), num_classes=2, trainable="all")
    assert electra.family == "electra" and all(p.requires_grad for p in electra.parameters())


def test_tokenizer_adds_special_tokens_and_truncates_like_transformers(
    tiny: dict[str, Path],
) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tiny["bert"])
    tok = EncoderTokenizer(str(tiny["bert"]))
    cls, sep = ref.cls_token_id, ref.sep_token_id
    assert tok.name == str(tiny["bert"])
    assert tok.pad_token_id == ref.pad_token_id == ref.convert_tokens_to_ids("[PAD]")
    assert tok.model_max_length == MAX_POSITIONS
    full = tok.encode(MESSAGES, limit=None)
    assert full == [ref.encode(text) for text in MESSAGES]
    assert all(row[0] == cls and row[-1] == sep and len(row) > 6 for row in full)
    cut = tok.encode(MESSAGES, limit=6)
    assert cut == [ref.encode(text, truncation=True, max_length=6) for text in MESSAGES]
    assert all(len(row) == 6 and row[0] == cls and row[-1] == sep for row in cut)
    assert all(row[:5] == whole[:5] for row, whole in zip(cut, full, strict=True))
    assert tok.encode([], limit=6) == []
    with pytest.raises(ValueError, match="limit=2 leaves no room"):
        tok.encode(MESSAGES, limit=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip(tiny: dict[str, Path], tmp_path: Path, family: str) -> None:
    model = build_encoder(str(tiny[family]), num_classes=2, trainable="last_block").eval()
    tok = EncoderTokenizer(str(tiny[family]))
    model.save(tmp_path)
    tok.save(tmp_path)
    files = [p.name for p in tmp_path.iterdir()]
    assert any(name.endswith(".safetensors") for name in files)
    assert not [n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    loaded, loaded_tok = load_encoder(tmp_path)
    assert not loaded.training and loaded.family == family
    assert loaded_tok.pad_token_id == tok.pad_token_id
    assert loaded_tok.encode(MESSAGES, 10) == tok.encode(MESSAGES, 10)
    ids, lengths = padded(tok, MESSAGES, extra=3)
    with torch.no_grad():
        assert torch.equal(loaded(ids, lengths), model(ids, lengths))


def test_check_rejects_missing_and_incomplete_folders(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(EncoderUnavailableError, match="model.name=") as err:
        check_encoder_available(str(missing), "pretrained")
    assert str(missing) in str(err.value) and "save_pretrained" in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a model")
    with pytest.raises(EncoderUnavailableError, match="config.json") as err:
        check_encoder_available(str(empty), "random")
    assert str(empty) in str(err.value)

    # no safetensors (only a pickle): fine for random weights, refused for pretrained ones
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny["bert"], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    check_encoder_available(str(pickled), "random")
    with pytest.raises(EncoderUnavailableError, match=r"no \.safetensors.*pytorch_model\.bin"):
        check_encoder_available(str(pickled), "pretrained")
    with pytest.raises(EncoderUnavailableError, match="no-such-model"):
        load_encoder(missing)
    for weights in ("pretrained", "random"):
        check_encoder_available(str(tiny["bert"]), weights)


def test_check_of_an_unknown_hub_id_is_quick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    name = "spam-lightning-tests/no-such-encoder"
    start = time.monotonic()
    with pytest.raises(
        EncoderUnavailableError, match=f"model.name={name}.*not in the Hugging Face cache"
    ):
        check_encoder_available(name, "pretrained")
    # one probe with a hard 1 s deadline, whether the Hub answers 401/404 or nothing answers
    assert time.monotonic() - start < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderUnavailableError, match="HF_HUB_OFFLINE"):
        check_encoder_available(name, "random")
    with pytest.raises(EncoderUnavailableError, match=f"model.name={name}"):
        build_encoder(name, num_classes=2)


def test_a_hub_id_in_the_cache_needs_no_network(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layout huggingface_hub downloads into: refs/main names a snapshot folder."""
    cache, commit = tmp_path / "hub", "0" * 40
    repo = cache / "models--tiny--bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny["bert"], repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # so any network use would fail
    check_encoder_available("tiny/bert", "pretrained")
    model = build_encoder("tiny/bert", num_classes=2).eval()
    direct = build_encoder(str(tiny["bert"]), num_classes=2).eval()
    tok = EncoderTokenizer("tiny/bert")
    ids, lengths = padded(tok, MESSAGES)
    with torch.no_grad():
        assert torch.equal(model(ids, lengths), direct(ids, lengths))
    (repo / "snapshots" / commit / "model.safetensors").unlink()
    with pytest.raises(EncoderUnavailableError, match="HF_HUB_OFFLINE"):
        check_encoder_available("tiny/bert", "pretrained")


@pytest.mark.parametrize("family", FAMILIES)
def test_last_block_training_lowers_the_loss(tiny: dict[str, Path], family: str) -> None:
    model = build_encoder(str(tiny[family]), num_classes=2, trainable="last_block")
    tok = EncoderTokenizer(str(tiny[family]))
    ids, lengths = padded(tok, MESSAGES, extra=2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen  # the embeddings and the first layer
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.1)

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(ids, lengths), LABELS)

    model.eval()
    with torch.no_grad():
        before = loss().item()
    model.train()
    torch.manual_seed(0)  # dropout
    for _ in range(8):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.75 * before, (before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_importing_needs_no_transformers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code = (
        "import sys, spam_lightning.model.encoder; "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    for call in (
        lambda: build_encoder("bert-base-uncased", num_classes=2),
        lambda: EncoderTokenizer("bert-base-uncased"),
        lambda: check_encoder_available("bert-base-uncased", "pretrained"),
    ):
        with pytest.raises(ImportError, match=r'pip install -e "\.\[hf\]"'):
            call()
