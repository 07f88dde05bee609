"""The book's own chapter-6 functions (``llms_from_scratch.ch06``, plus the script's inline
loaders and head in ``_book``), which the fidelity tests hold the framework against, behave as the
chapter says on our tiny random GPTModel and the real SMS splits (issue 12 item 6)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _book import add_classification_head, create_dataloaders
from llms_from_scratch import ch06 as book
from llms_from_scratch.ch04 import GPTModel as BookGPTModel

from spam_lightning.data import SpamDataModule
from spam_lightning.data.tokens import get_tokenizer
from spam_lightning.model.gpt import GPTModel

# the book's keys, GPT-2's vocabulary and a small trunk
TINY = {"vocab_size": 50257, "context_length": 256, "emb_dim": 32, "n_layers": 2, "n_heads": 2,
        "drop_rate": 0.0, "qkv_bias": True}


@pytest.fixture(scope="module")
def splits(tmp_path_factory, sms_file):
    """The chapter's balanced 70/10/20 split of the real SMS file, as SpamDatasets."""
    data_dir = tmp_path_factory.mktemp("reference") / "sms_spam"
    SpamDataModule(source=str(sms_file), data_dir=str(data_dir)).prepare_data()
    tok = get_tokenizer()
    train = book.SpamDataset(data_dir / "train.csv", tok)
    val = book.SpamDataset(data_dir / "validation.csv", tok, max_length=train.max_length)
    test = book.SpamDataset(data_dir / "test.csv", tok, max_length=train.max_length)
    return train, val, test


def tiny_classifier(seed: int = 123) -> torch.nn.Module:
    torch.manual_seed(seed)
    return add_classification_head(GPTModel(TINY), num_classes=2, seed=seed)


def test_our_gpt_model_is_the_books():
    """Same seed, same weights and (eval mode) the same logits as the book's ``ch04.GPTModel``:
    what lets the fidelity tests run the book on its own model and the framework on ours."""
    torch.manual_seed(123)
    ours = GPTModel(TINY).eval()
    torch.manual_seed(123)
    theirs = BookGPTModel(TINY).eval()
    params = dict(theirs.named_parameters())
    assert [n for n, _ in ours.named_parameters()] == list(params)
    assert all(torch.equal(p, params[n]) for n, p in ours.named_parameters())
    ids = torch.randint(0, TINY["vocab_size"], (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids), atol=1e-5, rtol=0)


def test_datasets_and_loaders_are_the_chapters(splits):
    train, val, test = splits
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    assert train.max_length == val.max_length == test.max_length == 120  # longest training message
    ids, label = train[0]
    assert ids.shape == (120,) and ids.dtype == torch.long and label.item() in (0, 1)
    short = min(range(len(val)), key=lambda i: len(get_tokenizer().encode(val.data["Text"][i])))
    assert val[short][0][-1].item() == 50256  # padded with <|endoftext|>
    train_loader, val_loader, test_loader = create_dataloaders(train, val, test)
    assert (len(train_loader), len(val_loader), len(test_loader)) == (130, 19, 38)
    inputs, targets = next(iter(train_loader))
    assert inputs.shape == (8, 120) and targets.shape == (8,)
    # no generator: the order comes from the global RNG, so torch.manual_seed fixes it
    firsts = []
    for seed in (123, 123, 124):
        torch.manual_seed(seed)
        firsts.append(next(iter(train_loader))[0])
    assert torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[0], firsts[2])


def test_classification_head_trains_last_block_and_norm_only():
    model = tiny_classifier()
    assert model.out_head.weight.shape == (2, TINY["emb_dim"]) and model.out_head.bias is not None
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("trf") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"trf_blocks.1", "final_norm", "out_head"}
    assert torch.equal(model.out_head.weight, tiny_classifier().out_head.weight)  # seeded


