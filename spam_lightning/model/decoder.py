"""Modern decoders (``conf/model/qwen3-*.yaml``, ``conf/model/llama3.2-*.yaml``): Qwen3 and Llama
3.2 written in plain PyTorch as the book writes them (ch05/07_gpt_to_llama, ch05/11_qwen3), with
GPTModel's module names (``tok_emb``, ``trf_blocks``, ``final_norm``, ``out_head``, ``att.W_query``,
...), so the chapter's machinery works on them unchanged: ``make_classifier`` (every
``trainable``), ``GPTClassifier``'s forward (every ``token=`` pooling, a forward that starts at
block k), the frozen-trunk cache, LoRA, the frozen base's digest and the delta bundle.

What differs from GPT-2: rotary position embeddings (RoPE; Llama 3.2 with its "llama3" frequency
scaling) applied to queries and keys inside each attention instead of a position table, grouped-
query attention (``n_kv_groups`` key/value heads), RMSNorm, a SwiGLU feed-forward (``fc1`` gate,
``fc2`` up, ``fc3`` down), Qwen3's RMSNorm of queries and keys, tied input/output embeddings,
no biases and no dropout. Weights: Hugging Face safetensors (a Hub repo or a local folder); the
tokenizer: the checkpoint's own ``tokenizer.json`` (transformers), or the bundled GPT-2 BPE.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from spam_lightning.model.classifier import TRAINABLE, GPTClassifier, make_classifier
from spam_lightning.model.family import Predictor
from spam_lightning.model.gpt import GPTModel
from spam_lightning.model.gpt2 import GPT2Predictor, TrunkCachedFamily
from spam_lightning.model.pooling import pooling_names
from spam_lightning.model.weights import CheckpointError, WeightsUnavailableError, mismatch_lines
from spam_lightning.rules import choice_problems, is_int

ARCHS = ("qwen3", "llama")
# the keys of a DecoderModel config (bundle.json's "model"), besides ``causal_mask`` (always true)
DECODER_KEYS = (
    "arch",
    "vocab_size",
    "context_length",
    "emb_dim",
    "n_layers",
    "n_heads",
    "n_kv_groups",
    "head_dim",
    "hidden_dim",
    "qk_norm",
    "rope_base",
    "rope_scaling",
    "rms_eps",
    "tie_embeddings",
)
SIZE_KEYS = (
    "vocab_size",
    "context_length",
    "emb_dim",
    "n_layers",
    "n_heads",
    "n_kv_groups",
    "head_dim",
    "hidden_dim",
)
LLAMA3_SCALING = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)
GPT2_TOKENIZER = (
    "gpt2"  # model.tokenizer_source=gpt2: the bundled GPT-2 BPE (ids 0..50256, pads with 50256)
)
GPT2_VOCAB = 50257
TOKENIZER_FIX = (
    "set model.tokenizer_source to a folder or Hub id holding the model's tokenizer.json, "
    "or model.tokenizer_source=gpt2 for the bundled GPT-2 BPE (offline; with random weights)"
)


# ------------------------------------------------------------------------------------ the model
def rope_inv_freq(
    head_dim: int, base: float, scaling: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """RoPE's inverse frequencies ``[head_dim // 2]`` (float32), with Llama 3's frequency scaling:
    long wavelengths slowed by ``factor``, short ones kept, the band between interpolated."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos and sin of ``position * inv_freq`` (each frequency twice), computed in float32 for the
    positions asked for: no table, no tensor in the state dict."""

    def __init__(
        self, head_dim: int, base: float, scaling: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.head_dim, self.base, self.scaling = (
            head_dim,
            float(base),
            dict(scaling) if scaling else None,
        )

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [...] -> (cos, sin) [..., head_dim] in ``dtype``."""
        inv = rope_inv_freq(self.head_dim, self.base, self.scaling).to(positions.device)
        with torch.autocast(positions.device.type, enabled=False):
            angles = positions.float()[..., None] * inv
            angles = torch.cat((angles, angles), dim=-1)
            return angles.cos().to(dtype), angles.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}, scaling={self.scaling}"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (i, i + head_dim/2) of ``x`` [B, heads, T, head_dim] by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    """RMSNorm (the book's Qwen3 name, ``scale``), normalised in float32 whatever the dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.rms_norm(x.float(), self.scale.shape, eps=self.eps).to(x.dtype)


class GroupedQueryAttention(nn.Module):
    """Causal attention with ``n_kv_groups`` key/value heads shared by the ``n_heads`` query heads,
    RoPE on queries and keys (after Qwen3's per-head RMSNorm of each), via PyTorch's SDPA."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        d_in, self.num_heads, self.num_kv = cfg["emb_dim"], cfg["n_heads"], cfg["n_kv_groups"]
        self.head_dim = hd = cfg["head_dim"]
        self.W_query = nn.Linear(d_in, self.num_heads * hd, bias=False)
        self.W_key = nn.Linear(d_in, self.num_kv * hd, bias=False)
        self.W_value = nn.Linear(d_in, self.num_kv * hd, bias=False)
        self.out_proj = nn.Linear(self.num_heads * hd, d_in, bias=False)
        self.q_norm = RMSNorm(hd, cfg["rms_eps"]) if cfg["qk_norm"] else None
        self.k_norm = RMSNorm(hd, cfg["rms_eps"]) if cfg["qk_norm"] else None
        self.rope = RotaryEmbedding(hd, cfg["rope_base"], cfg["rope_scaling"])

    def _heads(
        self, linear: nn.Module, x: torch.Tensor, n: int, norm: nn.Module | None
    ) -> torch.Tensor:
        """[b, T, d_in] -> [b, n, T, head_dim], RMS-normalised per head (Qwen3)."""
        x = linear(x).view(x.shape[0], x.shape[1], n, self.head_dim)
        return (norm(x) if norm is not None else x).transpose(1, 2)

    def _keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._heads(self.W_key, x, self.num_kv, self.k_norm)
        cos, sin = self.rope(torch.arange(x.shape[1], device=x.device), k.dtype)
        return apply_rope(k, cos, sin), self._heads(self.W_value, x, self.num_kv, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        q = self._heads(self.W_query, x, self.num_heads, self.q_norm)
        cos, sin = self.rope(torch.arange(num_tokens, device=x.device), q.dtype)
        k, v = self._keys_values(x)
        context = F.scaled_dot_product_attention(
            apply_rope(q, cos, sin), k, v, is_causal=True, enable_gqa=self.num_kv != self.num_heads
        )
        return self.out_proj(context.transpose(1, 2).reshape(b, num_tokens, -1))

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``forward(x)[b, positions[b]]``: one query row per sequence (rotated by its own
        position), keys and values from every position, the causal mask as "keys <= position"."""
        b, num_tokens, _ = x.shape
        q = self._heads(
            self.W_query,
            x[torch.arange(b, device=x.device), positions].unsqueeze(1),
            self.num_heads,
            self.q_norm,
        )
        cos, sin = self.rope(positions, q.dtype)  # [B, head_dim]
        q = apply_rope(q, cos[:, None, None], sin[:, None, None])
        k, v = self._keys_values(x)
        mask = None
        if not bool((positions == num_tokens - 1).all()):
            keep = torch.arange(num_tokens, device=x.device)[None, :] <= positions[:, None]
            mask = keep[:, None, None, :]  # [B, 1, 1, T]
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.num_kv != self.num_heads
        )
        return self.out_proj(context.transpose(1, 2).reshape(b, -1))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_kv_groups={self.num_kv}, head_dim={self.head_dim}"


