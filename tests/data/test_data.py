"""The data layer against chapter 6: counts, splits, tokens, loaders, downloads, bad sources."""

from __future__ import annotations

import importlib.util
import inspect
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from _compose import compose_train
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from spam_lightning.data import (
    DataError,
    DownloadError,
    LengthGroupedSampler,
    SpamDataModule,
    collate,
    encode_texts,
    get_tokenizer,
    read_table,
)
from spam_lightning.data.source import (
    BUNDLED_PATH,
    EXPECTED_SHA256,
    EXPECTED_SIZE,
    load_bundled,
    sha256_bytes,
)
from spam_lightning.data.table import SPLIT_FILES, prepare
from spam_lightning.data.tokens import Collator
from spam_lightning.training.checks import ConfigError, validate_config

REPO = Path(__file__).resolve().parents[2]


def make_zip(member: bytes, name: str = "SMSSpamCollection") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("readme", "SMS Spam Collection v.1\n")
        zf.writestr(name, member)
    return buf.getvalue()


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared from the default source: the copy bundled in the package."""
    folder = tmp_path_factory.mktemp("sms_spam")
    SpamDataModule(data_dir=str(folder)).prepare_data()
    return folder


@pytest.fixture(scope="module")
def dm(data_dir: Path) -> SpamDataModule:
    module = SpamDataModule(data_dir=str(data_dir))
    module.prepare_data()
    module.setup("fit")
    return module


def chapter_splits(sms_file: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Chapter 6's own steps, written out with plain pandas."""
    df = pd.read_csv(sms_file, sep="\t", header=None, names=["Label", "Text"])
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=123)
    balanced_df = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced_df["Label"] = balanced_df["Label"].map({"ham": 0, "spam": 1})
    df = balanced_df.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end = int(len(df) * 0.7)
    validation_end = train_end + int(len(df) * 0.1)
    return df[:train_end], df[train_end:validation_end], df[validation_end:]


# ------------------------------------------------------------------ the chapter, to the row


