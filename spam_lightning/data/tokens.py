"""GPT-2 tokens (tiktoken from the bundled BPE files), ``max_length`` and collation, shared by
training and inference so a message is tokenized, truncated and padded the same everywhere."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from spam_lightning.data.source import DataError, sha256_bytes
from spam_lightning.rules import choice_problems, is_int

PAD_TOKEN_ID = 50256  # <|endoftext|>, the chapter's pad token
# characters tokenized in one encode_batch call: a batch holds at most this many texts' tokens
ENCODE_BATCH_CHARS = 1 << 20
PADDING_MODES = ("longest", "batch", "none")
GPT2_ASSETS = Path(__file__).resolve().parent / "assets" / "gpt2"  # see assets/README.md
GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def _read_verified(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the bundled GPT-2 BPE file ({e.strerror or e}); the "
                        f"package is incomplete: reinstall spam-lightning") from e
    if (actual := sha256_bytes(data)) != GPT2_FILES[path.name]:
        raise DataError(f"{path}: the bundled GPT-2 BPE file is damaged: sha256 {actual}, "
                        f"expected {GPT2_FILES[path.name]}; reinstall spam-lightning")
    return data


def gpt2_mergeable_ranks(folder: Path = GPT2_ASSETS) -> dict[bytes, int]:
    """``tiktoken.load.data_gym_to_mergeable_bpe_ranks`` without its cache (which writes copies):
    the 256 bytes in GPT-2's order, then every merge; checked against ``encoder.json``."""
    vocab = _read_verified(Path(folder) / "vocab.bpe").decode("utf-8")
    encoder = json.loads(_read_verified(Path(folder) / "encoder.json"))
    # GPT-2 writes byte b as chr(b) if it is printable and not a space, else as chr(256 + n)
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    rest = [b for b in range(256) if b not in printable]
    char_to_byte = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(rest)}

    def decode(token: str) -> bytes:
        return bytes(char_to_byte[c] for c in token)

    ranks = {bytes([b]): i for i, b in enumerate(printable + rest)}
    for line in vocab.split("\n")[1:-1]:  # a "#version" header, then "first second" per line
        first, second = line.split()
        ranks[decode(first) + decode(second)] = len(ranks)
    table = {decode(k): v for k, v in encoder.items() if k != "<|endoftext|>"}
    if ranks != table:  # unreachable with the verified files; guards edits to this reader
        raise DataError(f"{folder}: vocab.bpe and encoder.json disagree")
    return ranks


def load_gpt2_encoding(folder: Path = GPT2_ASSETS) -> Any:
    """tiktoken's ``gpt2`` encoding from the BPE files in ``folder`` (offline, no cache)."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's split pattern

    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str,
                             mergeable_ranks=gpt2_mergeable_ranks(folder),
                             special_tokens={"<|endoftext|>": PAD_TOKEN_ID}, explicit_n_vocab=50257)


@functools.cache
def gpt2_pieces() -> Any:
    """GPT-2's split pattern, compiled (``regex``, tiktoken's dependency, has ``\\p{L}``)."""
    import regex
    from tiktoken_ext.openai_public import r50k_pat_str

    return regex.compile(r50k_pat_str)


def token_prefix(text: str, limit: int) -> str:
    """A prefix of ``text`` whose first ``limit`` GPT-2 tokens are exactly those of ``text``: the
    text up to and including the first character of its piece ``limit + 2`` (the whole text if
    it has fewer pieces). Proof: GPT-2 cuts a text into pieces with its pattern (a contraction,
    `` ?letters``, `` ?digits``, `` ?other symbols``, whitespace) and byte-pair encodes each piece
    on its own, so every piece gives at least one token and the first ``limit`` tokens come from
    the first ``limit`` pieces. Matching a piece reads no further than the first character of the
    piece after next: a letter, digit or symbol run stops at the first character of the next
    piece; a contraction reads at most two characters past its quote; a whitespace run reads the
    character after the run and may leave its last space to the next piece, so that character
    begins the next piece or the one after. Matching pieces 1..``limit`` therefore reads nothing
    past the first character of piece ``limit + 2``: cut there, they are the same pieces with the
    same tokens. The cost is the pieces read (at most ``limit + 2``), not the text's length
    (tests/inference/test_untrusted_input.py compares it with full tokenization)."""
    if len(text) <= limit + 1:  # at most limit + 1 pieces: nothing to cut
        return text
    for n, piece in enumerate(gpt2_pieces().finditer(text)):
        if n == limit + 1:
            return text[: piece.start() + 1]
    return text


def _char_batches(texts: list[str], budget: int = ENCODE_BATCH_CHARS) -> Iterator[list[str]]:
    """Consecutive texts of at most ``budget`` characters in all (a longer text on its own)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        if batch and size + len(text) > budget:
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += len(text)
    if batch:
        yield batch


