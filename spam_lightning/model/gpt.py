"""GPT-2 in plain PyTorch, as built in chapters 3-5 of "Build a Large Language Model (From
Scratch)", with the book's module names (`tok_emb`, `trf_blocks`, `att.W_query`, ...). Attention
runs through `F.scaled_dot_product_attention` (same maths; `causal_mask=False` turns the mask
off), and `forward` is `embed` -> `run_blocks` -> `head`, so a frozen trunk can be cached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spam_lightning.data.tokens import get_tokenizer
from spam_lightning.model.sizes import CFG_KEYS, MODEL_CONFIGS  # noqa: F401  (re-exported)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention (chapter 3), computed by PyTorch's fused SDPA kernel."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False, causal: bool = True) -> None:
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.dropout, self.causal = dropout, causal  # SDPA masks itself: no `mask` buffer
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)

    def _heads(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """[b, T, d_in] -> [b, n_heads, T, head_dim]"""
        return linear(x).view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        q, k, v = (self._heads(w, x) for w in (self.W_query, self.W_key, self.W_value))
        context = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal)
        return self.out_proj(context.transpose(1, 2).contiguous().view(b, num_tokens, self.d_out))

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``forward(x)[b, positions[b]]``: one query row per sequence, keys and values from every
        position, the causal mask as "keys <= position" (none when every query is the last)."""
        b, num_tokens, _ = x.shape
        q = self._heads(self.W_query, x[torch.arange(b, device=x.device), positions].unsqueeze(1))
        k, v = self._heads(self.W_key, x), self._heads(self.W_value, x)
        mask = None
        if self.causal and not bool((positions == num_tokens - 1).all()):
            keep = torch.arange(num_tokens, device=x.device)[None, :] <= positions[:, None]
            mask = keep[:, None, None, :]  # [B, 1, 1, T]: broadcast over heads and the query
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(context.transpose(1, 2).reshape(b, self.d_out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, causal={self.causal}"


class LayerNorm(nn.Module):
    """The book's LayerNorm (`scale`, `shift`, biased variance), via the fused `F.layer_norm`."""

    def __init__(self, emb_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GELU with the tanh approximation GPT-2 was trained with (HF's "gelu_new")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """Position-wise MLP: expand 4x, GELU, project back."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], context_length=cfg["context_length"],
            dropout=cfg["drop_rate"], num_heads=cfg["n_heads"], qkv_bias=cfg["qkv_bias"],
            causal=cfg.get("causal_mask", True))
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_resid = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_resid(self.att(self.norm1(x)))
        x = x + self.drop_resid(self.ff(self.norm2(x)))
        return x

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``forward(x)[b, positions[b]]``, ``[B, emb_dim]``: the query, residual and FeedForward
        run on B rows instead of B*T (the classifier's last block). Works with LoRA too."""
        rows = torch.arange(x.shape[0], device=x.device)
        out = x[rows, positions] + self.drop_resid(self.att.forward_at(self.norm1(x), positions))
        return out + self.drop_resid(self.ff(self.norm2(out)))


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, `n_layers` transformer blocks, final norm, LM head.
    ``gradient_checkpointing``: a block with trainable parameters keeps no activations for the
    backward pass; it runs again there (``torch.utils.checkpoint``, the same dropout masks)."""

    gradient_checkpointing: bool = False

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        if missing := [k for k in CFG_KEYS if k not in cfg]:
            raise ValueError(f"model config is missing {missing}; it needs {list(CFG_KEYS)}")
        if cfg["emb_dim"] % cfg["n_heads"] != 0:
            raise ValueError(f"emb_dim={cfg['emb_dim']} is not divisible by "
                             f"n_heads={cfg['n_heads']}")
        # the book's keys (+ causal_mask) as a plain dict; extra keys such as `name` are dropped
        causal = bool(cfg.get("causal_mask", True))
        self.cfg = cfg = {**{k: cfg[k] for k in CFG_KEYS}, "causal_mask": causal}
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    @property
    def causal_mask(self) -> bool:
        """Whether attention is causal (the trunk cache and pooling shortcuts rely on it)."""
        return self.cfg["causal_mask"]

    def embed(self, in_idx: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> input of the first block [B, T, emb_dim]."""
        seq_len, limit = in_idx.shape[1], self.cfg["context_length"]
        if seq_len > limit:
            raise ValueError(f"sequence of {seq_len} tokens exceeds context_length={limit}")
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        return self.drop_emb(self.tok_emb(in_idx) + pos_embeds)

    def run_blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run blocks `start:end` (Python slice semantics), so the trunk can be split anywhere."""
        for block in self.trf_blocks[start:end]:
            x = self.call_block(block, x)
        return x

    def call_block(self, block: nn.Module, *args: Any, method: str = "forward") -> torch.Tensor:
        """``block.<method>(*args)``, checkpointed where ``gradient_checkpointing`` asks for it
        and the block trains (non-reentrant; the RNG state is restored for the recomputation)."""
        fn = block if method == "forward" else getattr(block, method)  # __call__: hooks, compile
        if (self.gradient_checkpointing and torch.is_grad_enabled()
                and any(p.requires_grad for p in block.parameters())):
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
        return fn(*args)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Last block's output -> logits (`final_norm` then `out_head`)."""
        return self.out_head(self.final_norm(x))

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.run_blocks(self.embed(in_idx)))


def generate_text_simple(model: nn.Module, idx: torch.Tensor, max_new_tokens: int,
                         context_size: int) -> torch.Tensor:
    """The chapter's greedy decoding: append the argmax token `max_new_tokens` times."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]  # crop to the supported context
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]  # only the last position predicts the next token
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # argmax(softmax) == argmax
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def text_to_token_ids(text: str, tokenizer: Any = None) -> torch.Tensor:
    """Text -> [1, T] tensor of GPT-2 ids (the bundled gpt2 BPE files by default)."""
    tokenizer = tokenizer or get_tokenizer()
    return torch.tensor(tokenizer.encode(text, allowed_special={"<|endoftext|>"})).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: Any = None) -> str:
    """[1, T] (or [T]) tensor of ids -> text."""
    tokenizer = tokenizer or get_tokenizer()
    return tokenizer.decode(token_ids.reshape(-1).tolist())
