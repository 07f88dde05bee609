"""Any text-classification CSV (`data=csv`) and IMDB (`data=imdb`) through the same pipeline (issue 8)."""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from _compose import compose_train
from omegaconf import OmegaConf

from spam_lightning.data import CSVDataModule, DataError, IMDBDataModule
from spam_lightning.data.source import DownloadError
from spam_lightning.inference.classify import Classifier
from spam_lightning.inference.classify import main as classify_main

REPO = Path(__file__).resolve().parents[2]
TOPICS = {
    "sports": ["the match ended", "a late goal won it", "the team trains daily"],
    "politics": ["the vote passed", "parliament debated, again", "the minister resigned"],
    "tech": ['a new "chip" shipped', "the phone got an update", "servers went down\nfor hours"],
}


def topic_frame(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` rows of three topics (with an extra column, commas, quotes and line breaks)."""
    rows = []
    names = sorted(TOPICS)
    for i in range(n):
        label = names[(i * 7 + seed) % 3]
        rows.append({"id": i, "body": f"{TOPICS[label][i % 3]} #{i}", "topic": label})
    return pd.DataFrame(rows)


@pytest.fixture
def three_files(tmp_path: Path) -> dict[str, Path]:
    frame = topic_frame(60)
    parts = {"train": frame.iloc[:40], "validation": frame.iloc[40:50], "test": frame.iloc[50:]}
    paths = {}
    for split, part in parts.items():
        paths[split] = tmp_path / f"{split}.csv"
        part.to_csv(paths[split], index=False)
    return paths


def csv_module(paths: dict[str, Path], **kwargs) -> CSVDataModule:
    dm = CSVDataModule(
        train=str(paths["train"]),
        validation=str(paths["validation"]),
        test=str(paths["test"]),
        text_column=kwargs.pop("text_column", "body"),
        label_column=kwargs.pop("label_column", "topic"),
        **kwargs,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize(("name", "cls"), [("csv", CSVDataModule), ("imdb", IMDBDataModule)])
def test_config_file_lists_every_argument(name: str, cls: type) -> None:
    cfg = OmegaConf.load(REPO / "conf" / "data" / f"{name}.yaml")
    params = inspect.signature(cls.__init__).parameters
    assert set(cfg) - {"_target_"} == set(params) - {"self"}
    assert cfg["_target_"] == f"spam_lightning.data.{cls.__name__}"
    for key in ("batch_size", "padding", "max_length", "split_seed", "train_size", "test_size"):
        if key in params:
            assert cfg[key] == params[key].default, key


# ------------------------------------------------------------------ three files


def test_three_files_multiclass_names_from_data(three_files: dict[str, Path]) -> None:
    dm = csv_module(three_files)
    assert dm.class_names == ["politics", "sports", "tech"] and dm.num_classes == 3
    train = pd.read_csv(three_files["train"])
    assert dm.train_dataset.texts == train["body"].tolist()  # commas, quotes, newlines intact
    assert dm.train_dataset.labels == [dm.class_names.index(t) for t in train["topic"]]
    assert len(dm.val_dataset) == 10 and len(dm.test_dataset) == 10
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "lengths", "index"}
    assert int(batch["labels"].max()) <= 2


def test_class_names_fix_the_order_or_index_integer_labels(three_files, tmp_path) -> None:
    dm = csv_module(three_files, class_names=["tech", "sports", "politics"])
    train = pd.read_csv(three_files["train"])
    assert dm.class_names == ["tech", "sports", "politics"]
    assert dm.train_dataset.labels == [dm.class_names.index(t) for t in train["topic"]]
    # integer labels: indices into data.class_names; without names, sorted numerically
    numeric = {}
    for split, path in three_files.items():
        frame = pd.read_csv(path)
        frame["topic"] = frame["topic"].map({"politics": 2, "sports": 10, "tech": 0})
        numeric[split] = tmp_path / f"n_{split}.csv"
        frame.to_csv(numeric[split], index=False)
    assert csv_module(numeric).class_names == ["0", "2", "10"]
    for split in numeric:
        frame = pd.read_csv(numeric[split])
        frame["topic"] = frame["topic"].map({2: 1, 10: 2, 0: 0})
        frame.to_csv(numeric[split], index=False)
    dm = csv_module(numeric, class_names=["tech", "politics", "sports"])
    assert dm.train_dataset.labels == pd.read_csv(numeric["train"])["topic"].tolist()


def test_tab_separated_by_extension(tmp_path: Path) -> None:
    frame = topic_frame(30)
    paths = {}
    parts = (frame[:20], frame[20:25], frame[25:])
    for split, part in zip(("train", "validation", "test"), parts, strict=True):
        paths[split] = tmp_path / f"{split}.tsv"
        part.to_csv(paths[split], index=False, sep="\t")
    assert csv_module(paths).num_classes == 3


# ------------------------------------------------------------------ one file, split


def test_one_file_split_seeded_70_10_20_and_reused(tmp_path: Path) -> None:
    frame = topic_frame(100).iloc[:90]  # unbalanced: 30/30/30 ... then trimmed below
    frame = pd.concat([frame, topic_frame(10, seed=1).assign(topic="sports")])
    source = tmp_path / "all.csv"
    frame.to_csv(source, index=False)
    kwargs = {"text_column": "body", "label_column": "topic", "data_dir": str(tmp_path / "prep")}
    dm = CSVDataModule(source=str(source), **kwargs)
    dm.prepare_data()
    dm.setup()
    # the chapter's random_split: one seeded shuffle, then int(70%) / int(10%) / the rest
    expected = pd.read_csv(source).sample(frac=1, random_state=123).reset_index(drop=True)
    assert dm.train_dataset.texts == expected["body"][:70].tolist()
    assert dm.val_dataset.texts == expected["body"][70:80].tolist()
    assert dm.test_dataset.texts == expected["body"][80:].tolist()
    written = pd.read_csv(tmp_path / "prep" / "train.csv")
    assert list(written.columns) == ["id", "body", "topic"]  # every column kept
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert meta["splits"]["train"]["rows"] == 70 and not meta["settings"]["balance"]
    # reused while source and settings match; a new seed re-splits
    stamp = os.stat(tmp_path / "prep" / "train.csv").st_mtime_ns
    CSVDataModule(source=str(source), **kwargs).prepare_data()
    assert os.stat(tmp_path / "prep" / "train.csv").st_mtime_ns == stamp
    other = CSVDataModule(source=str(source), split_seed=7, **kwargs)
    with pytest.raises(DataError, match=r"call prepare_data\(\) first"):
        other.setup()
    # balance: every class downsampled to the rarest before the split
    balanced = CSVDataModule(source=str(source), balance=True, **kwargs)
    balanced.prepare_data()
    balanced.setup()
    labels = balanced.train_dataset.labels + balanced.val_dataset.labels
    labels += balanced.test_dataset.labels
    counts = pd.Series(labels).value_counts()
    assert counts.nunique() == 1 and counts.iloc[0] == 30


@pytest.mark.parametrize("balance", [False, True])
def test_meta_counts_equal_the_split_files(tmp_path: Path, balance: bool) -> None:
    """meta.json's per-split label counts are those of the written CSVs (the rows are sorted by
    label, so counting by the unshuffled row numbers would give other numbers)."""
    labels = ["a"] * 30 + ["b"] * 15 + [" c "] * 5  # labels are stripped: " c " is class c
    frame = pd.DataFrame({"text": [f"message {i}" for i in range(50)], "label": labels})
    source = tmp_path / "all.csv"
    frame.to_csv(source, index=False)
    data_dir = tmp_path / "prep"
    dm = CSVDataModule(source=str(source), balance=balance, data_dir=str(data_dir))
    dm.prepare_data()
    meta = json.loads((data_dir / "meta.json").read_text())
    total: dict[str, int] = {}
    for split in ("train", "validation", "test"):
        written = pd.read_csv(data_dir / f"{split}.csv", dtype=str, keep_default_na=False)
        counts = written["label"].str.strip().value_counts().sort_index().to_dict()
        assert meta["splits"][split] == {"rows": len(written), "labels": counts}
        for label, n in counts.items():
            total[label] = total.get(label, 0) + n
    assert total == ({"a": 5, "b": 5, "c": 5} if balance else {"a": 30, "b": 15, "c": 5})
    assert meta["rows"] == {"read": 50, "used": 15 if balance else 50}
    dm.setup()
    names = dm.class_names
    train_counts = pd.Series([names[i] for i in dm.train_dataset.labels]).value_counts()
    assert train_counts.sort_index().to_dict() == meta["splits"]["train"]["labels"]


def test_empty_split_of_one_file_is_refused(tmp_path: Path) -> None:
    source = _write(
        tmp_path / "all.csv", "text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(8))
    )
    dm = CSVDataModule(source=str(source), data_dir=str(tmp_path / "prep"))
    with pytest.raises(DataError) as info:
        dm.prepare_data()  # int(8 * 0.1) = 0 validation rows
    assert str(info.value).startswith(f"{source}: the validation split is empty: 8 rows split")
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == [".prepare.lock"]


# ------------------------------------------------------------------ errors name file, line, problem


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def test_unknown_label_in_test_names_file_and_line(three_files, tmp_path) -> None:
    test = _write(tmp_path / "t.csv", 'id,body,topic\n1,"two\nlines",tech\n2,cooking show,food\n')
    with pytest.raises(DataError, match=re.escape(f"{test}, line 4: label 'food' does not occur")):
        csv_module({**three_files, "test": test})
    with pytest.raises(
        DataError, match=r"train.csv, line 4: unknown label 'tech'; data\.class_names"
    ):
        csv_module(three_files, class_names=["sports", "politics"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "line 1: the file is empty (0 bytes)"),
        ("id,body,topic\n", "line 2: no data rows (only a header)"),
        ("id,text,topic\n1,x,tech\n", "line 1: missing column 'body' (data.text_column)"),
        ("id,body,label\n1,x,tech\n", "line 1: missing column 'topic' (data.label_column)"),
        ('id,body,topic\n1,"a\nb",tech\n2,c,tech,extra\n', "line 4: expected 3 fields"),
        ("id,body,topic\n1,x,tech\n2,   ,tech\n3,y,\n", "line 3: text is only whitespace"),
        ("id,body,topic\n1,x,tech\n3,y,\n", "line 3: empty label"),
        ("id,body,topic\n1,x\n", "line 2: expected 3 fields like the header, found 2"),
        ("id,body,topic\n1,caf\xe9,tech\n", None),  # valid UTF-8: no error
    ],
)
def test_bad_files(three_files, tmp_path, content: str, message: str | None) -> None:
    bad = _write(tmp_path / "bad.csv", content)
    if message is None:
        csv_module({**three_files, "validation": bad})
        return
    with pytest.raises(DataError, match=re.escape(f"{bad}") + ".*" + re.escape(message)):
        csv_module({**three_files, "validation": bad})


def test_not_utf8_names_the_line(three_files, tmp_path) -> None:
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(b"id,body,topic\n1,ok,tech\n2,caf\xe9,tech\n")
    with pytest.raises(
        DataError, match=re.escape(f"{bad}, line 3: bytes that are not valid UTF-8")
    ):
        csv_module({**three_files, "train": bad})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train": "a.csv"}, "missing: data.validation, data.test"),
        ({"source": "a.csv", "test": "b.csv"}, "not both"),
        ({"source": "/no/such.csv"}, "/no/such.csv: no such file"),
        ({"source": "a.csv", "class_names": ["x"]}, "at least 2 distinct"),
        ({"source": "a.csv", "text_column": "x", "label_column": "x"}, "two different column"),
        (
            {"train": "a.csv", "validation": "a.csv", "test": "a.csv", "balance": True},
            "needs data.source",
        ),
        ({"source": "a.csv", "sep": "::"}, "data.sep='::'"),
        (
            {"source": "a.csv", "val_frac": 0},
            "data.val_frac=0: must be a number with 0 < value < 1",
        ),
        ({"source": "a.csv", "train_frac": 0.0}, "data.train_frac=0.0: must be a number with 0 <"),
        ({"source": "a.csv", "train_frac": "x"}, "data.train_frac='x': must be a number with 0 <"),
        (
            {"source": "a.csv", "train_frac": 0.8, "val_frac": 0.2},
            "data.train_frac=0.8 + data.val_frac=0.2 = 1: must be < 1 (the test split gets the rest",
        ),
        ({"train": "a.csv", "val_frac": 1.5}, "data.val_frac=1.5: must be a number with 0 < value"),
    ],
)
def test_bad_options_fail_in_init(tmp_path, monkeypatch, kwargs: dict, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "a.csv", "text,label\nx,a\n")
    _write(tmp_path / "b.csv", "text,label\nx,a\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        CSVDataModule(**kwargs)


# ------------------------------------------------------------------ IMDB


def make_imdb(root: Path, per_folder: int = 5) -> Path:
    """A small folder in aclImdb's layout (plus the unlabelled reviews and files the book skips)."""
    base = root / "aclImdb"
    for subset in ("train", "test"):
        for label in ("pos", "neg"):
            folder = base / subset / label
            folder.mkdir(parents=True)
            for i in range(per_folder):
                rating = 8 if label == "pos" else 2
                text = f'{subset} {label} review {i}, "quoted" <br /><br />and more.'
                if i == 1:
                    text += "\r\nwindows line"
                (folder / f"{i * 11}_{rating}.txt").write_bytes(text.encode("utf-8"))
    (base / "train" / "unsup").mkdir()
    (base / "train" / "unsup" / "0_0.txt").write_text("unlabelled")
    (base / "imdb.vocab").write_text("the\n")
    return base


def book_csvs(base: Path, sizes: tuple[int, int]) -> list[bytes]:
    """The book's download_prepare_dataset.py (load_dataset_to_dataframe + partition_and_save)."""
    frames = []
    for subset in ("test", "train"):
        for label in ("pos", "neg"):
            path = os.path.join(base, subset, label)
            for file in sorted(os.listdir(path)):
                with open(os.path.join(path, file), encoding="utf-8") as infile:
                    frames.append(
                        pd.DataFrame(
                            {"text": [infile.read()], "label": [{"pos": 1, "neg": 0}[label]]}
                        )
                    )
    df = pd.concat(frames, ignore_index=True)
    df = df.sample(frac=1, random_state=123).reset_index(drop=True)
    df = df.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end, val_end = sizes[0], sizes[0] + sizes[1]
    parts = (df.iloc[:train_end], df.iloc[train_end:val_end], df.iloc[val_end:])
    return [p.to_csv(index=False).encode() for p in parts]


SIZES = {"train_size": 12, "val_size": 3, "test_size": None}


def test_imdb_folder_equals_the_book(tmp_path: Path) -> None:
    base = make_imdb(tmp_path / "src")
    data_dir = tmp_path / "imdb"
    dm = IMDBDataModule(source=str(base.parent), data_dir=str(data_dir), **SIZES)
    dm.prepare_data()
    dm.setup()
    expected = book_csvs(base, (12, 3))
    for fname, payload in zip(("train.csv", "validation.csv", "test.csv"), expected, strict=True):
        assert (data_dir / fname).read_bytes() == payload, fname
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (12, 3, 5)
    assert dm.class_names == ["negative", "positive"] and dm.max_length == 256
    train = pd.read_csv(data_dir / "train.csv")
    assert dm.train_dataset.labels == train["label"].tolist()
    # the extracted folder itself works too, and a fixed test size takes that many rows
    fixed = IMDBDataModule(
        source=str(base), data_dir=str(tmp_path / "fixed"), train_size=12, val_size=3, test_size=4
    )
    fixed.prepare_data()
    fixed.setup()
    assert len(fixed.test_dataset) == 4
    too_big = IMDBDataModule(source=str(base), data_dir=str(tmp_path / "big"), train_size=30)
    with pytest.raises(DataError, match="20 reviews, fewer than"):
        too_big.prepare_data()


def test_imdb_download_tar_gz_atomic(tmp_path: Path, http_serve) -> None:
    base = make_imdb(tmp_path / "src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(base, arcname="aclImdb")
    archive = buf.getvalue()
    url = http_serve({"/aclImdb_v1.tar.gz": archive, "/cut.tar.gz": (len(archive), archive[:200])})
    # a cut-off transfer leaves nothing behind
    data_dir = tmp_path / "imdb"
    cut = IMDBDataModule(urls=[f"{url}/cut.tar.gz"], data_dir=str(data_dir), **SIZES)
    with pytest.raises(DownloadError, match="truncated"):
        cut.prepare_data()
    assert sorted(p.name for p in data_dir.iterdir()) == [".prepare.lock"]
    dm = IMDBDataModule(
        urls=[f"{url}/cut.tar.gz", f"{url}/aclImdb_v1.tar.gz"], data_dir=str(data_dir), **SIZES
    )
    dm.prepare_data()
    dm.setup()
    assert (data_dir / "aclImdb_v1.tar.gz").read_bytes() == archive
    assert (data_dir / "train.csv").read_bytes() == book_csvs(base, (12, 3))[0]
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["source"]["url"].endswith("/aclImdb_v1.tar.gz")
    assert meta["reviews"] == {"test/pos": 5, "test/neg": 5, "train/pos": 5, "train/neg": 5}
    # the saved archive is reused offline; the given tar.gz works as data.source
    stamp = os.stat(data_dir / "train.csv").st_mtime_ns
    IMDBDataModule(urls=["http://127.0.0.1:9/none"], data_dir=str(data_dir), **SIZES).prepare_data()
    assert os.stat(data_dir / "train.csv").st_mtime_ns == stamp
    local = IMDBDataModule(
        source=str(data_dir / "aclImdb_v1.tar.gz"), data_dir=str(tmp_path / "local"), **SIZES
    )
    local.prepare_data()
    assert (tmp_path / "local" / "test.csv").read_bytes() == book_csvs(base, (12, 3))[2]


def test_imdb_bad_sources(tmp_path: Path) -> None:
    not_tar = _write(tmp_path / "x.tar.gz", "not a tarball")
    with pytest.raises(DataError, match="not a readable .tar.gz"):
        IMDBDataModule(source=str(not_tar), data_dir=str(tmp_path / "d")).prepare_data()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not an extracted IMDB folder"):
        IMDBDataModule(source=str(tmp_path / "empty"), data_dir=str(tmp_path / "d")).prepare_data()
    with pytest.raises(DataError, match="no such file or folder"):
        IMDBDataModule(source=str(tmp_path / "nope"))


# ------------------------------------------------------------------ end to end


def test_three_class_training_run_and_classify(three_files, tmp_path, capsys) -> None:
    from spam_lightning.train import train

    cfg = compose_train(
        [
            "data=csv",
            "model=gpt2-tiny",
            f"data.train={three_files['train']}",
            f"data.validation={three_files['validation']}",
            f"data.test={three_files['test']}",
            "data.text_column=body",
            "data.label_column=topic",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "eval_freq=100",
            "eval_iter=1",
            "logger=none",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert (metrics["train_count"], metrics["val_count"], metrics["test_count"]) == (40, 10, 10)
    run = Path(cfg.paths.output_dir)
    clf = Classifier(run)
    assert clf.class_names == ["politics", "sports", "tech"]
    assert clf.predict_proba(["the vote passed"]).shape[-1] == 3  # a 3-class head
    capsys.readouterr()
    assert classify_main([str(run), "the vote passed", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(out["probabilities"]) == ["politics", "sports", "tech"]
    assert out["label"] in out["probabilities"]
