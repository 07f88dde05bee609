"""Issue 13 item 3: `token=mean` is the book's `--average_embeddings` (row 19), the mean over
every position of the padded batch; `token=masked_mean` averages the real tokens only. Both give
the same predictions in `spam-classify` as in training."""

from __future__ import annotations

import json

import pytest
import torch
from _book import add_classification_head

from spam_lightning.data.tokens import collate, encode_texts
from spam_lightning.inference.bundle import save_bundle
from spam_lightning.inference.classify import Classifier
from spam_lightning.model.classifier import GPTClassifier
from spam_lightning.model.gpt import MODEL_CONFIGS, GPTModel

PAD = 50256
TEXTS = ["Hi, are we still on for lunch?", "WINNER!! Claim your free prize now", "ok"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's matmuls are too small to split; on a busy machine threads only slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def book_model(seed: int = 0) -> GPTModel:
    """A tiny random GPT-2 with the book's classification head (listing 6.7)."""
    torch.manual_seed(seed)
    return add_classification_head(GPTModel(MODEL_CONFIGS["gpt2-tiny"])).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([3, 7, 1, 7])
    ids = torch.randint(0, 50000, (4, 7), generator=torch.Generator().manual_seed(1))
    ids[torch.arange(7)[None, :] >= lengths[:, None]] = PAD
    return ids, lengths


def test_mean_is_the_books_and_masked_mean_reads_real_tokens_only() -> None:
    model = book_model()
    ids, lengths = padded_batch()
    with torch.no_grad():
        book = model(ids).mean(dim=1)  # additional_experiments.py, --average_embeddings
        mean = GPTClassifier(model, token="mean")(ids, lengths)
        masked = GPTClassifier(model, token="masked_mean")(ids, lengths)
        # the real tokens only: each message alone, unpadded (the book's mean without padding)
        real = torch.cat([model(ids[i : i + 1, :n]).mean(dim=1) for i, n in enumerate(lengths)])
    torch.testing.assert_close(mean, book, atol=1e-5, rtol=0)
    torch.testing.assert_close(masked, real, atol=1e-5, rtol=0)
    padded = lengths < ids.shape[1]
    for i in range(len(lengths)):  # equal where nothing is padded, different where it is
        assert torch.allclose(mean[i], masked[i], atol=1e-5) != bool(padded[i]), i


def bundle(tmp_path, token: str, padding: str = "longest", max_length: int = 16, old: bool = False):
    model = book_model(seed=3)
    save_bundle(
        tmp_path, model, class_names=["ham", "spam"], token=token, max_length=max_length,
        padding=padding, pad_token_id=PAD,
    )
    if old:  # a bundle saved before the rename: its `mean` was the masked one
        path = tmp_path / "bundle" / "bundle.json"
        config = json.loads(path.read_text())
        del config["mean_includes_padding"]
        path.write_text(json.dumps(config))
    return model


def training_probs(model: GPTModel, token: str, padding: str, max_length: int) -> torch.Tensor:
    """What training's evaluation computes: the whole batch collated as the data module does."""
    ids = encode_texts(TEXTS, max_length=max_length)
    if padding == "none":
        batches = [collate([t], padding="none") for t in ids]  # batch size 1
    else:
        batches = [collate(ids, padding=padding, max_length=max_length)]
    with torch.no_grad():
        logits = torch.cat(
            [GPTClassifier(model, token=token)(b["input_ids"], b["lengths"]) for b in batches]
        )
    return torch.softmax(logits, dim=-1)


def test_classify_predicts_as_training_for_both_means(tmp_path) -> None:
    for i, (token, padding) in enumerate(
        [("mean", "longest"), ("masked_mean", "longest"), ("masked_mean", "batch"), ("mean", "none")]
    ):
        run = tmp_path / str(i)
        model = bundle(run, token, padding)
        clf = Classifier(run, batch_size=2)  # per-batch grouping where it is exact
        want = training_probs(model, token, padding, 16)
        torch.testing.assert_close(clf.predict_proba(TEXTS), want, atol=1e-5, rtol=0)
        assert clf.token == token
    # the two differ on padded input: the classifier does not mix them up
    mean, masked = (training_probs(book_model(3), t, "longest", 16) for t in ("mean", "masked_mean"))
    assert not torch.allclose(mean, masked, atol=1e-4)
    # an old bundle's `mean` was the masked mean: it still predicts as it was trained
    model = bundle(tmp_path / "old", "mean", old=True)
    clf = Classifier(tmp_path / "old")
    assert clf.token == "masked_mean"
    torch.testing.assert_close(
        clf.predict_proba(TEXTS), training_probs(model, "masked_mean", "longest", 16), atol=1e-5, rtol=0
    )