class FeedForward(nn.Module):
    """SwiGLU: ``fc3(silu(fc1(x)) * fc2(x))`` (the book's names: gate, up, down)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False)
        self.fc2 = nn.Linear(cfg["emb_dim"], cfg["hidden_dim"], bias=False)
        self.fc3 = nn.Linear(cfg["hidden_dim"], cfg["emb_dim"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.silu(self.fc1(x)) * self.fc2(x))


class DecoderBlock(nn.Module):
    """Pre-RMSNorm block: x + att(norm1(x)), then x + ff(norm2(x))."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.att = GroupedQueryAttention(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = RMSNorm(cfg["emb_dim"], cfg["rms_eps"])
        self.norm2 = RMSNorm(cfg["emb_dim"], cfg["rms_eps"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.att(self.norm1(x))
        return x + self.ff(self.norm2(x))

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``forward(x)[b, positions[b]]`` computed on B rows (the classifier's last block)."""
        out = x[torch.arange(x.shape[0], device=x.device), positions] + self.att.forward_at(
            self.norm1(x), positions
        )
        return out + self.ff(self.norm2(out))


def decoder_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The model's keys from ``cfg`` (a yaml section or a bundle's ``model``) as plain values."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if missing := [k for k in DECODER_KEYS if k not in cfg]:
        raise ValueError(f"decoder config is missing {missing}; it needs {list(DECODER_KEYS)}")
    out = {k: cfg[k] for k in DECODER_KEYS}
    out["rope_scaling"] = dict(out["rope_scaling"]) if out["rope_scaling"] else None
    return {**out, "causal_mask": True}


class DecoderModel(GPTModel):
    """Qwen3 / Llama 3.2: token embeddings, ``n_layers`` DecoderBlocks, final RMSNorm, LM head
    (tied to the embeddings when ``tie_embeddings``). ``pos_emb`` and ``drop_emb`` are identities
    (RoPE lives in each attention; no dropout), so GPTModel's ``run_blocks``/``head`` and the trunk
    cache see the same structure as GPT-2's."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        nn.Module.__init__(self)
        self.cfg = cfg = decoder_config(cfg)
        if cfg["n_heads"] % cfg["n_kv_groups"]:
            raise ValueError(
                f"n_heads={cfg['n_heads']} is not divisible by n_kv_groups={cfg['n_kv_groups']}"
            )
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb, self.drop_emb = nn.Identity(), nn.Identity()
        self.trf_blocks = nn.Sequential(*[DecoderBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = RMSNorm(cfg["emb_dim"], cfg["rms_eps"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        if cfg["tie_embeddings"]:
            self.out_head.weight = self.tok_emb.weight

    def embed(self, in_idx: torch.Tensor) -> torch.Tensor:
        seq_len, limit = in_idx.shape[1], self.cfg["context_length"]
        if seq_len > limit:
            raise ValueError(f"sequence of {seq_len} tokens exceeds context_length={limit}")
        return self.tok_emb(in_idx)


class DecoderClassifier(GPTClassifier, DecoderModel):
    """GPTClassifier's forward (pooling, shortcuts, start at block k) on DecoderModel's modules."""


# ------------------------------------------------------------------------------------ weights
# A Hugging Face Qwen3/Llama tensor -> the DecoderModel parameter it fills ({i}: block index)
HF_LAYOUT = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "final_norm.scale",
    "lm_head.weight": "out_head.weight",
}
HF_BLOCK_LAYOUT = {
    "input_layernorm.weight": "norm1.scale",
    "post_attention_layernorm.weight": "norm2.scale",
    "self_attn.q_proj.weight": "att.W_query.weight",
    "self_attn.k_proj.weight": "att.W_key.weight",
    "self_attn.v_proj.weight": "att.W_value.weight",
    "self_attn.o_proj.weight": "att.out_proj.weight",
    "self_attn.q_norm.weight": "att.q_norm.scale",
    "self_attn.k_norm.weight": "att.k_norm.scale",
    "mlp.gate_proj.weight": "ff.fc1.weight",
    "mlp.up_proj.weight": "ff.fc2.weight",
    "mlp.down_proj.weight": "ff.fc3.weight",
}


def hf_layout(cfg: Mapping[str, Any]) -> dict[str, str]:
    """Every tensor a checkpoint of ``cfg`` holds (Hub name -> DecoderModel parameter)."""
    with torch.device("meta"):
        ours = set(DecoderModel(cfg).state_dict())
    if cfg["tie_embeddings"]:
        ours.discard("out_head.weight")
    layout = dict(HF_LAYOUT)
    for i in range(cfg["n_layers"]):
        layout |= {
            f"model.layers.{i}.{k}": f"trf_blocks.{i}.{v}" for k, v in HF_BLOCK_LAYOUT.items()
        }
    return {k: v for k, v in layout.items() if v in ours}


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: ``model.safetensors`` or the shards of
    ``model.safetensors.index.json``."""
    if (single := folder / "model.safetensors").is_file():
        return [single]
    if (index := folder / "model.safetensors.index.json").is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from err
        return [folder / s for s in shards]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return [folder / found[0]]
    raise CheckpointError(
        f"{folder} holds no model.safetensors (nor model.safetensors.index.json); "
        "weights are read only from safetensors"
    )


def _header(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    from safetensors import safe_open

    shapes = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes |= {k: (tuple(handle.get_slice(k).get_shape()), path) for k in handle.keys()}
        except Exception as err:  # SafetensorError, OSError: truncated or not safetensors
            raise CheckpointError(f"cannot read {path} as safetensors: {err}") from err
    return shapes


def check_decoder_checkpoint(
    folder: Path, cfg: Mapping[str, Any]
) -> dict[str, tuple[tuple[int, ...], Path]]:
    """One CheckpointError naming every difference between the checkpoint in ``folder`` and the
    configured model (its ``config.json`` and its tensors' names and shapes); else its header."""
    lines = hf_config_problems(folder, cfg)
    header = _header(weight_files(folder))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DecoderModel(cfg).state_dict().items()}
    want = {hf: shapes[ours] for hf, ours in hf_layout(cfg).items()}
    have = {
        k: s
        for k, (s, _) in header.items()
        if not (k == "lm_head.weight" and cfg["tie_embeddings"])
    }
    lines += mismatch_lines(want, have, most=5)
    if lines:
        raise CheckpointError(
            f"checkpoint {folder} does not match model={cfg.get('name', cfg['arch'])} "
            "as configured:\n  " + "\n  ".join(lines) + "\n  Override the model.* sizes "
            "to the checkpoint's, or pick another checkpoint."
        )
    return header


# config.json's names of our keys (transformers' Qwen3Config / LlamaConfig)
HF_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "emb_dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_groups": "num_key_value_heads",
    "head_dim": "head_dim",
    "hidden_dim": "intermediate_size",
    "rms_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}


def read_hf_config(folder: Path) -> dict[str, Any]:
    """Our keys from the folder's ``config.json`` (those it states), or {} without one."""
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(hf, dict):
        return {}
    out = {ours: hf[theirs] for ours, theirs in HF_CONFIG_KEYS.items() if theirs in hf}
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if (theta := hf.get("rope_theta", rope.get("rope_theta"))) is not None:
        out["rope_base"] = float(theta)
    kind = rope.get("rope_type", rope.get("type", "default"))
    out["rope_scaling"] = {k: rope[k] for k in LLAMA3_SCALING} if kind == "llama3" else None
    if (model_type := hf.get("model_type")) in ("qwen3", "llama"):
        out["arch"] = model_type
    return out


def hf_config_problems(folder: Path, cfg: Mapping[str, Any]) -> list[str]:
    found = read_hf_config(folder)
    return [
        f"model.{k}={cfg[k]!r} but its config.json has {v!r}"
        for k, v in found.items()
        if k in cfg and not _same(cfg[k], v)
    ]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def load_decoder(folder: Path, cfg: Mapping[str, Any]) -> DecoderModel:
    """A DecoderModel of ``cfg`` with the weights of the checkpoint in ``folder``, built on the
    meta device and filled tensor by tensor (float32): one copy of the weights in memory."""
    from safetensors import safe_open

    header = check_decoder_checkpoint(folder, cfg)
    with torch.device("meta"):
        model = DecoderModel(cfg)
    model.to_empty(device="cpu")
    if cfg["tie_embeddings"]:
        model.out_head.weight = model.tok_emb.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for hf, ours in hf_layout(cfg).items():
        by_file.setdefault(header[hf][1], []).append((hf, ours))
    not_finite = []
    with torch.no_grad():
        for path, pairs in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for hf, ours in pairs:
                    tensor = handle.get_tensor(hf)
                    if not bool(torch.isfinite(tensor).all()):
                        not_finite.append(hf)
                    params[ours].copy_(tensor)
    if not_finite:
        raise CheckpointError(
            f"checkpoint {folder}: {len(not_finite)} tensor(s) hold NaN or infinite values: "
            f"{', '.join(not_finite[:5])}; use other weights"
        )
    return model


# ------------------------------------------------------------------------------------ the Hub
HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
]


TOKENIZER_PATTERNS = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
]


