"""Labels and encodings of a user's CSV that used to be silently wrong (issue 24, item 13): a
missing-value label (``NaN``, ``null``) or a class with a single example became a class of its
own; a UTF-16 file (Excel's "Unicode text") was a missing column with mojibake. Each is now read
correctly or refused with the file, line, label, count and fix, through ``python train.py``'s
own ``train(cfg)``, before any tokenizing or training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _compose import compose_train

from spam_lightning.data import DataError
from spam_lightning.train import train

TINY = ["model=gpt2-tiny", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "eval_iter=1",
        "trainer.enable_progress_bar=false", "logger=none", "data.batch_size=2"]


def rows(labels: list[str]) -> str:
    return "text,label\n" + "".join(f"message number {i},{lab}\n" for i, lab in enumerate(labels))


def run_source(tmp_path: Path, text: str, *extra: str, encoding: str = "utf-8") -> dict:
    source = tmp_path / "all.csv"
    source.write_bytes(text.encode(encoding))
    return train(compose_train([*TINY, "data=csv", f"data.source={source}", *extra], tmp_path))


@pytest.mark.parametrize("missing", ["NaN", "nan", "null", "N/A", "None"])
def test_missing_value_label_is_named_with_line_and_count(tmp_path: Path, missing: str) -> None:
    labels = ["ham", "spam"] * 10
    labels[4] = labels[9] = missing  # data lines 6 and 11 of the file
    with pytest.raises(DataError) as err:
        run_source(tmp_path, rows(labels))
    assert str(err.value) == (
        f"{tmp_path / 'all.csv'}, line 6: label {missing!r} (column 'label', 2 row(s)) is a "
        "missing-value marker, which pandas reads as NaN: give these rows their labels or drop "
        "them, or list every class in data.class_names=[...] to keep it as a class")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_single_example_class_is_named_with_the_other_counts(tmp_path: Path) -> None:
    labels = ["ham", "spam"] * 10
    labels[7] = "spma"  # a typo on data line 9
    with pytest.raises(DataError) as err:
        run_source(tmp_path, rows(labels))
    assert str(err.value).startswith(
        f"{tmp_path / 'all.csv'}, line 9: label 'spma' (column 'label') occurs once; the other "
        "classes have 'ham' 10, 'spam' 9 rows. A class needs examples to learn from and to test "
        "on; a typo? Fix or drop the row, or list every class in data.class_names")


def test_three_files_single_example_in_training_file(tmp_path: Path) -> None:
    labels = ["a", "b"] * 6 + ["c"]
    paths = []
    for split, text in (("train", rows(labels)), ("validation", rows(["a", "b"])),
                        ("test", rows(["a", "b"]))):
        (path := tmp_path / f"{split}.csv").write_text(text)
        paths.append(f"data.{split}={path}")
    with pytest.raises(DataError, match=re.escape(
            f"{tmp_path / 'train.csv'}, line 14: label 'c' (column 'label') occurs once")):
        train(compose_train([*TINY, "data=csv", *paths], tmp_path))


def test_declared_classes_keep_rare_and_missing_named_labels(tmp_path: Path) -> None:
    """data.class_names declares the classes: a rare class or one named `None` is the user's."""
    labels = ["ham", "None"] * 10
    labels[3] = "spam"
    metrics = run_source(tmp_path, rows(labels), "data.class_names=[ham,None,spam]")
    assert metrics["num_classes"] == 3 if "num_classes" in metrics else True
    assert (tmp_path / "run" / "metrics.json").is_file()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_files_with_a_byte_order_mark_are_read(tmp_path: Path,
                                                               encoding: str) -> None:
    text = rows(["ham", "späm"] * 10)
    if encoding == "utf-16-be":  # the mark, then big-endian text
        source = tmp_path / "all.csv"
        source.write_bytes(b"\xfe\xff" + text.encode("utf-16-be"))
        metrics = train(compose_train([*TINY, "data=csv", f"data.source={source}"], tmp_path))
    else:
        metrics = run_source(tmp_path, text, encoding=encoding)
    assert metrics["test_count"] > 0
    bundle = json.loads((tmp_path / "run" / "bundle" / "bundle.json").read_text())
    assert bundle["class_names"] == ["ham", "späm"]


def test_utf16_without_a_byte_order_mark_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        run_source(tmp_path, rows(["ham", "spam"] * 10), encoding="utf-16-le")
    assert str(err.value) == (
        f"{tmp_path / 'all.csv'}, line 1: NUL bytes (the first at byte 1): this looks like UTF-16 "
        "without a byte-order mark. Save it as UTF-8 (e.g. iconv -f UTF-16LE -t UTF-8 IN > OUT, "
        'or "CSV UTF-8" in a spreadsheet)')
