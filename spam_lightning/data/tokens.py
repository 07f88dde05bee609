"""GPT-2 tokens: the tiktoken encoder (built from the bundled BPE files), encoding,
``max_length`` resolution and batch collation.

``encode_texts`` and ``collate`` are shared by training and inference (``spam-classify``), so a
message is tokenized, truncated and padded the same way everywhere.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from spam_lightning.data.source import DataError, sha256_bytes

PAD_TOKEN_ID = 50256  # <|endoftext|>, the chapter's pad token
PADDING_MODES = ("longest", "batch", "none")


# tiktoken_ext/openai_public.py's ``r50k_pat_str``: GPT-2's split pattern (same pieces, faster).
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
GPT2_SPECIAL_TOKENS = {"<|endoftext|>": PAD_TOKEN_ID}
GPT2_N_VOCAB = 50257
# The bundled openai/gpt-2 BPE files (see assets/README.md), checked on every load.
GPT2_ASSETS = Path(__file__).resolve().parent / "assets" / "gpt2"
GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def _read_verified(path: Path, expected_sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(
            f"{path}: cannot read the bundled GPT-2 BPE file ({e.strerror or e}); the package "
            f"is incomplete: reinstall spam-lightning"
        ) from e
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        raise DataError(
            f"{path}: the bundled GPT-2 BPE file is damaged: sha256 {actual}, expected "
            f"{expected_sha256}; reinstall spam-lightning"
        )
    return data


def gpt2_mergeable_ranks(folder: Path = GPT2_ASSETS) -> dict[bytes, int]:
    """GPT-2's BPE ranks from ``vocab.bpe`` + ``encoder.json`` in ``folder``, read directly.

    The same algorithm as ``tiktoken.load.data_gym_to_mergeable_bpe_ranks`` (which would copy
    local files into tiktoken's cache dir): the 256 single bytes in GPT-2's byte-to-unicode order,
    then every merge in ``vocab.bpe`` order; checked to equal ``encoder.json``'s table.
    """
    folder = Path(folder)
    vocab = _read_verified(folder / "vocab.bpe", GPT2_FILES["vocab.bpe"]).decode("utf-8")
    encoder = _read_verified(folder / "encoder.json", GPT2_FILES["encoder.json"])
    # GPT-2 writes byte b as chr(b) if it is printable and not a space, else as chr(256 + n)
    rank_to_byte = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    char_to_byte = {chr(b): b for b in rank_to_byte}
    n = 0
    printable = set(rank_to_byte)
    for b in range(256):
        if b not in printable:
            rank_to_byte.append(b)
            char_to_byte[chr(256 + n)] = b
            n += 1

    def decode(token: str) -> bytes:
        return bytes(char_to_byte[c] for c in token)

    ranks = {bytes([b]): i for i, b in enumerate(rank_to_byte)}
    for line in vocab.split("\n")[1:-1]:  # a "#version" header, then "first second" per line
        first, second = line.split()
        ranks[decode(first) + decode(second)] = len(ranks)
    table = {decode(k): v for k, v in json.loads(encoder).items()}
    table.pop(b"<|endoftext|>", None)
    if ranks != table:  # unreachable with the verified files; guards edits to this reader
        raise DataError(f"{folder}: vocab.bpe and encoder.json disagree")
    return ranks


def load_gpt2_encoding(folder: Path = GPT2_ASSETS) -> Any:
    """tiktoken's ``gpt2`` encoding built from the BPE files in ``folder`` (offline, no cache)."""
    import tiktoken

    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=gpt2_mergeable_ranks(folder),
        special_tokens=dict(GPT2_SPECIAL_TOKENS),
        explicit_n_vocab=GPT2_N_VOCAB,
    )


@functools.cache
def get_tokenizer() -> Any:
    """tiktoken's ``gpt2`` encoding from the bundled BPE files, loaded once per process.

    Offline by construction: no download, no ``TIKTOKEN_CACHE_DIR``, nothing written anywhere.
    The ids equal ``tiktoken.get_encoding("gpt2")``'s (tests/test_tokenizer.py).
    """
    return load_gpt2_encoding(GPT2_ASSETS)