def test_real_file_reads_as_the_chapter(sms_file: Path) -> None:
    table = read_table(sms_file.read_bytes(), str(sms_file))
    assert len(table.frame) == 5572
    assert table.frame["Label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}
    chapter = pd.read_csv(sms_file, sep="\t", header=None, names=["Label", "Text"])
    pd.testing.assert_frame_equal(table.frame, chapter)
    # rows map back to source lines although quotes merge lines 5082-5084 into one row
    assert table.lines[:3] == [1, 2, 3]
    assert table.lines[5081] == 5082 and table.lines[5082] == 5085
    assert table.lines[-1] == 5574


def test_split_sizes_and_csvs_equal_the_chapter(sms_file: Path, data_dir: Path) -> None:
    expected = chapter_splits(sms_file)
    for name, frame in zip(("train", "validation", "test"), expected, strict=True):
        path = data_dir / f"{name}.csv"
        assert path.read_bytes() == frame.to_csv(index=None).encode()  # the chapter's to_csv
        pd.testing.assert_frame_equal(
            pd.read_csv(path), pd.read_csv(io.StringIO(frame.to_csv(index=None)))
        )
    assert [len(f) for f in expected] == [1045, 149, 300]


def test_datamodule_matches_the_chapter(dm: SpamDataModule, sms_file: Path) -> None:
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (1045, 149, 300)
    assert dm.max_length == 120
    assert (len(dm.train_dataloader()), len(dm.val_dataloader()), len(dm.test_dataloader())) == (
        130,
        19,
        38,
    )
    assert dm.num_classes == 2 and dm.class_names == ["ham", "spam"] and dm.pad_token_id == 50256
    train, val, _ = chapter_splits(sms_file)
    assert dm.train_dataset.texts == train["Text"].tolist()
    assert dm.train_dataset.labels == train["Label"].tolist()
    # the chapter's SpamDataset: encode, truncate val/test to the train max_length
    tok = get_tokenizer()
    assert dm.train_dataset.token_ids == [tok.encode(t) for t in train["Text"]]
    assert dm.val_dataset.token_ids == [tok.encode(t)[:120] for t in val["Text"]]


# ------------------------------------------------------------------ batches


def test_batch_contract_longest(dm: SpamDataModule) -> None:
    ds = dm.val_dataset
    seen = []
    for batch in dm.val_dataloader():
        assert set(batch) == {"input_ids", "labels", "lengths", "index"}
        assert all(v.dtype == torch.long for v in batch.values())
        assert batch["input_ids"].shape[1] == 120
        for row, i in enumerate(batch["index"].tolist()):
            ids = ds.token_ids[i]
            n = int(batch["lengths"][row])
            assert n == len(ids) >= 1
            assert batch["input_ids"][row, :n].tolist() == ids
            assert (batch["input_ids"][row, n:] == 50256).all()
            assert int(batch["labels"][row]) == ds.labels[i]
        seen += batch["index"].tolist()
    assert seen == list(range(149))  # unshuffled, nothing dropped


def test_train_order_is_the_books_global_rng_dataloader(
    dm: SpamDataModule, sms_file: Path, data_dir: Path
) -> None:
    """The chapter's DataLoader(shuffle=True, drop_last=True) without a generator: after the
    same torch.manual_seed, every epoch's order is the book's (each iter() draws from the global
    RNG), and the eval loaders draw nothing from it."""
    fresh = SpamDataModule(source=str(sms_file), data_dir=str(data_dir))
    fresh.setup("fit")
    plain = DataLoader(fresh.train_dataset, batch_size=8, shuffle=True, drop_last=True,
                       collate_fn=Collator("longest", 120))
    torch.manual_seed(7)
    loader = fresh.train_dataloader()
    ours = []
    for _ in range(3):  # epochs: Lightning iterates the same loader again
        ours.append([b["index"].tolist() for b in loader])
        list(fresh.eval_dataloader("val"))  # Lightning's validation: off the global RNG
    torch.manual_seed(7)
    theirs = [[b["index"].tolist() for b in plain] for _ in range(3)]
    assert ours == theirs
    assert ours[0] != ours[1]
    assert len(ours[0]) == 130 and len({i for b in ours[0] for i in b}) == 1040


def test_setup_tokenizes_once(dm: SpamDataModule) -> None:
    train = dm.train_dataset
    dm.setup("validate")
    dm.setup("test")
    assert dm.train_dataset is train


def test_eval_dataloader(dm: SpamDataModule) -> None:
    for split, n, batches in (("train", 1045, 131), ("val", 149, 19), ("test", 300, 38)):
        loader = dm.eval_dataloader(split)
        idx = [i for b in loader for i in b["index"].tolist()]
        assert idx == list(range(n)) and len(loader) == batches
    with pytest.raises(ValueError, match="allowed: train, val, validation, test"):
        dm.eval_dataloader("dev")


def test_padding_batch_and_none(sms_file: Path, data_dir: Path) -> None:
    batch_dm = SpamDataModule(source=str(sms_file), data_dir=str(data_dir), padding="batch")
    batch_dm.setup()
    for batch in batch_dm.val_dataloader():
        assert batch["input_ids"].shape[1] == int(batch["lengths"].max())
    none_dm = SpamDataModule(
        source=str(sms_file), data_dir=str(data_dir), padding="none", batch_size=1
    )
    none_dm.setup()
    batch = next(iter(none_dm.test_dataloader()))
    assert batch["input_ids"].tolist() == [none_dm.test_dataset.token_ids[0]]
    assert len(none_dm.train_dataloader()) == 1045


@pytest.mark.parametrize(("option", "width", "truncated"), [("model", 1024, False), (50, 50, True)])
def test_max_length_options(
    sms_file: Path, data_dir: Path, option: int | str, width: int, truncated: bool
) -> None:
    module = SpamDataModule(source=str(sms_file), data_dir=str(data_dir), max_length=option)
    assert module.max_length == width  # known before setup for model / int
    module.setup()
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape == (8, width)
    longest = max(
        max(ds.lengths) for ds in (module.train_dataset, module.val_dataset, module.test_dataset)
    )
    assert (longest == 50) if truncated else (longest <= 1024)


def test_max_length_null_beyond_context_is_an_error(sms_file: Path, data_dir: Path) -> None:
    module = SpamDataModule(source=str(sms_file), data_dir=str(data_dir), context_length=100)
    with pytest.raises(AttributeError, match="after setup"):
        _ = module.max_length
    with pytest.raises(ValueError, match=r"120 tokens.*context length 100.*data\.max_length"):
        module.setup()


def test_bucketing_loader(sms_file: Path, data_dir: Path) -> None:
    module = SpamDataModule(
        source=str(sms_file), data_dir=str(data_dir), padding="batch", bucketing=True
    )
    module.setup()
    loader = module.train_dataloader()
    epochs = [[b["index"].tolist() for b in loader] for _ in range(2)]
    for batches in epochs:
        flat = [i for b in batches for i in b]
        assert len(batches) == 130 and len(flat) == len(set(flat)) == 1040
    assert epochs[0] != epochs[1]
    padded = sum(b["input_ids"].numel() for b in loader)
    assert padded < 0.6 * 1040 * 120  # far less padding than the chapter's 120 per message


def test_length_grouped_sampler() -> None:
    lengths = [(i * 37) % 101 + 1 for i in range(1003)]
    g = torch.Generator().manual_seed(1)
    sampler = LengthGroupedSampler(
        RandomSampler(range(1003), generator=g), 8, False, lengths, mega_batch_mult=10, generator=g
    )
    epochs = [list(sampler) for _ in range(3)]
    for batches in epochs:
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(1003))  # every example exactly once
        assert len(batches) == len(sampler) == 126
        order = [i for b in batches for i in b]
        assert order != sorted(order, key=lengths.__getitem__)  # still shuffled
    assert epochs[0] != epochs[1] != epochs[2]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epochs[0]) / 126
    assert spread < 10  # batches group similar lengths (random batches: ~70)

    def dropping() -> LengthGroupedSampler:
        g = torch.Generator().manual_seed(1)
        return LengthGroupedSampler(
            RandomSampler(range(1003), generator=g), 8, True, lengths, generator=g
        )

    batches = list(dropping())
    flat = [i for b in batches for i in b]
    assert len(batches) == len(dropping()) == 125 and all(len(b) == 8 for b in batches)
    assert len(set(flat)) == 1000
    assert list(dropping()) == batches  # reproducible from the seed


