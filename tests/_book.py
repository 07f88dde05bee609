"""The two steps of the book's ``ch06/01_main-chapter-code/gpt_class_finetune.py`` that its
package ``llms_from_scratch`` does not export (the script writes them inline): listing 6.5's
loaders and listing 6.7's new head. Everything else the tests take from ``llms_from_scratch``."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader


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