def hub_folder(repo: str, local_only: bool = False, patterns: list[str] = HUB_PATTERNS) -> Path:
    """The repo's snapshot folder in the Hugging Face cache (downloaded unless ``local_only`` or
    HF_HUB_OFFLINE): config, safetensors and tokenizer files only."""
    from huggingface_hub import snapshot_download

    from spam_lightning.model.weights import hub_settings

    cache, endpoint, offline = hub_settings()
    try:
        return Path(
            snapshot_download(repo, cache_dir=cache, allow_patterns=patterns, local_files_only=True)
        )
    except Exception as err:  # not cached (LocalEntryNotFoundError), or not a valid repo id
        if local_only or offline:
            why = "HF_HUB_OFFLINE is set" if offline else "only the cache was looked at"
            raise _unavailable(
                repo, f"it is not in the Hugging Face cache ({cache}); {why}"
            ) from err
    try:
        return Path(
            snapshot_download(repo, cache_dir=cache, endpoint=endpoint, allow_patterns=patterns)
        )
    except Exception as err:  # offline, HTTP (gated repos: 401/403), connection errors
        first = str(err).strip().split("\n")[0]
        raise _unavailable(repo, f"downloading it failed ({type(err).__name__}: {first})") from err


def check_hub(repo: str, what: str = "config.json") -> None:
    """Fail fast: ``repo`` is in the cache, or the Hub answers for its ``what`` (one probe)."""
    import re

    from huggingface_hub import get_token

    from spam_lightning.model.weights import HUB_CHECK_TIMEOUT, _probe, hub_settings

    try:
        hub_folder(repo, local_only=True)
        return
    except WeightsUnavailableError as err:
        cache, endpoint, offline = hub_settings()
        if offline:
            raise err
    reason = _probe(f"{endpoint}/{repo}/resolve/main/{what}", HUB_CHECK_TIMEOUT)
    if reason is not None and not (
        re.search(r"HTTP 40[13]", reason) and get_token()
    ):  # gated: the token decides
        raise _unavailable(
            repo,
            f"it is not in the Hugging Face cache ({cache}) and the Hub ({endpoint}) "
            f"cannot serve it: {reason}",
        )