def test_length_grouped_sampler_under_ddp() -> None:
    """Lightning swaps a DistributedSampler in as ``sampler``: ranks get disjoint shards."""
    lengths = [i % 50 + 1 for i in range(100)]
    shards = []
    for rank in (0, 1):
        dist = DistributedSampler(range(100), num_replicas=2, rank=rank, shuffle=True, seed=5)
        sampler = LengthGroupedSampler(dist, 8, True, lengths)
        shards.append({i for b in sampler for i in b})
        assert len(list(sampler)) == len(sampler) == 6
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == 48


def test_num_workers(sms_file: Path, data_dir: Path, dm: SpamDataModule) -> None:
    module = SpamDataModule(source=str(sms_file), data_dir=str(data_dir), num_workers=2)
    module.setup()
    loader = module.val_dataloader()
    assert loader.persistent_workers
    ref = list(dm.val_dataloader())
    for _ in range(2):
        got = list(loader)
        assert len(got) == len(ref)
        for a, b in zip(got, ref, strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)
    pickle.loads(pickle.dumps(module.train_dataset))
    assert len(list(module.train_dataloader())) == 130


def test_state_dict_and_hparams(sms_file: Path, data_dir: Path) -> None:
    """The bucketing sampler's own generator is the datamodule's state (the plain loader's
    global RNG is saved by the RNGState callback)."""
    opts = dict(source=str(sms_file), data_dir=str(data_dir), seed=3, padding="batch", bucketing=True)
    module = SpamDataModule(**opts)
    module.setup()
    loader = module.train_dataloader()
    list(loader)
    state = module.state_dict()
    after_one = [b["index"].tolist() for b in loader]
    resumed = SpamDataModule(**opts)
    resumed.setup()
    fresh_order = [b["index"].tolist() for b in resumed.train_dataloader()]
    resumed = SpamDataModule(**opts)
    resumed.setup()
    resumed.load_state_dict(state)
    assert [b["index"].tolist() for b in resumed.train_dataloader()] == after_one != fresh_order
    assert module.hparams["seed"] == 3 and module.hparams["padding"] == "batch"
    assert state["max_length"] == 120