def test_losses_and_accuracy_use_the_last_token(splits):
    train, val, test = splits
    model = tiny_classifier()
    # 20 validation messages: batches of 8, 8 and 4
    val_loader = create_dataloaders(train, torch.utils.data.Subset(val, range(20)), test)[1]
    inputs, targets = next(iter(val_loader))
    loss = book.calc_loss_batch(inputs, targets, model, "cpu")
    expected = F.cross_entropy(model(inputs)[:, -1, :], targets)
    torch.testing.assert_close(loss, expected)
    assert loss.requires_grad  # what train_classifier_simple calls backward() on
    assert not torch.isclose(loss, F.cross_entropy(model(inputs)[:, 0, :], targets))

    # the first num_batches batches, in order (the validation loader does not shuffle)
    it = iter(val_loader)
    two = [next(it) for _ in range(2)]
    mean = sum(F.cross_entropy(model(x)[:, -1, :], y).item() for x, y in two) / 2
    assert book.calc_loss_loader(val_loader, model, "cpu", num_batches=2) == pytest.approx(mean)
    # evaluate_model: both losses on eval_iter batches, then back to training mode
    train_loss, val_loss = book.evaluate_model(model, val_loader, val_loader, "cpu", eval_iter=2)
    assert train_loss == val_loss == pytest.approx(mean) and model.training
    correct = sum((model(x)[:, -1, :].argmax(-1) == y).sum().item() for x, y in two)
    model.train()
    assert book.calc_accuracy_loader(val_loader, model, "cpu", num_batches=2) == correct / 16
    assert not model.training  # calc_accuracy_loader switches to eval mode
    x, y = [torch.stack(t) for t in zip(*(val[i] for i in range(16, 20)), strict=True)]
    correct += (model(x)[:, -1, :].argmax(-1) == y).sum().item()
    everything = book.calc_accuracy_loader(val_loader, model, "cpu")  # the partial batch counts
    assert everything == correct / 20
    assert book.calc_accuracy_loader(val_loader, model, "cpu", num_batches=99) == everything
    empty = torch.utils.data.DataLoader(torch.utils.data.Subset(val, []), batch_size=8)
    assert math.isnan(book.calc_loss_loader(empty, model, "cpu"))


def test_train_classifier_simple_returns_the_chapters_five_tuple(splits, capsys):
    train, val, test = splits
    # 21 messages: two full batches per epoch, the partial third one dropped
    small = torch.utils.data.Subset(train, range(21))
    train_loader, val_loader, _ = create_dataloaders(small, val, test)
    model = tiny_classifier()
    before = model.trf_blocks[0].att.W_query.weight.clone()
    head = model.out_head.weight.clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    torch.manual_seed(123)
    out = book.train_classifier_simple(
        model, train_loader, val_loader, optimizer, "cpu", num_epochs=2, eval_freq=3, eval_iter=1
    )
    train_losses, val_losses, train_accs, val_accs, examples_seen = out
    assert examples_seen == 2 * 2 * 8  # examples, not tokens; the dropped batch is not seen
    assert len(train_losses) == len(val_losses) == 2  # global steps 0 and 3 of 0..3
    assert len(train_accs) == len(val_accs) == 2  # once per epoch
    assert all(a in (k / 8 for k in range(9)) for a in train_accs + val_accs)  # eval_iter=1 batch
    assert torch.equal(model.trf_blocks[0].att.W_query.weight, before)  # frozen
    assert not torch.equal(model.out_head.weight, head)  # trained
    printed = capsys.readouterr().out
    assert "Ep 1 (Step 000000): Train loss" in printed and "Ep 2 (Step 000003)" in printed
    assert printed.count("Training accuracy: ") == 2 and "| Validation accuracy: " in printed

    # the same seed replays the same run
    model2 = tiny_classifier()
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=5e-4, weight_decay=0.1)
    torch.manual_seed(123)
    again = book.train_classifier_simple(
        model2, train_loader, val_loader, optimizer2, "cpu", num_epochs=2, eval_freq=3, eval_iter=1
    )
    assert again == out


def test_classify_review_answers_like_the_book(splits):
    train, _, _ = splits
    tok = get_tokenizer()
    model = tiny_classifier()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    text_1 = ("You are a winner you have been specially selected to receive $1000 cash or a "
              "$2000 award.")
    text_2 = "Hey, just wanted to check if we're still on for dinner tonight? Let me know!"
    with torch.no_grad():
        model.out_head.weight.zero_()
        model.out_head.bias.copy_(torch.tensor([0.0, 1.0]))
    assert book.classify_review(text_1, model, tok, "cpu", max_length=train.max_length) == "spam"
    (ids,) = seen
    assert ids.shape == (1, 120) and ids[0, -1].item() == 50256
    assert ids[0, : len(tok.encode(text_1))].tolist() == tok.encode(text_1)
    with torch.no_grad():
        model.out_head.bias.copy_(torch.tensor([1.0, 0.0]))
    assert book.classify_review(text_2, model, tok, "cpu", max_length=train.max_length) == "not spam"
    # longer than max_length: truncated to it
    assert book.classify_review(text_2 * 40, model, tok, "cpu", max_length=train.max_length)
    assert seen[-1].shape == (1, 120)
