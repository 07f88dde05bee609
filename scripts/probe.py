"""Which block and which pooled token already separate spam from ham? Linear probes on the frozen
model's hidden states: every block's output x every pooling (token=last, first, flexible, mean,
masked_mean), from one pass of the model over the training and validation messages; a logistic
regression per cell, fit on training, scored on validation.

    python scripts/probe.py model=gpt2-small model.weights=random

Writes ``probe.csv`` and ``probe.png`` (a heatmap of validation accuracy) into
``outputs/probes/<date>_<time>/`` and prints the table. Needs scikit-learn (the ``baselines`` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig

import spam_lightning.resolvers  # noqa: F401  (${gpt2:...} sizes in the model configs)
from spam_lightning.model.pooling import POOLINGS
from spam_lightning.train import KNOWN_ERRORS


def hidden_states(model, loader, poolings, limit: int | None) -> tuple[dict, torch.Tensor]:
    """``{(block, pooling): [N, D]}`` (block 0: the embeddings) and the labels, in one pass."""
    feats: dict[tuple[int, str], list[torch.Tensor]] = {}
    labels, seen = [], 0
    with torch.inference_mode():
        for batch in loader:
            ids, lengths = batch["input_ids"], batch["lengths"]
            x = model.embed(ids)
            for block in range(len(model.trf_blocks) + 1):
                if block:
                    x = model.trf_blocks[block - 1](x)
                for name, pool in poolings.items():
                    feats.setdefault((block, name), []).append(pool(x, lengths).float().clone())  # no view of x
            labels.append(batch["labels"])
            seen += len(ids)
            if limit is not None and seen >= limit:
                break
    return {k: torch.cat(v)[:limit] for k, v in feats.items()}, torch.cat(labels)[:limit]


@hydra.main(config_path="pkg://spam_lightning.conf", config_name="probe", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from spam_lightning.model.gpt2 import GPT2Family, build_model
    from spam_lightning.training import checks

    try:
        family, datamodule = checks.validate_config(cfg)
        if not isinstance(family, GPT2Family):
            raise checks.ConfigError(f"model={cfg.model.name}: probes read GPT-2's blocks; choose a GPT-2 model")
        family.preflight(cfg)
        datamodule.prepare_data()
        datamodule.setup("fit")
    except KNOWN_ERRORS as err:
        sys.exit(f"Error: {err}")
    model = build_model(cfg, datamodule.num_classes).eval()
    poolings = {name: cls() for name, cls in POOLINGS.items()}
    limit = cfg.probe.max_messages
    train, y_train = hidden_states(model, datamodule.eval_dataloader("train"), poolings, limit)
    val, y_val = hidden_states(model, datamodule.eval_dataloader("val"), poolings, limit)
    rows = []
    for block, name in train:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.probe.C, max_iter=2000))
        probe.fit(train[block, name].numpy(), y_train.numpy())
        rows.append({"block": block, "pooling": name,
                     "val_accuracy": probe.score(val[block, name].numpy(), y_val.numpy())})
    table = pd.DataFrame(rows)
    out = Path(cfg.paths.output_dir)
    table.to_csv(out / "probe.csv", index=False)
    grid = table.pivot(index="block", columns="pooling", values="val_accuracy")[list(poolings)]
    draw(grid, out / "probe.png", f"{cfg.model.name} ({cfg.model.weights}): linear probes, validation accuracy")
    print((grid * 100).round(2).to_string())
    print(f"\nwrote {out / 'probe.csv'} and {out / 'probe.png'}")


def draw(grid: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * grid.shape[1] + 2, 0.45 * grid.shape[0] + 1.5))
    image = ax.imshow(grid.to_numpy() * 100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns)
    ax.set_yticks(range(grid.shape[0]), ["emb" if b == 0 else f"block {b}" for b in grid.index])
    for (i, j), value in pd.DataFrame(grid.to_numpy()).stack().items():
        ax.text(j, i, f"{100 * value:.1f}", ha="center", va="center", color="w" if value < grid.to_numpy().mean() else "k")
    ax.set_xlabel("token= (pooling)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="validation accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