# ------------------------------------------------------------------ tokens helpers


def test_encode_texts_and_collate() -> None:
    ids = encode_texts(
        ["Do you have time", "<|endoftext|>", "a " * 50], max_length=10, context_length=1024
    )
    assert ids[0] == [5211, 345, 423, 640]
    assert 50256 not in ids[1]  # special-token text is plain text, never a pad id
    assert len(ids[2]) == 10
    assert len(encode_texts(["a " * 50], max_length=None, context_length=5)[0]) == 5
    batch = collate(ids, padding="batch")
    assert batch["input_ids"].shape == (3, 10) and "labels" not in batch
    assert batch["lengths"].tolist() == [4, len(ids[1]), 10]
    batch = collate(ids, [0, 1, 1], padding="longest", max_length=12, indices=[5, 6, 7])
    assert batch["input_ids"].shape == (3, 12) and batch["index"].tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match="batch size 1"):
        collate(ids, padding="none")
    with pytest.raises(ValueError, match="empty"):
        collate([[1], []], padding="batch")
    with pytest.raises(ValueError, match="truncate"):
        collate(ids, padding="longest", max_length=5)
    with pytest.raises(ValueError, match="longest, batch, none"):
        collate(ids, padding="dynamic")


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"padding": "dynamic"}, "data.padding='dynamic' is unknown; allowed: longest, batch, none"),
        ({"batch_size": 0}, "data.batch_size=0"),
        ({"padding": "none"}, "data.batch_size=1 and trainer.accumulate_grad_batches=8"),
        ({"max_length": 2048}, "data.max_length=2048 exceeds the model's context length 1024"),
        ({"max_length": "longest"}, "data.max_length='longest': allowed values are null"),
        ({"on_bad_rows": "ignore"}, "data.on_bad_rows='ignore' is unknown; allowed: error, skip"),
        ({"bucketing": True}, "data.padding=batch"),
        ({"train_frac": 0.95}, "data.train_frac=0.95 + data.val_frac=0.1 = 1.05: must be < 1"),
        ({"train_frac": 0.9}, "data.train_frac=0.9 + data.val_frac=0.1 = 1: must be < 1"),
        ({"val_frac": 0}, "data.val_frac=0: must be a number with 0 < value < 1"),
        ({"val_frac": 0.0}, "data.val_frac=0.0: must be a number with 0 < value < 1"),
        ({"val_frac": -0.1}, "data.val_frac=-0.1: must be a number with 0 < value < 1"),
        ({"train_frac": 0}, "data.train_frac=0: must be a number with 0 < value < 1"),
        ({"train_frac": 1.0}, "data.train_frac=1.0: must be a number with 0 < value < 1"),
        ({"train_frac": float("nan")}, "data.train_frac=nan: must be a number"),
        (
            {"train_frac": "abc"},
            "data.train_frac='abc': must be a number with 0 < value < 1 (got str)",
        ),
        ({"val_frac": None}, "data.val_frac=None: must be a number with 0 < value < 1"),
        ({"val_frac": True}, "data.val_frac=True: must be a number with 0 < value < 1 (got bool)"),
        (
            {"source": "/no/such/SMSSpamCollection"},
            "/no/such/SMSSpamCollection: no such file (expected bundled, download, or the path",
        ),
        ({"source": "download", "urls": []}, "data.source=download, but data.urls is empty"),
    ],
)
def test_bad_config_fails_in_init(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SpamDataModule(**kwargs)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.batch_size=0", "data.val_frac=2"],
         ["data.batch_size=0: must be an integer >= 1",
          "data.val_frac=2: must be a number with 0 < value < 1"]),
        (["data=csv", "data.padding=dynamic", "data.split_seed=-1"],
         ["data.padding='dynamic' is unknown; allowed: longest, batch, none",
          "data.split_seed=-1: must be an integer in [0, 4294967295] (numpy's seed range)",
          "data=csv needs data.train, data.validation and data.test (missing: data.train, "
          "data.validation, data.test), or data.source=ONE_FILE to split 0.7/0.1/rest"]),
        (["data=imdb", "data.num_workers=-1", "data.shuffle_seed=x"],
         ["data.num_workers=-1: must be an integer >= 0",
          "data.shuffle_seed='x': must be an integer in [0, 4294967295] (numpy's seed range)"]),
    ],
)
def test_every_bad_data_option_is_its_own_line(
    overrides: list[str], expected: list[str], tmp_path: Path
) -> None:
    """A data module reports all its bad options in one run, each a line of the message."""
    cfg = compose_train(["model=gpt2-tiny", *overrides], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    lines = str(err.value).splitlines()
    assert lines[0] == "Invalid configuration:"
    assert sorted(lines[1:]) == sorted(f"  - {line}" for line in expected)


def test_config_file_lists_every_argument() -> None:
    cfg = OmegaConf.load(REPO / "conf" / "data" / "sms_spam.yaml")
    params = inspect.signature(SpamDataModule.__init__).parameters
    assert set(cfg) - {"_target_"} == set(params) - {"self"}
    assert cfg["_target_"] == "spam_lightning.data.SpamDataModule"
    keys = ("source", "batch_size", "padding", "on_bad_rows", "split_seed", "bucketing")
    for key in (*keys, "max_length", "train_frac", "val_frac"):
        assert cfg[key] == params[key].default
    assert list(cfg["urls"]) == list(params["urls"].default)


# ------------------------------------------------------------------ sources and downloads


def test_download_tries_urls_in_turn(sms_file: Path, tmp_path: Path, http_serve) -> None:
    base = http_serve({"/sms.zip": make_zip(sms_file.read_bytes())})
    urls = [f"{base}/missing.zip", f"{base}/sms.zip"]
    prepared = prepare("download", tmp_path, urls)
    raw = tmp_path / "SMSSpamCollection"
    assert sha256_bytes(raw.read_bytes()) == EXPECTED_SHA256
    assert prepared.meta["source"]["url"] == urls[1]
    assert files_in(tmp_path) == {
        ".prepare.lock",
        "SMSSpamCollection",
        "meta.json",
        "train.csv",
        "validation.csv",
        "test.csv",
    }
    assert (tmp_path / "train.csv").read_bytes() == chapter_splits(sms_file)[0].to_csv(
        index=None
    ).encode()
    # next time: no network needed
    again = prepare("download", tmp_path, ["http://127.0.0.1:9/unreachable.zip"])
    assert again.reused


def test_download_failure_lists_every_url(tmp_path: Path, http_serve) -> None:
    base = http_serve({"/bad.zip": b"PK\x03\x04 this is not a zip"})
    urls = [f"{base}/nothing.zip", f"{base}/bad.zip", "http://127.0.0.1:9/refused.zip"]
    with pytest.raises(DownloadError) as info:
        prepare("download", tmp_path, urls)
    message = str(info.value)
    for url in urls:
        assert url in message
    assert "404" in message and "corrupt or truncated" in message
    assert "data.source=/path/to/SMSSpamCollection" in message
    assert files_in(tmp_path) == {".prepare.lock"}


def test_truncated_download_leaves_nothing(sms_file: Path, tmp_path: Path, http_serve) -> None:
    payload = make_zip(sms_file.read_bytes())
    base = http_serve(
        {"/cut.zip": payload[: len(payload) // 2], "/short.zip": (len(payload), payload[:1000])}
    )
    with pytest.raises(DownloadError, match="corrupt or truncated") as info:
        prepare("download", tmp_path, [f"{base}/cut.zip", f"{base}/short.zip"])
    assert "truncated: got 1,000 of" in str(info.value)
    assert files_in(tmp_path) == {".prepare.lock"}


def test_local_zip_source(sms_file: Path, tmp_path: Path) -> None:
    zpath = tmp_path / "sms+spam+collection.zip"
    zpath.write_bytes(make_zip(sms_file.read_bytes()))
    out = tmp_path / "out"
    prepared = prepare(str(zpath), out)
    assert prepared.meta["source"]["kind"] == "zip"
    assert (
        prepared.meta["source"]["sha256"] == EXPECTED_SHA256
        and prepared.meta["source"]["bytes"] == EXPECTED_SIZE
    )
    assert (out / "test.csv").read_bytes() == chapter_splits(sms_file)[2].to_csv(
        index=None
    ).encode()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"PK\x03\x04\x14\x00\x00\x00", "not a valid zip file (corrupt or truncated)"),
        ("zip-without-member", "has no SMSSpamCollection member"),
    ],
)
def test_bad_local_zip(tmp_path: Path, content: bytes | str, message: str) -> None:
    zpath = tmp_path / "data.zip"
    if content == "zip-without-member":
        content = make_zip(b"ham\thi\n", name="other.txt")
    zpath.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=re.escape(message)) as info:
        prepare(str(zpath), out)
    assert str(zpath) in str(info.value)
    assert files_in(out) == {".prepare.lock"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"", "line 1: the file is empty"),
        (b"ham Hello there\nspam\tWin\n", "line 1: malformed line: expected 2 fields"),
        (
            b"ham\tHello\nspam\tWin\nbacon\tTasty\n",
            "line 3: unknown label 'bacon' (allowed: ham, spam)",
        ),
    ],
    ids=["missing", "empty", "wrong-columns", "unknown-label"],
)
def test_bad_sources_name_file_and_problem(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "SMSSpamCollection"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(message)) as info:
        prepare(str(path), tmp_path / "out")
    assert str(path) in str(info.value)