def encode_texts(
    texts: Sequence[str],
    max_length: int | None = None,
    context_length: int | None = None,
    tokenizer: Any = None,
) -> list[list[int]]:
    """Encode each text with GPT-2 BPE and truncate it to ``min(max_length, context_length)``
    (whichever are given), as the chapter's ``SpamDataset`` / ``classify_review`` do.

    Special-token strings such as ``<|endoftext|>`` inside a text are encoded as plain text (the
    chapter's ``encode`` would raise on them; user input must never inject a pad token).
    Pass neither limit to get the full encodings (used to find the longest training text).
    """
    tok = tokenizer if tokenizer is not None else get_tokenizer()
    limits = [v for v in (max_length, context_length) if v is not None]
    limit = min(limits) if limits else None
    out = tok.encode_batch(list(texts), disallowed_special=())
    return [ids[:limit] for ids in out] if limit is not None else out


def resolve_max_length(
    max_length: int | str | None, train_token_ids: Sequence[Sequence[int]], context_length: int
) -> int:
    """``null`` -> the longest training sequence, ``"model"`` -> ``context_length``, or an int.

    Raises if the result exceeds the model's context length (the chapter's assert).
    """
    if max_length is None:
        longest = max((len(ids) for ids in train_token_ids), default=0)
        if longest > context_length:
            raise ValueError(
                f"the longest training sequence has {longest} tokens, more than the model's "
                f"context length {context_length} (data.max_length=null pads to the longest). "
                f"Set data.max_length=model or an integer <= {context_length} to truncate."
            )
        return max(longest, 1)
    if max_length == "model":
        return int(context_length)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(
            f"data.max_length={max_length!r}: allowed values are null, model or an integer >= 1"
        )
    if max_length > context_length:
        raise ValueError(
            f"data.max_length={max_length} exceeds the model's context length {context_length}"
        )
    return max_length


def collate(
    token_lists: Sequence[Sequence[int]],
    labels: Sequence[int] | None = None,
    padding: str = "longest",
    max_length: int | None = None,
    pad_token_id: int = PAD_TOKEN_ID,
    indices: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Build a batch dict (``input_ids``, ``lengths``, ``index`` and, if given, ``labels``).

    ``padding``: ``longest`` right-pads to ``max_length`` (the chapter; required), ``batch`` to
    the batch's longest sequence, ``none`` stacks unpadded sequences (they must be equally
    long: use batch size 1). Sequences must be non-empty and at most ``max_length`` long
    (truncate with ``encode_texts``); ``lengths`` are the true lengths, so no caller has to
    guess them from pad ids (a text may itself contain token 50256).
    """
    if padding not in PADDING_MODES:
        raise ValueError(f"padding={padding!r}: allowed values are {', '.join(PADDING_MODES)}")
    if not token_lists:
        raise ValueError("collate() needs at least one sequence")
    lengths = [len(ids) for ids in token_lists]
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"sequence {i} is empty (an empty text has no tokens)")
        if max_length is not None and n > max_length:
            raise ValueError(
                f"sequence {i} has {n} tokens > max_length {max_length}; truncate it first "
                f"(encode_texts(..., max_length=...))"
            )
    if padding == "longest":
        if max_length is None:
            raise ValueError("padding='longest' pads to max_length, which must be given")
        width = max_length
    elif padding == "batch":
        width = max(lengths)
    else:
        if len(set(lengths)) > 1:
            raise ValueError(
                "padding='none' cannot batch sequences of different lengths; use batch size 1"
            )
        width = lengths[0]
    input_ids = torch.full((len(token_lists), width), pad_token_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    batch = {
        "input_ids": input_ids,
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "index": torch.as_tensor(
            list(indices) if indices is not None else range(len(token_lists)), dtype=torch.long
        ),
    }
    if labels is not None:
        batch["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
    return batch


class Collator:
    """Picklable ``collate_fn`` for ``(token_ids, label, index)`` items (works in workers)."""

    def __init__(self, padding: str, max_length: int, pad_token_id: int = PAD_TOKEN_ID) -> None:
        self.padding = padding
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[tuple[list[int], int, int]]) -> dict[str, torch.Tensor]:
        ids, labels, indices = zip(*items, strict=True)
        return collate(ids, labels, self.padding, self.max_length, self.pad_token_id, indices)

    def __repr__(self) -> str:
        return f"Collator(padding={self.padding!r}, max_length={self.max_length})"