@functools.cache
def get_tokenizer() -> Any:
    """The bundled ``gpt2`` encoding, once per process: no download, nothing written anywhere;
    the ids equal ``tiktoken.get_encoding("gpt2")``'s (tests/data/test_tokenizer.py)."""
    return load_gpt2_encoding(GPT2_ASSETS)


def encode_texts(texts: Sequence[str], max_length: int | None = None,
                 context_length: int | None = None, tokenizer: Any = None) -> list[list[int]]:
    """GPT-2 ids, truncated to ``min(max_length, context_length)`` as the chapter does;
    ``<|endoftext|>`` in a text is plain text (input never injects a pad token). With a limit,
    each text is cut to its ``token_prefix`` first: the same ids, in time and memory bounded by
    what is kept, however long the text; texts are tokenized ``ENCODE_BATCH_CHARS`` at a time."""
    tok = tokenizer if tokenizer is not None else get_tokenizer()
    limit = min((v for v in (max_length, context_length) if v is not None), default=None)
    # the proof is for GPT-2's split pattern: another encoding tokenizes whole texts
    gpt2_split = tokenizer is None or getattr(tok, "_pat_str", None) == gpt2_pieces().pattern
    cut = [token_prefix(t, limit) for t in texts] if limit and gpt2_split else list(texts)
    return [ids[:limit] for batch in _char_batches(cut)
            for ids in tok.encode_batch(batch, disallowed_special=())]


def resolve_max_length(max_length: int | str | None, train_token_ids: Sequence[Sequence[int]],
                       context_length: int) -> int:
    """``null`` -> the longest training sequence, ``"model"`` -> ``context_length``, or an int;
    never more than the context length (the chapter's assert)."""
    if max_length is None:
        longest = max((len(ids) for ids in train_token_ids), default=0)
        if longest > context_length:
            raise ValueError(f"the longest training sequence has {longest} tokens, more than the "
                             f"model's context length {context_length} (data.max_length=null pads "
                             f"to the longest). Set data.max_length=model or an integer <= "
                             f"{context_length} to truncate.")
        return max(longest, 1)
    if max_length == "model":
        return int(context_length)
    if not is_int(max_length, 1):
        raise ValueError(f"data.max_length={max_length!r}: allowed values are null (the longest "
                         f"training sequence), model (the context length) or an integer >= 1")
    if max_length > context_length:
        raise ValueError(f"data.max_length={max_length} exceeds the model's context length "
                         f"{context_length}; use an integer <= {context_length}, or model")
    return max_length


def collate(token_lists: Sequence[Sequence[int]], labels: Sequence[int] | None = None,
            padding: str = "longest", max_length: int | None = None,
            pad_token_id: int = PAD_TOKEN_ID,
            indices: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``lengths`` (a text may hold token 50256), ``index``, ``labels``; padded to
    ``max_length`` (``longest``, the chapter), the batch's longest (``batch``) or not (``none``)."""
    if problems := choice_problems("padding", padding, PADDING_MODES):
        raise ValueError(problems[0])
    lengths = [len(ids) for ids in token_lists]
    if 0 in lengths:
        raise ValueError(f"sequence {lengths.index(0)} is empty (an empty text has no tokens)")
    if max_length is not None and max(lengths) > max_length:
        raise ValueError(f"a sequence has {max(lengths)} tokens > max_length {max_length}; truncate "
                         f"it first (encode_texts(..., max_length=...))")
    if padding == "none" and len(set(lengths)) > 1:
        raise ValueError("padding='none' cannot batch sequences of different lengths; use batch "
                         "size 1")
    width = max_length if padding == "longest" else max(lengths)
    input_ids = torch.full((len(token_lists), width), pad_token_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    index = torch.as_tensor(list(indices) if indices is not None else range(len(lengths)))
    batch = {"input_ids": input_ids, "lengths": torch.tensor(lengths), "index": index.long()}
    if labels is not None:
        batch["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
    return batch


class Collator:
    """Picklable ``collate_fn`` for ``(token_ids, label, index)`` items (works in workers)."""

    def __init__(self, padding: str, max_length: int, pad_token_id: int = PAD_TOKEN_ID) -> None:
        self.padding, self.max_length, self.pad_token_id = padding, max_length, pad_token_id

    def __call__(self, items: Sequence[tuple[list[int], int, int]]) -> dict[str, torch.Tensor]:
        ids, labels, indices = zip(*items, strict=True)
        return collate(ids, labels, self.padding, self.max_length, self.pad_token_id, indices)