def test_prepare_script(sms_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location(
        "prepare_data", REPO / "scripts" / "prepare_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--source", str(sms_file), "--data-dir", str(tmp_path)]) == 0
    assert '"rows": 1045' in capsys.readouterr().out
    assert module.main(["--source", str(tmp_path / "nope"), "--data-dir", str(tmp_path)]) == 1
    assert "no such file" in capsys.readouterr().err
    assert module.main(["--data-dir", str(tmp_path / "bundled")]) == 0  # the default: bundled
    assert capsys.readouterr().out.startswith(f"prepared {tmp_path / 'bundled'}\n")
    meta = json.loads((tmp_path / "bundled" / "meta.json").read_text())
    assert meta["source"]["kind"] == "bundled" and meta["splits"]["train"]["rows"] == 1045


def test_setup_before_prepare_is_a_clear_error(tmp_path: Path) -> None:
    module = SpamDataModule(data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"call prepare_data\(\) first"):
        module.setup()
    with pytest.raises(RuntimeError, match="before asking for dataloaders"):
        module.train_dataloader()


# ------------------------------------------------------------------ the bundled copy (the default)


def test_default_source_is_the_bundled_copy(sms_file: Path, data_dir: Path) -> None:
    assert BUNDLED_PATH.read_bytes() == sms_file.read_bytes()  # the UCI file, byte for byte
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["source"]["kind"] == "bundled" and meta["source"]["path"] == str(BUNDLED_PATH)
    assert (meta["source"]["sha256"], meta["source"]["bytes"]) == (EXPECTED_SHA256, EXPECTED_SIZE)
    assert files_in(data_dir) == {".prepare.lock", "meta.json", *SPLIT_FILES.values()}
    assert SpamDataModule().source == "bundled" and SpamDataModule(source=None).source == "bundled"
    with pytest.raises(DataError, match="data.urls is empty"):
        prepare("download", data_dir / "dl", [])