def _unavailable(repo: str, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"model.repo={repo}: cannot load it: {reason}. Fix: pass a local folder with "
        "model.checkpoint=/path/to/folder (config.json, *.safetensors and tokenizer.json, as "
        "save_pretrained writes them), train from scratch with model.weights=random "
        "model.tokenizer_source=gpt2, or go online once (gated repos such as meta-llama's also "
        "need "
        "`hf auth login`)."
    )


# ------------------------------------------------------------------------------------ tokenizer
class DecoderTokenizer:
    """A checkpoint's own tokenizer (transformers' AutoTokenizer from its tokenizer.json) with the
    interface the data module uses. Without a pad token it pads with its EOS token: the
    classifier pools by the true lengths, never by looking for a pad id."""

    def __init__(self, source: str | Path) -> None:
        from spam_lightning.model.encoder import _require_transformers

        transformers = _require_transformers()
        self.name = str(source)
        self._tok = transformers.AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        pad = (
            self._tok.pad_token_id if self._tok.pad_token_id is not None else self._tok.eos_token_id
        )
        if pad is None:
            raise ValueError(f"the tokenizer in {source} has neither a pad nor an EOS token")
        self.pad_token_id: int = int(pad)
        self.model_max_length: int = int(min(self._tok.model_max_length, 1_000_000))

    def __len__(self) -> int:
        return len(self._tok)

    def encode(self, texts: list[str], limit: int | None) -> list[list[int]]:
        """Ids with the tokenizer's own special tokens (Llama: BOS), cut to ``limit`` in all."""
        if not texts:
            return []
        out = self._tok(list(texts), truncation=limit is not None, max_length=limit)
        return [list(ids) for ids in out["input_ids"]]

    def save(self, folder: Path) -> None:
        self._tok.save_pretrained(str(folder))


