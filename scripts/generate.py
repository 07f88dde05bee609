"""Greedy text generation with GPT-2, to see that the weights loaded (chapter 5's check).

    python scripts/generate.py model=gpt2-small prompt="Every effort moves you" max_new_tokens=15
    python scripts/generate.py model.checkpoint=/path/to/model.safetensors
    python scripts/generate.py model=gpt2-tiny   # random weights: gibberish, but it runs

Pretrained weights print a fluent continuation; random or badly mapped ones print gibberish.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too

import hydra
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

import spam_lightning.resolvers  # noqa: F401  (${gpt2:...} sizes in the model configs)
from spam_lightning.model.gpt import generate_text_simple, text_to_token_ids, token_ids_to_text
from spam_lightning.model.weights import (
    CheckpointError,
    WeightsUnavailableError,
    build_gpt,
    check_weights_available,
)


@hydra.main(config_path="pkg://spam_lightning.conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    options = {k: v for k, v in cfg.model.items() if k not in ("checkpoint", "_target_")}
    checkpoint = cfg.model.checkpoint
    try:
        if cfg.model.weights == "pretrained" and not checkpoint:  # train.py's quick check, not
            check_weights_available(cfg.model.name)  # huggingface_hub's retries (25 s offline)
        model = build_gpt(
            **options, checkpoint=to_absolute_path(checkpoint) if checkpoint else None
        )
    except (CheckpointError, WeightsUnavailableError, ValueError) as err:
        sys.exit(f"error: {err}")
    model.eval()
    idx = text_to_token_ids(cfg.prompt)
    out = generate_text_simple(
        model, idx, max_new_tokens=cfg.max_new_tokens, context_size=model.cfg["context_length"]
    )
    print(token_ids_to_text(out))


if __name__ == "__main__":
    main()