def test_bundled_copy_is_verified_when_read(tmp_path: Path) -> None:
    assert load_bundled().sha256 == EXPECTED_SHA256
    good = BUNDLED_PATH.read_bytes()
    damaged = tmp_path / "SMSSpamCollection"
    damaged.write_bytes(good.replace(b"Go until jurong", b"Go until JURONG", 1))
    with pytest.raises(DataError) as info:
        load_bundled(damaged)
    assert str(info.value) == (
        f"data.source=bundled: {damaged} is damaged: 477,907 bytes sha256 "
        f"{sha256_bytes(damaged.read_bytes())}, expected 477,907 bytes sha256 {EXPECTED_SHA256}; "
        f"reinstall spam-lightning, or pass data.source=download or a path"
    )
    damaged.write_bytes(good[:1000])
    with pytest.raises(DataError, match="is damaged: 1,000 bytes"):
        load_bundled(damaged)
    with pytest.raises(DataError, match=r"cannot read .*nope.*reinstall spam-lightning"):
        load_bundled(tmp_path / "nope")


def test_download_through_the_datamodule(sms_file: Path, tmp_path: Path, http_serve) -> None:
    base = http_serve({"/sms.zip": make_zip(sms_file.read_bytes())})
    module = SpamDataModule(source="download", urls=[f"{base}/sms.zip"], data_dir=str(tmp_path))
    module.prepare_data()
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["source"]["kind"] == "download" and meta["source"]["url"] == f"{base}/sms.zip"
    assert (tmp_path / "SMSSpamCollection").read_bytes() == sms_file.read_bytes()
    module.setup()
    assert (len(module.train_dataset), len(module.val_dataset)) == (1045, 149)


