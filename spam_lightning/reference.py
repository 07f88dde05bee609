"""Chapter 6 of *Build a Large Language Model (From Scratch)* by the book's names: the reference
the tests and ``scripts/benchmark.py`` hold the Lightning job against, as the book's
``ch06/01_main-chapter-code/gpt_class_finetune.py`` runs it (every batch padded to the longest
training message, full forward, last token's logits, float32; shuffling from the global torch
RNG, seeded by the caller's ``torch.manual_seed(123)``)."""

from __future__ import annotations

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset


class SpamDataset(Dataset):
    """Listing 6.4: token ids padded (or truncated) to ``max_length``, and the 0/1 label."""

    def __init__(self, csv_file, tokenizer, max_length=None, pad_token_id=50256):  # <|endoftext|>
        self.data = pd.read_csv(csv_file)
        self.encoded_texts = [tokenizer.encode(text) for text in self.data["Text"]]
        if max_length is None:
            self.max_length = self._longest_encoded_length()
        else:
            self.max_length = max_length
            self.encoded_texts = [t[: self.max_length] for t in self.encoded_texts]
        self.encoded_texts = [t + [pad_token_id] * (self.max_length - len(t)) for t in self.encoded_texts]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        label = self.data.iloc[index]["Label"]
        return torch.tensor(self.encoded_texts[index], dtype=torch.long), torch.tensor(label, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.data)

    def _longest_encoded_length(self) -> int:
        return max(len(t) for t in self.encoded_texts)


def create_dataloaders(train_dataset, val_dataset, test_dataset, batch_size=8, num_workers=0):
    """Listing 6.5: shuffled train batches (the partial last one dropped), ordered val/test."""
    train_loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=True,
                              num_workers=num_workers, drop_last=True)
    val_loader = DataLoader(val_dataset, batch_size=batch_size, num_workers=num_workers)
    test_loader = DataLoader(test_dataset, batch_size=batch_size, num_workers=num_workers)
    return train_loader, val_loader, test_loader


def add_classification_head(model: torch.nn.Module, num_classes: int = 2, seed: int = 123):
    """Listing 6.7: freeze all, seed, a new ``num_classes`` head, unfreeze last block + norm."""
    for param in model.parameters():
        param.requires_grad = False
    torch.manual_seed(seed)
    model.out_head = torch.nn.Linear(model.out_head.in_features, num_classes)
    for param in model.trf_blocks[-1].parameters():
        param.requires_grad = True
    for param in model.final_norm.parameters():
        param.requires_grad = True
    return model


def calc_accuracy_loader(data_loader, model, device, num_batches=None) -> float:
    """Listing 6.8: accuracy of the last token's argmax over the first ``num_batches`` batches."""
    model.eval()
    correct_predictions, num_examples = 0, 0
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        with torch.no_grad():
            logits = model(input_batch)[:, -1, :]  # logits of the last output token
        predicted_labels = torch.argmax(logits, dim=-1)
        num_examples += predicted_labels.shape[0]
        correct_predictions += (predicted_labels == target_batch).sum().item()
    return correct_predictions / num_examples


def calc_loss_batch(input_batch, target_batch, model, device) -> torch.Tensor:
    """Listing 6.9: cross-entropy of the last output token's logits."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)[:, -1, :]
    return torch.nn.functional.cross_entropy(logits, target_batch)


def calc_loss_loader(data_loader, model, device, num_batches=None) -> float:
    """Listing 6.9: the mean batch loss over the first ``num_batches`` batches (nan if empty)."""
    total_loss = 0.0
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model(model, train_loader, val_loader, device, eval_iter) -> tuple[float, float]:
    """Train and validation loss on ``eval_iter`` batches each, in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def train_classifier_simple(model, train_loader, val_loader, optimizer, device, num_epochs,
                            eval_freq, eval_iter):
    """Listing 6.10; returns (train_losses, val_losses, train_accs, val_accs, examples_seen)."""
    train_losses, val_losses, train_accs, val_accs = [], [], [], []
    examples_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            examples_seen += input_batch.shape[0]  # examples, not tokens
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                print(f"Ep {epoch + 1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}", flush=True)
        train_accuracy = calc_accuracy_loader(train_loader, model, device, num_batches=eval_iter)
        val_accuracy = calc_accuracy_loader(val_loader, model, device, num_batches=eval_iter)
        print(f"Training accuracy: {train_accuracy * 100:.2f}% | "
              f"Validation accuracy: {val_accuracy * 100:.2f}%", flush=True)
        train_accs.append(train_accuracy)
        val_accs.append(val_accuracy)
    return train_losses, val_losses, train_accs, val_accs, examples_seen


def classify_review(text, model, tokenizer, device, max_length=None, pad_token_id=50256):
    """Listing 6.12: "spam" or "not spam" for one message padded to ``max_length`` (the book's
    caller passes the training set's; ``None`` fails as in the book)."""
    model.eval()
    input_ids = tokenizer.encode(text)
    supported_context_length = model.pos_emb.weight.shape[0]
    input_ids = input_ids[: min(max_length, supported_context_length)]
    input_ids += [pad_token_id] * (max_length - len(input_ids))
    input_tensor = torch.tensor(input_ids, device=device).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_tensor)[:, -1, :]
    predicted_label = torch.argmax(logits, dim=-1).item()
    return "spam" if predicted_label == 1 else "not spam"