# ------------------------------------------------------------------------------------ the family
def build_decoder(
    cfg: DictConfig, num_classes: int, weights: str | None = None
) -> DecoderClassifier:
    """The configured decoder (pretrained: its checkpoint or Hub snapshot; random: seeded) as a
    classifier per ``trainable`` and ``token``."""
    from spam_lightning.training.checks import classifier_options

    m = cfg.model
    weights = weights or m.weights
    torch.manual_seed(cfg.seed)
    config = {**decoder_config(m), "name": m.name}
    model = DecoderModel(config) if weights == "random" else load_decoder(weights_folder(m), config)
    model = make_classifier(
        model, num_classes=num_classes, seed=cfg.seed, **classifier_options(cfg)
    )
    if m.get("compile", False):
        for block in model.trf_blocks:
            block.compile(dynamic=True)
    return DecoderClassifier(model, token=cfg.token)


def weights_folder(m: Any) -> Path:
    """The checkpoint folder of ``model.checkpoint`` (a folder, or a file inside one), else the
    Hub snapshot of ``model.repo``."""
    if m.checkpoint is not None:
        path = Path(str(m.checkpoint)).expanduser()
        return path.parent if path.is_file() else path
    return hub_folder(str(m.repo))


@dataclass
class DecoderFamily(TrunkCachedFamily):
    """Qwen3 and Llama 3.2 (``conf/model/qwen3-0.6b.yaml``): the chapter's options on a modern
    decoder. ``tokenizer_source``: null (the checkpoint's or Hub repo's own), ``gpt2`` (the
    bundled BPE),
    or a folder / Hub id holding a tokenizer.json."""

    kind = "decoder"
    plain_options = {"weights": "random", "checkpoint": None, "compile": False}
    name: str = "qwen3-0.6b"
    repo: str | None = "Qwen/Qwen3-0.6B-Base"
    weights: str = "pretrained"
    checkpoint: str | None = None
    tokenizer_source: str | None = None
    compile: bool = False
    arch: str = "qwen3"
    vocab_size: Any = 151936
    context_length: Any = 32768
    emb_dim: Any = 1024
    n_layers: Any = 28
    n_heads: Any = 16
    n_kv_groups: Any = 8
    head_dim: Any = 128
    hidden_dim: Any = 3072
    qk_norm: Any = True
    rope_base: Any = 1_000_000.0
    rope_scaling: Any = None
    rms_eps: Any = 1e-6
    tie_embeddings: Any = True

    def problems(self, cfg: DictConfig) -> list[str]:
        problems = choice_problems("model.weights", self.weights, ("pretrained", "random"))
        problems += choice_problems("model.arch", self.arch, ARCHS)
        for group, allowed in (("trainable", TRAINABLE), ("token", pooling_names(cfg.token))):
            problems += choice_problems(
                f"{group}.name", cfg[group].name, allowed, f" (choose one with {group}=NAME)"
            )
        bad = [k for k in SIZE_KEYS if not is_int(getattr(self, k), 1)]
        problems += [f"model.{k}={getattr(self, k)!r}: must be an integer >= 1" for k in bad]
        if not bad:
            if self.n_heads % self.n_kv_groups:
                problems.append(
                    f"model.n_heads={self.n_heads} is not divisible by model.n_kv_groups="
                    f"{self.n_kv_groups} (each key/value head serves a group of query heads)"
                )
            if self.head_dim % 2:
                problems.append(
                    f"model.head_dim={self.head_dim}: must be even (RoPE rotates pairs)"
                )
            if self.tokenizer_source == GPT2_TOKENIZER and self.vocab_size < GPT2_VOCAB:
                problems.append(
                    f"model.vocab_size={self.vocab_size}: must be >= {GPT2_VOCAB} with "
                    "model.tokenizer_source=gpt2 (its token ids go up to 50256)"
                )
            rank = cfg.trainable.get("rank") if cfg.trainable.name == "lora" else None
            if is_int(rank, 1) and rank > self.emb_dim:
                problems.append(f"trainable.rank={rank}: must be <= model.emb_dim={self.emb_dim}")
            if cfg.trainable.name == "last_two_blocks" and self.n_layers < 2:
                problems.append(
                    f"trainable=last_two_blocks needs at least 2 transformer blocks; model "
                    f"{self.name} has n_layers={self.n_layers}. Use trainable=last_block."
                )
        for key in ("rope_base", "rms_eps"):
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value < math.inf
            ):
                problems.append(f"model.{key}={value!r}: must be a number > 0")
        scaling = self.rope_scaling
        if scaling is not None and not (
            isinstance(scaling, Mapping) and set(scaling) == set(LLAMA3_SCALING)
        ):
            problems.append(
                f"model.rope_scaling={scaling!r}: null or Llama 3's {{{', '.join(LLAMA3_SCALING)}}}"
            )
        from spam_lightning.rules import bool_problems

        problems += bool_problems(
            **{f"model.{k}": getattr(self, k) for k in ("qk_norm", "tie_embeddings")}
        )
        if self.weights == "random" and self.checkpoint is not None:
            problems.append(
                f"model.checkpoint={self.checkpoint} is ignored with model.weights=random; drop "
                "one of them"
            )
        if self.weights == "pretrained" and self.checkpoint is None and not self.repo:
            problems.append(
                f"model {self.name} names no Hub repo: pass model.checkpoint=/path/to/folder "
                "or use model.weights=random"
            )
        if self.checkpoint is not None and not Path(str(self.checkpoint)).expanduser().exists():
            problems.append(f"model.checkpoint={self.checkpoint}: no such file or folder")
        return problems + super().problems(cfg)

    # -- where the weights and the tokenizer come from
    def preflight(self, cfg: DictConfig) -> None:
        """The checkpoint's config and header (or the Hub cache / a probe), then the tokenizer."""
        if self.weights == "pretrained":
            if self.checkpoint is not None:
                check_decoder_checkpoint(
                    weights_folder(cfg.model), {**decoder_config(cfg.model), "name": self.name}
                )
            else:
                check_hub(str(self.repo))
        self._tokenizer = self._load_tokenizer()

    def _tokenizer_source(self) -> str | Path | None:
        if self.tokenizer_source not in (None, GPT2_TOKENIZER):
            path = Path(str(self.tokenizer_source)).expanduser()
            return path if path.is_dir() else str(self.tokenizer_source)
        if self.tokenizer_source == GPT2_TOKENIZER:
            return None
        if self.checkpoint is not None:
            path = Path(str(self.checkpoint)).expanduser()
            return path.parent if path.is_file() else path
        return self.repo

    def _load_tokenizer(self) -> DecoderTokenizer | None:
        from spam_lightning.training.checks import TokenizerError

        source = self._tokenizer_source()
        if source is None:
            return None
        try:
            folder = (
                source
                if isinstance(source, Path)
                else hub_folder(str(source), patterns=TOKENIZER_PATTERNS)
            )
            tokenizer = DecoderTokenizer(folder)
        except (OSError, ValueError, WeightsUnavailableError) as err:
            where = (
                "model.tokenizer_source"
                if self.tokenizer_source
                else ("model.checkpoint" if self.checkpoint else "model.repo")
            )
            raise TokenizerError(
                f"no tokenizer for model={self.name} from {where}={source}: "
                f"{str(err).splitlines()[0].split('. Fix:')[0]}. Fix: {TOKENIZER_FIX}"
            ) from err
        if len(tokenizer) > int(self.vocab_size):
            raise TokenizerError(
                f"the tokenizer from {source} has {len(tokenizer)} tokens, more than "
                f"model.vocab_size={self.vocab_size}; use the model's own tokenizer"
            )
        return tokenizer

    def tokenizer(self, cfg: DictConfig) -> DecoderTokenizer | None:
        """The checkpoint's own tokenizer; None: the bundled GPT-2 BPE (tokenizer_source=gpt2)."""
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def base_identity(self, cfg: DictConfig) -> dict[str, Any]:
        if self.weights == "random":
            return {"name": self.name, "source": "random", "seed": int(cfg.seed)}
        if self.checkpoint is not None:
            return {
                "name": self.name,
                "source": "file",
                "path": str(weights_folder(cfg.model).resolve()),
            }
        folder = hub_folder(str(self.repo), local_only=True)  # .../snapshots/<revision>
        return {"name": self.name, "source": "hub", "repo": self.repo, "revision": folder.name}

    # -- the model
    def build(self, cfg: DictConfig, num_classes: int) -> DecoderClassifier:
        return build_decoder(cfg, num_classes)

    def check_resume(
        self, cfg: DictConfig, path: Path, checkpoint: dict, num_classes: int | None
    ) -> None:
        from spam_lightning.training.checks import check_resume_checkpoint

        if num_classes is None:
            state = checkpoint["state_dict"]
            head = state.get("model.out_head.weight", state.get("model.out_head.linear.weight"))
            num_classes = int(head.shape[0]) if head is not None else 2
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = build_decoder(
                OmegaConf.merge(cfg, {"model": {"compile": False}}), num_classes, weights="random"
            )
        check_resume_checkpoint(
            cfg, path, checkpoint, {k: tuple(v.shape) for k, v in model.state_dict().items()}
        )

    # -- the bundle
    def save(
        self, run_dir: Path, model: Any, datamodule: Any, cfg: DictConfig, trained: dict[str, Any]
    ) -> Path:
        from spam_lightning.inference.bundle import fresh_bundle_dir, save_bundle
        from spam_lightning.training.checks import classifier_options

        out = fresh_bundle_dir(run_dir)
        tokenizer = self.tokenizer(cfg)
        if tokenizer is not None:
            tokenizer.save(out)
        return save_bundle(
            run_dir,
            model,
            class_names=list(datamodule.class_names),
            token=cfg.token.name,
            max_length=datamodule.max_length,
            padding=cfg.data.padding,
            pad_token_id=datamodule.pad_token_id,
            extra={"trained": trained},
            base={**self.base_identity(cfg), "classifier": classifier_options(cfg)},
            out=out,
            kind=self.kind,
            model_config=model.cfg,
            tokenizer=GPT2_TOKENIZER if tokenizer is None else "bundle",
        )

    @classmethod
    def load_model(cls, folder: Path, config: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        """The bundle's classifier (LoRA merged), for ``spam-export``."""
        return load_decoder_bundle(folder, config)

    @classmethod
    def load(
        cls, folder: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype
    ) -> Predictor:
        model, config = load_decoder_bundle(folder, config)
        return DecoderPredictor(model, config, device, dtype, folder)


def base_classifier(config: dict[str, Any], weights: str | None = None) -> DecoderClassifier:
    """The classifier a delta bundle was trained as, on its base rebuilt from ``bundle.json``'s
    ``base`` (Hub cache, file, or the seeded random init as ``build_decoder`` seeds it)."""
    base, m = config["base"], config["model"]
    weights = weights or ("random" if base["source"] == "random" else "pretrained")
    seed = int(base.get("seed", 0))
    torch.manual_seed(seed)
    cfg = {**decoder_config(m), "name": base["name"]}
    if weights == "random":
        model = DecoderModel(cfg)
    else:
        folder = Path(base["path"]) if base["source"] == "file" else _hub_revision(base)
        model = load_decoder(folder, cfg)
    return make_classifier(
        model, num_classes=config["num_classes"], seed=seed, **base["classifier"]
    )


def _hub_revision(base: Mapping[str, Any]) -> Path:
    folder = hub_folder(str(base["repo"]), local_only=True)
    if base.get("revision") and folder.name != base["revision"]:
        sibling = folder.parent / str(base["revision"])
        folder = sibling if sibling.is_dir() else folder  # the digest check names a difference
    return folder


def load_decoder_bundle(
    folder: Path, config: dict[str, Any]
) -> tuple[DecoderClassifier | DecoderModel, dict]:
    """``bundle.json`` checked, then the weights' header, before any model is built."""
    from spam_lightning.data.tokens import PADDING_MODES
    from spam_lightning.inference import bundle
    from spam_lightning.model.pooling import POOLINGS

    config_path, weights_path = folder / bundle.CONFIG, folder / bundle.WEIGHTS
    bundle.check_class_count(config, config_path)
    model_cfg = config.get("model")
    if not isinstance(model_cfg, dict) or any(k not in model_cfg for k in DECODER_KEYS):
        raise bundle.bad_field(config_path, "model", model_cfg)
    try:
        with torch.device("meta"):
            DecoderModel(model_cfg)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise bundle.BundleError(
            f"{config_path}: model does not describe a decoder ({err}); re-create the bundle."
        ) from err
    for key, allowed in (
        ("token", [*POOLINGS]),
        ("padding", [*PADDING_MODES]),
        ("tokenizer", [GPT2_TOKENIZER, "bundle"]),
    ):
        if config.get(key) not in allowed:
            raise bundle.bad_field(config_path, key, config.get(key))
    for key, low in (("max_length", 1), ("pad_token_id", 0)):
        if not is_int(config.get(key), low):
            raise bundle.bad_field(config_path, key, config.get(key))
    if "base" in config:
        base = config["base"]
        if not (
            isinstance(base, dict)
            and base.get("source") in ("hub", "file", "random")
            and isinstance(base.get("sha256"), str)
            and isinstance(base.get("classifier"), dict)
            and base["classifier"].get("trainable") in [*TRAINABLE]
        ):
            raise bundle.bad_field(config_path, "base", base)
    header = bundle.read_header(weights_path)
    if "base" in config:
        bundle.check_delta(config, header, config_path, weights_path, base_classifier)
    else:
        with torch.device("meta"):
            full = DecoderModel(model_cfg)
            full.out_head = nn.Linear(model_cfg["emb_dim"], config["num_classes"])
        expected = {k: tuple(v.shape) for k, v in full.state_dict().items()}
        if problems := mismatch_lines(expected, {k: s for k, (_, s) in header.items()}, most=1):
            raise bundle.BundleError(
                f"{weights_path} does not match {config_path.name}: tensors "
                f"{'; '.join(problems)}. Re-create the bundle with a training run."
            )
    state = bundle.read_state(weights_path)
    if "base" in config:
        return bundle.on_base(config, state, config_path, base_classifier).eval(), config
    model = DecoderModel(model_cfg)
    model.out_head = nn.Linear(model_cfg["emb_dim"], config["num_classes"])
    model.load_state_dict(state)
    return model.eval(), config


class DecoderPredictor(GPT2Predictor):
    """GPT2Predictor's padding and pooling with the bundle's tokenizer (its own or GPT-2's)."""

    classifier = DecoderClassifier

    def __init__(
        self,
        model: Any,
        config: dict[str, Any],
        device: torch.device,
        dtype: torch.dtype,
        folder: Path,
    ) -> None:
        super().__init__(model, config, device, dtype)
        self.own = DecoderTokenizer(folder) if config["tokenizer"] == "bundle" else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.own is None:
            return super().encode(texts)
        return self.own.encode(texts, self.max_length)

    def describe(self) -> dict[str, Any]:
        return {
            k: self.model_cfg[k]
            for k in ("arch", "emb_dim", "n_layers", "n_heads", "n_kv_groups", "context_length")
        }