def test_empty_split_is_refused_before_writing(tmp_path: Path) -> None:
    rows = b"".join(b"ham\tHello number %d\nspam\tWin prize %d\n" % (i, i) for i in range(4))
    source = tmp_path / "SMSSpamCollection"
    source.write_bytes(rows)  # 8 rows: int(8 * 0.1) = 0 validation rows
    with pytest.raises(DataError) as info:
        prepare(str(source), tmp_path / "out")
    assert str(info.value).startswith(
        f"{source}: the validation split is empty: 8 rows split with data.train_frac=0.7, "
        f"data.val_frac=0.1"
    )
    assert files_in(tmp_path / "out") == {".prepare.lock"}
    assert not prepare(str(source), tmp_path / "ok", train_frac=0.5, val_frac=0.25).reused


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_wheel_ships_the_assets(tmp_path: Path) -> None:
    """A non-editable wheel holds the data files, and works from outside the checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("spam_lightning", "conf"):  # conf/ ships in the wheel as spam_lightning.conf
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # the dev venv has setuptools (no registry needed); else pip fetches it for an isolated build
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            *isolation,
            "-w",
            "dist",
            "./src",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("spam_lightning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("SMSSpamCollection", "README.md", "gpt2/vocab.bpe", "gpt2/encoder.json"):
        assert f"spam_lightning/data/assets/{asset}" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import spam_lightning.data.source as s, spam_lightning.data.tokens as t; "
        f"print(s.load_bundled().sha256, s.BUNDLED_PATH.is_relative_to({str(site)!r}), "
        "t.get_tokenizer().encode('Do you have time'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.split(maxsplit=1) == [EXPECTED_SHA256, "True [5211, 345, 423, 640]\n"]
