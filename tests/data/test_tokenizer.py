"""The GPT-2 tokenizer built from the bundled BPE files: offline, cache-free, and exactly tiktoken's
``gpt2`` encoding."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
from conftest import shared_dir

from spam_lightning.data import DataError, encode_texts, get_tokenizer, read_table
from spam_lightning.data.source import BUNDLED_PATH, sha256_bytes
from spam_lightning.data.tokens import GPT2_ASSETS, GPT2_FILES, load_gpt2_encoding

REPO = Path(__file__).resolve().parents[2]

MIXED = [
    "Do you have time",
    "Hello, world! It's 3:45pm -- don't you'd've known? I'm sure they'll, we're, you've",
    "IT'S LOUD'S 'quoted' ''double''",
    "emoji 😀🎉👍🏽 and flags 🇩🇪 and ZWJ 👩‍👩‍👧",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "mixed中文and English123数字",
    "tabs\t\tand\nnew\n\nlines\r\n   and    runs of     spaces      ",
    "   leading and trailing   ",
    "\n\n\n",
    " ",
    "",
    "<|endoftext|> as text, and <|endoftext|><|endoftext|>",
    "numbers 1234567890 3.14159 -42 1e10 ٣٤٥ ½ ²",
    "URL http://www.example.com/path?q=1&r=2 e-mail a.b@c.de £1000 €5 $3",
    "Ünïcödé àccents ñ ß İ ı ǅ",
    "WINNER!! As a valued network customer you have been selected to receivea £900 prize reward!",
    "\u00a0non-breaking\u2003em-space\u200bzero-width",
]


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    """tiktoken's own ``gpt2`` encoding (its download path): from the shared copy of its cache
    beside the checkout where there is one (CI, these offline machines), else tiktoken's own
    cache or download."""
    cache = shared_dir() / "tiktoken_cache"
    with pytest.MonkeyPatch.context() as mp:
        if cache.is_dir():
            mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        return tiktoken.get_encoding("gpt2")


def sms_texts() -> list[str]:
    return read_table(BUNDLED_PATH.read_bytes(), str(BUNDLED_PATH)).frame["Text"].tolist()


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_ids_equal_tiktoken_gpt2(reference: tiktoken.Encoding) -> None:
    ours = get_tokenizer()
    assert (ours.name, ours.n_vocab, ours.eot_token) == ("gpt2", 50257, 50256)
    assert ours.special_tokens_set == reference.special_tokens_set == {"<|endoftext|>"}
    texts = MIXED + sms_texts()
    assert len(texts) == len(MIXED) + 5572
    for kwargs in ({"disallowed_special": ()}, {"allowed_special": "all"}):
        assert ours.encode_batch(texts, **kwargs) == reference.encode_batch(texts, **kwargs)
    assert ours.encode_ordinary_batch(texts) == reference.encode_ordinary_batch(texts)
    assert ours.encode("<|endoftext|>", allowed_special="all") == [50256]
    with pytest.raises(ValueError, match="disallowed special token"):
        ours.encode("<|endoftext|>")  # tiktoken's default guard, as for the reference
    # every token of the vocabulary decodes to the same bytes
    ids = range(ours.n_vocab)
    assert [ours.decode_single_token_bytes(i) for i in ids] == [
        reference.decode_single_token_bytes(i) for i in ids
    ]
    ids = ours.encode(MIXED[3])
    assert ours.decode(ids) == MIXED[3] == reference.decode(ids)


def test_tokenizer_ids_and_cache() -> None:
    tok = get_tokenizer()
    assert tok.encode("Do you have time") == [5211, 345, 423, 640]
    assert get_tokenizer() is tok  # built once per process
    assert encode_texts(["<|endoftext|>"]) == [tok.encode_ordinary("<|endoftext|>")]


def test_offline_without_cache_dir_writes_nothing(tmp_path: Path) -> None:
    """No TIKTOKEN_CACHE_DIR, no network (a dead proxy), a fresh temp dir and home: the tokenizer
    still loads, and leaves no file behind (tiktoken's default cache is $TMPDIR/data-gym-cache)."""
    tmp, home = tmp_path / "tmp", tmp_path / "home"
    tmp.mkdir()
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR", "SPAM_SHARED_DIR")
    }
    dead = "http://127.0.0.1:9"
    env.update(
        PYTHONPATH=str(REPO),
        TMPDIR=str(tmp),
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        HTTP_PROXY=dead,
        HTTPS_PROXY=dead,
        http_proxy=dead,
        https_proxy=dead,
        NO_PROXY="",
        no_proxy="",
    )
    code = (
        "from spam_lightning.data.tokens import get_tokenizer; "
        "print(get_tokenizer().encode('Hello <|endoftext|> 世界', allowed_special='all'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    expected = get_tokenizer().encode("Hello <|endoftext|> 世界", allowed_special="all")
    assert 50256 in expected and done.stdout.strip() == str(expected)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["home", "tmp"]


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_damaged_or_missing_bpe_file_is_a_clear_error(tmp_path: Path, name: str) -> None:
    for fname in GPT2_FILES:
        shutil.copy(GPT2_ASSETS / fname, tmp_path / fname)
    assert load_gpt2_encoding(tmp_path).encode("Do you have time") == [5211, 345, 423, 640]
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        load_gpt2_encoding(tmp_path)
    assert str(info.value) == (
        f"{path}: the bundled GPT-2 BPE file is damaged: sha256 {sha256_bytes(bytes(data))}, "
        f"expected {GPT2_FILES[name]}; reinstall spam-lightning"
    )
    path.unlink()
    with pytest.raises(DataError, match=rf"{path}: cannot read the bundled GPT-2 BPE file"):
        load_gpt2_encoding(tmp_path)
