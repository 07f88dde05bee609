"""Tiny random encoder models of every supported family, saved like a Hub checkpoint.

Pretrained weights cannot be downloaded in the tests, so ``write_tiny_encoder`` builds a
model of the real transformers class (same module names, same masking code) at toy sizes, with
a WordPiece tokenizer trained on a few SMS-like texts, and writes both with ``save_pretrained``
(safetensors): a folder that ``model.name=/path/to/folder`` accepts like a downloaded model.
Building and saving one takes a few tens of milliseconds (after transformers' import).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILIES = ("distilbert", "bert", "roberta", "deberta-v2", "modernbert")

TEXTS = (
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005.",
    "Ok lar... Joking wif u oni...",
    "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward!",
    "Nah I don't think he goes to usf, he lives around here though",
    "Had your mobile 11 months or more? U R entitled to Update to the latest colour mobiles",
    "I'm gonna be home soon and i don't want to talk about this stuff anymore tonight",
    "URGENT! You have won a 1 week FREE membership in our £100,000 Prize Jackpot! Txt CLAIM",
    "Sorry, I'll call later. Are you coming to dinner?",
)
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_POSITIONS = 512  # like BERT: the compare rows pad to 256
# small but real: 2 layers, so `layer[-1]` is not the only layer
SIZES = {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64}


def _tokenizer() -> Any:
    """A BERT-style WordPiece tokenizer: lower-cased, [CLS] text [SEP], [PAD] = 0. The vocabulary
    is listed, not trained (the trainer breaks ties differently from run to run): the special
    tokens, the texts' words, then every character they use, alone and as a ``##`` suffix."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, splitter = (
        normalizers.BertNormalizer(lowercase=True),
        pre_tokenizers.BertPreTokenizer(),
    )
    words = sorted(
        {w for t in TEXTS for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(t))}
    )
    chars = sorted({c for w in words for c in w})
    tokens = [*SPECIAL, *words, *(c for c in chars if c not in words), *(f"##{c}" for c in chars)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, splitter, decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=MAX_POSITIONS,
    )


def _config(family: str, tokenizer: Any, num_labels: int) -> Any:
    """The family's config at toy sizes, its special-token ids those of ``tokenizer`` (RoBERTa
    numbers positions from ``pad_token_id``, so the two must agree)."""
    from transformers import CONFIG_MAPPING

    h, n, a, i = SIZES["hidden"], SIZES["layers"], SIZES["heads"], SIZES["intermediate"]
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "num_labels": num_labels,
    }
    bert_like = {
        "hidden_size": h,
        "num_hidden_layers": n,
        "num_attention_heads": a,
        "intermediate_size": i,
        "max_position_embeddings": MAX_POSITIONS,
    }
    kwargs: dict[str, Any]
    if family == "distilbert":
        kwargs = {
            "dim": h,
            "n_layers": n,
            "n_heads": a,
            "hidden_dim": i,
            "max_position_embeddings": MAX_POSITIONS,
        }
    elif family in ("bert", "roberta"):
        kwargs = dict(bert_like)
        if family == "roberta":  # positions start at pad_token_id + 1
            kwargs["max_position_embeddings"] = MAX_POSITIONS + tokenizer.pad_token_id + 2
    elif family == "deberta-v2":  # deberta-v3's settings: relative attention, no absolute positions
        kwargs = dict(
            bert_like,
            relative_attention=True,
            position_buckets=16,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            max_relative_positions=-1,
            type_vocab_size=0,
            pooler_hidden_size=h,
        )
    elif family == "modernbert":  # one global and one local (sliding-window) attention layer
        kwargs = dict(
            bert_like,
            local_attention=16,
            global_attn_every_n_layers=2,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
        )
    else:
        raise ValueError(f"unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
    return CONFIG_MAPPING[family](**kwargs, **ids)


def write_tiny_encoder(folder: Path, family: str, num_labels: int = 2, head: bool = False) -> Path:
    """Save a tiny random ``family`` encoder and its tokenizer into ``folder`` (safetensors;
    seeded, so the same weights every call); returns ``folder``. Like a Hub checkpoint
    (bert-base-uncased & co.) it holds the bare encoder, so a classifier built from it gets a
    new head; ``head=True`` saves a whole ``num_labels``-class classifier instead."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    folder = Path(folder)
    tokenizer = _tokenizer()
    config = _config(family, tokenizer, num_labels)
    torch.manual_seed(0)
    model = (AutoModelForSequenceClassification if head else AutoModel).from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def write_hub_cache(home: Path, repo_id: str, family: str) -> Path:
    """A tiny ``family`` encoder where a download of ``repo_id`` would have put it: the
    Hugging Face cache under ``home`` (``~/.cache/huggingface/hub``, the default), in
    huggingface_hub's layout (``refs/main`` names a snapshot folder holding the files)."""
    repo = Path(home) / ".cache" / "huggingface" / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    write_tiny_encoder(repo / "snapshots" / commit, family)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo
