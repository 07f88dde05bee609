"""``data.split``: the chapter's split and the bonus script's, each row for row against the book's
own pandas code (issue 13 item 4).

The chapter (ch06/01_main-chapter-code/gpt_class_finetune.py) balances, then ``random_split``
shuffles once; the follow-up table's script (ch06/02_bonus_additional-experiments/
additional_experiments.py, ``create_dataset_csvs``) shuffles the balanced table once more before
the same ``random_split``. So the two give different train / validation / test rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from spam_lightning.data.table import SPLIT_FILES, SPLIT_PROCEDURES, prepare, split_settings

# ------------------------------------------------------------------ the book's code, verbatim
# Quoted from rasbt/LLMs-from-scratch at 28c65cdfbc3338e2e040016eea4b7fdf556e4d57 (comments
# dropped, bodies unchanged); only the CSV paths are parameters here.


# ch06/01_main-chapter-code/gpt_class_finetune.py, lines 47-73
def create_balanced_dataset(df):
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=123)
    balanced_df = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    return balanced_df


def chapter_random_split(df, train_frac, validation_frac):
    df = df.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end = int(len(df) * train_frac)
    validation_end = train_end + int(len(df) * validation_frac)
    train_df = df[:train_end]
    validation_df = df[train_end:validation_end]
    test_df = df[validation_end:]
    return train_df, validation_df, test_df


# ibid., lines 270-277 (the `__main__` block)
def chapter_csvs(data_file_path, out: Path) -> None:
    df = pd.read_csv(data_file_path, sep="\t", header=None, names=["Label", "Text"])
    balanced_df = create_balanced_dataset(df)
    balanced_df["Label"] = balanced_df["Label"].map({"ham": 0, "spam": 1})
    train_df, validation_df, test_df = chapter_random_split(balanced_df, 0.7, 0.1)
    train_df.to_csv(out / "train.csv", index=None)
    validation_df.to_csv(out / "validation.csv", index=None)
    test_df.to_csv(out / "test.csv", index=None)


# ch06/02_bonus_additional-experiments/additional_experiments.py, lines 133-146
def bonus_random_split(df, train_frac, val_frac):
    df = df.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end = int(len(df) * train_frac)
    val_end = train_end + int(len(df) * val_frac)
    train_df = df[:train_end]
    val_df = df[train_end:val_end]
    test_df = df[val_end:]
    return train_df, val_df, test_df


# ibid., lines 149-163 (`create_dataset_csvs`)
def create_dataset_csvs(new_file_path, out: Path) -> None:
    df = pd.read_csv(new_file_path, sep="\t", header=None, names=["Label", "Text"])
    n_spam = df[df["Label"] == "spam"].shape[0]
    ham_sampled = df[df["Label"] == "ham"].sample(n_spam, random_state=123)
    balanced_df = pd.concat([ham_sampled, df[df["Label"] == "spam"]])
    balanced_df = balanced_df.sample(frac=1, random_state=123).reset_index(drop=True)
    balanced_df["Label"] = balanced_df["Label"].map({"ham": 0, "spam": 1})
    train_df, val_df, test_df = bonus_random_split(balanced_df, 0.7, 0.1)
    train_df.to_csv(out / "train.csv", index=None)
    val_df.to_csv(out / "validation.csv", index=None)
    test_df.to_csv(out / "test.csv", index=None)


BOOK = {"chapter": chapter_csvs, "bonus": create_dataset_csvs}

# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def book_dirs(sms_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each split's CSVs as the book's script writes them."""
    out = {}
    for split, script in BOOK.items():
        out[split] = tmp_path_factory.mktemp(f"book-{split}")
        script(sms_file, out[split])
    return out


@pytest.fixture(scope="module")
def ours(sms_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Each split as ``prepare`` writes it, each in its own folder: the paths and meta.json."""
    out = {}
    for split in SPLIT_PROCEDURES:
        prepared = prepare(sms_file, tmp_path_factory.mktemp(f"ours-{split}"), split=split)
        out[split] = {"paths": prepared.paths, "meta": prepared.meta, "dir": prepared.data_dir}
    return out


# ------------------------------------------------------------------ tests


def test_splits_are_chapter_and_bonus() -> None:
    assert SPLIT_PROCEDURES == ("chapter", "bonus") and set(BOOK) == set(SPLIT_PROCEDURES)


@pytest.mark.parametrize("split", SPLIT_PROCEDURES)
def test_csvs_equal_the_books_row_for_row(
    split: str, ours: dict[str, dict], book_dirs: dict[str, Path]
) -> None:
    for part, fname in SPLIT_FILES.items():
        mine = ours[split]["paths"][part]
        book = book_dirs[split] / fname
        # row for row: Label and Text, same order (a readable diff if not) ...
        pd.testing.assert_frame_equal(pd.read_csv(mine), pd.read_csv(book), obj=f"{split}/{fname}")
        # ... and byte for byte, as the book's to_csv(index=None) writes it
        assert mine.read_bytes() == book.read_bytes(), (split, fname)
    counts = {part: c["rows"] for part, c in ours[split]["meta"]["splits"].items()}
    assert counts == {"train": 1045, "validation": 149, "test": 300}


def test_the_two_splits_differ_but_hold_the_same_rows(ours: dict[str, dict]) -> None:
    frames = {
        split: {part: pd.read_csv(path) for part, path in ours[split]["paths"].items()}
        for split in SPLIT_PROCEDURES
    }
    for part in SPLIT_FILES:
        chapter, bonus = frames["chapter"][part], frames["bonus"][part]
        assert len(chapter) == len(bonus)
        assert not chapter.equals(bonus), part
        # not just reordered: the test set (what the table's accuracies are measured on) differs
        assert set(chapter["Text"]) != set(bonus["Text"]), part

    def everything(split: str) -> pd.DataFrame:
        rows = pd.concat(frames[split].values())
        return rows.sort_values(["Label", "Text"]).reset_index(drop=True)

    # the same balanced rows (the same ham sample), only split differently
    pd.testing.assert_frame_equal(everything("chapter"), everything("bonus"))


def test_meta_records_the_split(ours: dict[str, dict]) -> None:
    for split in SPLIT_PROCEDURES:
        on_disk = json.loads((ours[split]["dir"] / "meta.json").read_text())
        assert on_disk["settings"] == ours[split]["meta"]["settings"]
    # the chapter's settings are exactly those of folders prepared before data.split existed
    # (so they stay valid); the bonus split records itself
    legacy = {"format": 1, "split_seed": 123, "train_frac": 0.7, "val_frac": 0.1,
              "on_bad_rows": "error"}
    assert ours["chapter"]["meta"]["settings"] == legacy == split_settings(123, 0.7, 0.1, "error")
    assert ours["bonus"]["meta"]["settings"] == {**legacy, "split": "bonus"}


def test_a_folder_is_not_reused_for_the_other_split(sms_file: Path, tmp_path: Path) -> None:
    first = prepare(sms_file, tmp_path, split="chapter")
    chapter_train = first.paths["train"].read_bytes()
    assert not first.reused
    assert prepare(sms_file, tmp_path, split="chapter").reused
    bonus = prepare(sms_file, tmp_path, split="bonus")
    assert not bonus.reused and bonus.meta["settings"]["split"] == "bonus"
    assert bonus.paths["train"].read_bytes() != chapter_train
    assert prepare(sms_file, tmp_path, split="bonus").reused
    back = prepare(sms_file, tmp_path, split="chapter")
    assert not back.reused and back.paths["train"].read_bytes() == chapter_train


@pytest.mark.parametrize("bad", ["Bonus", "book", "", None, 1])
def test_bad_split_value_is_one_clear_error(sms_file: Path, tmp_path: Path, bad: object) -> None:
    message = f"data.split={bad!r} is unknown; allowed: chapter, bonus"
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(sms_file, tmp_path / "data", split=bad)
    assert not (tmp_path / "data").exists()  # refused before anything is read or written
    with pytest.raises(ValueError, match=re.escape(message)):
        split_settings(123, 0.7, 0.1, "error", bad)
