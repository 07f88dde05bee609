"""Tiny random Qwen3 and Llama 3.2 checkpoints, written by transformers' own classes with
``save_pretrained`` (safetensors), at the sizes of ``conf/model/{qwen3,llama3.2}-tiny.yaml``, with
a byte-level BPE tokenizer (no pad token, as Llama's) listed from a few SMS-like texts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_encoders import TEXTS

from spam_lightning.model.decoder import LLAMA3_SCALING

YAML = {"qwen3": "qwen3-tiny", "llama": "llama3.2-tiny"}


def tiny_config(arch: str) -> dict[str, Any]:
    """The tiny yaml's model keys (composed from the package's configs)."""
    from _compose import CONF
    from omegaconf import OmegaConf

    return OmegaConf.to_container(
        OmegaConf.load(CONF / "model" / f"{YAML[arch]}.yaml"), resolve=True
    )


def hf_config(cfg: dict[str, Any], **extra: Any) -> Any:
    """transformers' Qwen3Config / LlamaConfig of a DecoderFamily config."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": cfg["rope_base"]}
    if cfg["rope_scaling"]:
        rope = {
            "rope_type": "llama3",
            "rope_theta": cfg["rope_base"],
            **{k: cfg["rope_scaling"][k] for k in LLAMA3_SCALING},
        }
    kwargs = dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["emb_dim"],
        num_hidden_layers=cfg["n_layers"],
        num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg["n_kv_groups"],
        head_dim=cfg["head_dim"],
        intermediate_size=cfg["hidden_dim"],
        rms_norm_eps=cfg["rms_eps"],
        tie_word_embeddings=cfg["tie_embeddings"],
        max_position_embeddings=16384,
        rope_parameters=rope,
        **extra,
    )
    config_class = transformers.Qwen3Config if cfg["arch"] == "qwen3" else transformers.LlamaConfig
    return config_class(**kwargs)


def tokenizer() -> Any:
    """Byte-level BPE: the 256 bytes and a few merges from TEXTS, plus an EOS and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=400,
        special_tokens=["<|end_of_text|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(TEXTS), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|end_of_text|>", model_max_length=4096
    )


def write_tiny_decoder(folder: Path, arch: str, seed: int = 0) -> Path:
    """A random ``arch`` checkpoint of the tiny yaml's sizes (float32) and its tokenizer."""
    import torch
    import transformers

    cfg = tiny_config(arch)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg))
    with torch.no_grad():  # random norm scales too (they start at 1): parity must cover them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer().save_pretrained(folder)
    return Path(folder)


def write_decoder_hub_cache(home: Path, repo_id: str, arch: str) -> Path:
    """A tiny ``arch`` checkpoint where a download of ``repo_id`` would have put it (the Hugging
    Face cache under ``home``, huggingface_hub's layout: ``refs/main`` names the snapshot)."""
    repo = Path(home) / ".cache" / "huggingface" / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    write_tiny_decoder(repo / "snapshots" / commit, arch)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo
