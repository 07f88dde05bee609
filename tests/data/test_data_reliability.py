"""Reliability of the data layer (issue 7, points 1 and 4; issue 14, points 8-10): bad data,
verified downloads, atomic and locked preparation, fuzzed readers, the source checked at setup,
read-only reuse, size caps and OS errors for local sources.
Runs alone: pytest tests/data/test_data_reliability.py
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spam_lightning.data.source import (
    EXPECTED_SHA256,
    EXPECTED_SIZE,
    DataError,
    DownloadError,
    sha256_bytes,
)
from spam_lightning.data.table import (
    csv_bytes,
    parse_split_csv,
    prepare,
    read_split_csv,
    read_table,
    read_text_table,
)
from spam_lightning.io_utils import write_bytes

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_zip(member: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("SMSSpamCollection", member)
    return buf.getvalue()


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def chapter_csvs(sms_file: Path, folder: Path) -> dict[str, bytes]:
    prepare(str(sms_file), folder)
    return {n: (folder / n).read_bytes() for n in ("train.csv", "validation.csv", "test.csv")}


# ------------------------------------------------------------------ 1. bad data

BAD_DATA = {
    "no-tab": (
        b"ham\tHi\nspam\tWin\nno tab on this line\n",
        3,
        "malformed line: expected 2 fields (Label\tText) separated by a tab, found 1 (no tab)",
    ),
    "too-many-fields": (b"ham\tHi\tthere\nspam\tWin\n", 1, "found 3 (a tab inside the text?)"),
    "unknown-label": (
        b"ham\tHi\nspam\tWin\nHam\tHello\n",
        3,
        "unknown label 'Ham' (allowed: ham, spam)",
    ),
    "empty-text": (b"ham\tHi\nspam\tWin\nham\t\n", 3, "empty text"),
    "blank-text": (b"ham\tHi\nspam\t   \nspam\tWin\n", 2, "text is only whitespace"),
    "non-utf8": (
        b"ham\tHi\nspam\tWin \xff\xfe now\n",
        2,
        "bytes that are not valid UTF-8 (first: 0xff)",
    ),
    "empty-file": (b"", 1, "the file is empty"),
    "one-class": (b"ham\tHi\nham\tHello\n", 1, "a class with no examples: no 'spam' rows"),
    "unclosed-quote": (b'ham\tHi\nspam\t"Win\nham\tok\n', 2, "never closed"),
    "after-merged-lines": (b'ham\t"two\nlines" here\nspam\tWin\nham\t\n', 4, "empty text"),
    "crlf": (b"ham\tHi\r\nspam\tWin\r\nbacon\tx\r\n", 3, "unknown label 'bacon'"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_names_file_line_problem(case: str, tmp_path: Path) -> None:
    content, line, problem = BAD_DATA[case]
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        prepare(str(path), tmp_path / "out")
    message = str(info.value)
    assert f"{path}, line {line}" in message or f"{path}, lines {line}" in message
    assert problem in message
    assert not (tmp_path / "out" / "train.csv").exists()


def test_bad_csv_columns_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("label,text\n0,hi\n")
    with pytest.raises(DataError, match=re.escape(f"{path}, line 1: missing columns")):
        read_split_csv(path)
    path.write_text('Label,Text\n0,hi\n1,"a, b"\n2,three\n1\n')
    with pytest.raises(DataError) as info:
        read_split_csv(path)
    assert f"{path}, line 4: unknown label '2' (allowed: 0, 1)" in str(info.value)
    assert f"{path}, line 5: malformed line" in str(info.value)


def _with_bad_rows(sms_file: Path, tmp_path: Path) -> Path:
    lines = sms_file.read_bytes().split(b"\n")
    lines[100:100] = [b"no tab here", b"spam\t", b"eggs\tspam spam spam", b"ham\t\xff\xfe"]
    path = tmp_path / "dirty" / "SMSSpamCollection"
    path.parent.mkdir()
    path.write_bytes(b"\n".join(lines))
    return path


def test_skip_bad_rows_logs_count(
    sms_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dirty = _with_bad_rows(sms_file, tmp_path)
    with pytest.raises(DataError) as info:
        prepare(str(dirty), tmp_path / "strict")
    message = str(info.value)
    for line in (101, 102, 103, 104):
        assert f"{dirty}, line {line}:" in message
    assert "data.on_bad_rows=skip" in message
    with caplog.at_level(logging.WARNING):
        prepared = prepare(str(dirty), tmp_path / "skip", on_bad_rows="skip")
    assert "skipped 4 bad row(s)" in caplog.text and "line 101" in caplog.text
    assert prepared.meta["rows"] == {"read": 5572, "skipped": 4, "ham": 4825, "spam": 747}
    clean = chapter_csvs(sms_file, tmp_path / "clean")
    for name, payload in clean.items():  # skipping the bad rows gives the chapter's data
        assert (tmp_path / "skip" / name).read_bytes() == payload


def test_datamodule_skip(sms_file: Path, tmp_path: Path) -> None:
    from spam_lightning.data import SpamDataModule

    dm = SpamDataModule(
        source=str(_with_bad_rows(sms_file, tmp_path)),
        data_dir=str(tmp_path / "d"),
        on_bad_rows="skip",
    )
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_dataset) == 1045 and dm.max_length == 120


# ------------------------------------------------------------------ 4. downloads, atomic writes, lock


def test_download_refuses_wrong_sha256_or_size(sms_file: Path, tmp_path: Path, http_serve) -> None:
    good = sms_file.read_bytes()
    tampered = good.replace(b"Go until jurong point", b"Go until JURONG point", 1)
    assert len(tampered) == EXPECTED_SIZE
    base = http_serve(
        {
            "/tampered.zip": make_zip(tampered),
            "/longer.zip": make_zip(good + b"ham\tx\n"),
            "/raw-tampered": tampered,
        }
    )
    urls = [f"{base}/tampered.zip", f"{base}/longer.zip", f"{base}/raw-tampered"]
    with pytest.raises(DownloadError) as info:
        prepare("download", tmp_path, urls)
    message = str(info.value)
    assert f"{urls[0]}: the downloaded file: SMSSpamCollection does not match" in message
    assert (
        f"expected 477,907 bytes sha256 {EXPECTED_SHA256}, got 477,907 bytes sha256 {sha256_bytes(tampered)}"
        in message
    )
    assert (
        f"{urls[1]}: the downloaded zip: SMSSpamCollection has size 477,913 bytes, expected 477,907"
        in message
    )
    assert f"{urls[2]}: the downloaded file" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prepare.lock"]  # nothing kept


def test_download_bare_file(sms_file: Path, tmp_path: Path, http_serve) -> None:
    base = http_serve({"/SMSSpamCollection": sms_file.read_bytes()})
    assert not prepare("download", tmp_path, [f"{base}/SMSSpamCollection"]).reused
    # a corrupted local copy is not trusted: fetched again
    (tmp_path / "SMSSpamCollection").write_bytes(b"ham\tx\nspam\ty\n")
    prepared = prepare("download", tmp_path, [f"{base}/SMSSpamCollection"])
    assert (
        prepared.reused
        and sha256_bytes((tmp_path / "SMSSpamCollection").read_bytes()) == EXPECTED_SHA256
    )


def test_meta_change_triggers_prepare(sms_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert not prepare(str(sms_file), out).reused
    first = (out / "train.csv").read_bytes()
    assert prepare(str(sms_file), out).reused
    assert not prepare(str(sms_file), out, split_seed=1).reused  # split settings changed
    assert (out / "train.csv").read_bytes() != first
    assert json.loads((out / "meta.json").read_text())["settings"]["split_seed"] == 1
    assert not prepare(str(sms_file), out).reused
    assert (out / "train.csv").read_bytes() == first
    (out / "test.csv").write_bytes(b"Label,Text\n0,tampered\n")  # CSV changed behind our back
    assert not prepare(str(sms_file), out).reused
    edited = tmp_path / "edited"
    edited.write_bytes(
        sms_file.read_bytes().replace(b"ham\tOk lar... Joking wif u oni...\n", b"", 1)
    )
    prepared = prepare(str(edited), out)  # the source changed
    assert not prepared.reused and prepared.meta["rows"]["read"] == 5571
    assert prepared.meta["source"]["path"] == str(edited)


def test_stale_temporaries_are_cleaned(sms_file: Path, tmp_path: Path) -> None:
    tmp_path.joinpath(".train.csv.deadbeef.tmp").write_bytes(b"half")  # from a killed process
    prepare(str(sms_file), tmp_path)
    assert leftovers(tmp_path) == []


def test_atomic_write_leaves_no_temp_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "train.csv"
    target.mkdir()  # os.replace onto a folder fails
    with pytest.raises(OSError):
        write_bytes(target, b"data")
    assert leftovers(tmp_path) == []
    write_bytes(tmp_path / "ok.csv", b"data")
    assert (tmp_path / "ok.csv").read_bytes() == b"data" and leftovers(tmp_path) == []


def _race_worker(barrier, results, source: str, data_dir: str) -> None:  # type: ignore[no-untyped-def]
    barrier.wait(timeout=60)
    results.put(prepare(source, data_dir).reused)


def test_concurrent_prepare(sms_file: Path, tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    data_dir = tmp_path / "shared"
    procs = [
        ctx.Process(target=_race_worker, args=(barrier, results, str(sms_file), str(data_dir)))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    reused = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert reused == [False, True, True, True]  # prepared once, reused three times
    assert sorted(p.name for p in data_dir.iterdir()) == [
        ".prepare.lock",
        "meta.json",
        "test.csv",
        "train.csv",
        "validation.csv",
    ]
    for name, payload in chapter_csvs(sms_file, tmp_path / "alone").items():
        assert (data_dir / name).read_bytes() == payload


# ------------------------------------------------------------------ fuzzing the readers

texts = st.text(max_size=30)
rows = st.lists(st.tuples(st.sampled_from(["ham", "spam"]), texts), min_size=1, max_size=6)


@FUZZ
@given(rows=rows)
def test_fuzz_written_tsv_reads_exactly_or_is_rejected(rows: list[tuple[str, str]]) -> None:
    """Any text, written as a TSV writer quotes it, reads back exactly or is clearly rejected."""
    buf = io.StringIO()
    csv.writer(buf, delimiter="\t").writerows(rows)
    try:
        table = read_table(buf.getvalue().encode("utf-8"), "fuzz.tsv")
    except DataError as e:
        assert re.search(r"fuzz\.tsv, lines? \d+", str(e))
        blank = any(not text.strip() for _, text in rows)
        assert blank or {label for label, _ in rows} != {"ham", "spam"}, str(e)
        return
    assert table.frame.values.tolist() == [list(r) for r in rows]


raw_pieces = st.sampled_from(
    [
        "ham\t",
        "spam\t",
        "ham",
        "\t",
        "\n",
        "\r",
        "\r\n",
        '"',
        '""',
        " ",
        "a",
        "é",
        "\x00",
        "NA",
        "\ufeff",
    ]
)


@FUZZ
@given(pieces=st.lists(raw_pieces, max_size=25))
def test_fuzz_raw_tsv_matches_pandas_or_is_rejected(pieces: list[str]) -> None:
    """Raw, quote-heavy input: read as pandas reads it (with line numbers), or a clear error."""
    data = ("ham\tx\nspam\ty\n" + "".join(pieces)).encode("utf-8")
    try:
        table = read_table(data, "raw.tsv")
    except DataError as e:
        assert re.search(r"raw\.tsv, lines? \d+: ", str(e))
        return
    expected = pd.read_csv(
        io.BytesIO(data),
        sep="\t",
        header=None,
        names=["Label", "Text"],
        dtype=str,
        keep_default_na=False,
        na_filter=False,
    )
    assert table.frame.values.tolist() == expected.values.tolist()
    assert table.lines[:2] == [1, 2] and table.lines == sorted(table.lines)


@FUZZ
@given(pieces=st.lists(raw_pieces, max_size=25), sep=st.sampled_from(["\t", ","]))
def test_fuzz_csv_reader_is_pandas_or_names_the_line(pieces: list[str], sep: str) -> None:
    """A user's CSV, read once by the ``csv`` module with line numbers: exactly the rows and
    fields pandas' C engine reads, or a clear error naming the line."""
    data = f"Label{sep}Text\n{''.join(pieces)}".encode()
    try:
        table = read_text_table(data, "raw.csv", "Text", "Label", sep)
    except DataError as e:
        assert re.search(r"raw\.csv, line \d+: ", str(e))
        return
    expected = pd.read_csv(
        io.BytesIO(data), sep=sep, dtype=str, keep_default_na=False, na_filter=False
    )
    assert table.frame.values.tolist() == expected.values.tolist()
    assert table.lines == sorted(table.lines) and table.lines[0] >= 2


@FUZZ
@given(tail=st.binary(max_size=30))
def test_fuzz_bytes_are_read_or_rejected(tail: bytes) -> None:
    data = b"ham\tx\nspam\ty\nham\t" + tail
    try:
        table = read_table(data, "bytes.tsv")
    except DataError as e:
        assert re.search(r"bytes\.tsv, lines? \d+: ", str(e))
        return
    expected = pd.read_csv(
        io.BytesIO(data),
        sep="\t",
        header=None,
        names=["Label", "Text"],
        dtype=str,
        keep_default_na=False,
        na_filter=False,
    )
    assert table.frame.values.tolist() == expected.values.tolist()


@FUZZ
@given(texts=st.lists(texts.filter(lambda t: t.strip() != ""), max_size=6))
def test_fuzz_split_csv_round_trip(texts: list[str]) -> None:
    """What we write (the chapter's ``to_csv`` where it is lossless) reads back unchanged."""
    labels = [i % 2 for i in range(len(texts))]
    frame = pd.DataFrame({"Label": labels, "Text": pd.Series(texts, dtype="str")})
    payload = csv_bytes(frame)
    assert parse_split_csv(payload, "train.csv") == (texts, labels)
    if not any("\r" in t for t in texts):
        assert payload == frame.to_csv(index=None).encode("utf-8")


# ------------------------------------------------------------------ issue 14, points 8-10

MIB = 1 << 20


def _imdb_folder(root: Path, word: str) -> Path:
    for subset in ("train", "test"):
        for label in ("pos", "neg"):
            folder = root / "aclImdb" / subset / label
            folder.mkdir(parents=True)
            for i in range(4):
                (folder / f"{i}_5.txt").write_text(f"{word} {subset} {label} {i}")
    return root


def test_setup_refuses_data_re_prepared_from_another_source(sms_file: Path, tmp_path: Path) -> None:
    """Point 8: a data_dir re-prepared from another source between prepare_data and setup (by a
    second datamodule, as another run would) is refused, naming the folder and both sources."""
    from spam_lightning.data import CSVDataModule, IMDBDataModule, SpamDataModule

    shared = tmp_path / "sms"
    edited = tmp_path / "edited" / "SMSSpamCollection"
    edited.parent.mkdir()
    edited.write_bytes(sms_file.read_bytes().replace(b"ham\tOk lar... Joking wif u oni...\n", b""))
    ours = SpamDataModule(data_dir=str(shared))  # data.source=bundled
    ours.prepare_data()
    theirs = SpamDataModule(source=str(edited), data_dir=str(shared))
    theirs.prepare_data()  # same split settings, another source: the folder is rewritten
    with pytest.raises(DataError) as info:
        ours.setup()
    message = str(info.value)
    assert message.startswith(f"{shared}: the prepared data there was made from another source: ")
    assert f"{edited} (sha256 {sha256_bytes(edited.read_bytes())})" in message
    assert f"not data.source=bundled (sha256 {EXPECTED_SHA256})" in message
    assert "Rerun, or give each source its own data.data_dir" in message
    assert ours.train_dataset is None  # refused before any tokenizing
    assert len(theirs.load_splits()["train"].texts) == 1045  # its own data reads fine

    rows = "".join(f"text {i},{i % 2}\n" for i in range(40))
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    one.write_text("text,label\n" + rows)
    two.write_text("text,label\n" + rows.replace("text 0,", "other 0,"))
    first = CSVDataModule(source=str(one), data_dir=str(tmp_path / "csv"))
    first.prepare_data()
    CSVDataModule(source=str(two), data_dir=str(tmp_path / "csv")).prepare_data()
    with pytest.raises(DataError, match="made from another source") as info:
        first.setup()
    assert f"{two} (path {two}, sha256 " in str(info.value)
    assert f"not data.source={one} (path {one}, sha256 " in str(info.value)

    sizes = {"train_size": 8, "val_size": 4, "test_size": 4}
    imdb_a = IMDBDataModule(
        source=str(_imdb_folder(tmp_path / "a", "alpha")), data_dir=str(tmp_path / "imdb"), **sizes
    )
    imdb_a.prepare_data()
    IMDBDataModule(
        source=str(_imdb_folder(tmp_path / "b", "beta")), data_dir=str(tmp_path / "imdb"), **sizes
    ).prepare_data()
    with pytest.raises(DataError, match="made from another source") as info:
        imdb_a.setup()
    assert str(tmp_path / "b") in str(info.value) and str(tmp_path / "a") in str(info.value)


def test_prepared_data_is_reused_without_write_access(sms_file: Path, tmp_path: Path) -> None:
    """Point 9: reusing prepared data reads only (no lock, no temp cleanup), so a read-only
    data_dir works; one that must be (re)written but cannot be is one DataError with the fix.
    The lock path is made a folder (opening it for writing fails, as root too), and a non-root
    run also makes the folder read-only (chmod does not stop root)."""
    from spam_lightning.data import CSVDataModule, SpamDataModule

    data_dir = tmp_path / "prepared"
    csv_source = tmp_path / "all.csv"
    csv_source.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(40)))
    SpamDataModule(data_dir=str(data_dir)).prepare_data()
    CSVDataModule(source=str(csv_source), data_dir=str(tmp_path / "csv")).prepare_data()
    stale = []
    for folder in (data_dir, tmp_path / "csv"):
        (folder / ".prepare.lock").unlink()
        (folder / ".prepare.lock").mkdir()  # taking the lock now fails: reuse must not try
        stale.append(folder / ".train.csv.deadbeef.tmp")
        stale[-1].write_bytes(b"half")  # cleaning temporaries would write: reuse must not
    read_only = os.geteuid() != 0
    for folder in (data_dir, tmp_path / "csv") if read_only else ():
        folder.chmod(0o555)
    try:
        assert prepare("bundled", data_dir).reused
        dm = SpamDataModule(data_dir=str(data_dir))
        dm.prepare_data()
        assert len(dm.load_splits()["train"].texts) == 1045
        csv_dm = CSVDataModule(source=str(csv_source), data_dir=str(tmp_path / "csv"))
        csv_dm.prepare_data()
        assert len(csv_dm.load_splits()["train"].texts) == 28
        assert all(p.exists() for p in stale)
        with pytest.raises(DataError) as info:
            prepare("bundled", data_dir, split_seed=1)  # other settings: must be rewritten
        message = str(info.value)
        assert message.startswith(f"data.data_dir={data_dir}: cannot write there (")
        assert "set data.data_dir to a writable folder" in message
        assert "\n" not in message
    finally:
        for folder in (data_dir, tmp_path / "csv"):
            folder.chmod(0o755)


def _read_as_nobody(path: Path) -> str:
    """``load_local(path)``'s error, read by an unprivileged user: as root, in a forked child
    that drops to uid/gid 65534 (a mode-000 file does not stop root)."""
    from spam_lightning.data.source import load_local

    if os.geteuid() != 0:
        with pytest.raises(DataError) as info:
            load_local(path)
        return str(info.value)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the outcome, never return into pytest
        try:
            os.setgid(65534)
            os.setuid(65534)
            load_local(path)
            out = "read it"
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = f"{type(e).__name__}: {e}"
        os.write(wfd, out.encode())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    assert out.startswith("DataError: "), out
    return out.removeprefix("DataError: ")


def test_local_sources_are_capped_and_os_errors_named(tmp_path: Path) -> None:
    """Point 10: a local file or zip member over the download's cap (a zip bomb, a header that
    lies, a huge sparse file) is refused before it is read; /dev/zero, a folder, a symlink loop
    and an unreadable file are named DataErrors for data.source (and data.train for CSVs)."""
    from spam_lightning.data import CSVDataModule, SpamDataModule
    from spam_lightning.data.source import MAX_SOURCE_BYTES, read_zip_member

    limit = f"{MAX_SOURCE_BYTES:,}-byte limit"
    bomb = tmp_path / "bomb.zip"  # 64 MiB + 1 of zeros in a 65 KB zip
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("SMSSpamCollection", "w") as f:
        for _ in range(MAX_SOURCE_BYTES // MIB):
            f.write(bytes(MIB))
        f.write(b"\0")
    assert bomb.stat().st_size < MIB
    with pytest.raises(DataError) as info:
        prepare(str(bomb), tmp_path / "out")
    assert str(info.value).startswith(
        f"{bomb}: SMSSpamCollection decompresses to more than the {limit} (64 MiB) for data.source"
    )
    # a header that claims 1,000 bytes for 1 MiB of zeros: at most the claimed bytes are read
    lying = bytearray(make_zip(bytes(MIB)))
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = lying.index(signature) + offset
        lying[at : at + 4] = (1000).to_bytes(4, "little")
    with pytest.raises(DataError, match="not a valid zip file"):
        read_zip_member(bytes(lying), "lying.zip")
    with pytest.raises(DataError, match=re.escape("more than the 1,000-byte limit")):
        read_zip_member(make_zip(bytes(MIB)), "small-cap.zip", max_bytes=1000)
    sparse = tmp_path / "huge" / "SMSSpamCollection"
    sparse.parent.mkdir()
    with open(sparse, "wb") as f:
        f.truncate(MAX_SOURCE_BYTES + 1)  # sparse: nothing to write, and nothing may be read
    with pytest.raises(DataError) as info:
        prepare(str(sparse), tmp_path / "out")
    assert str(info.value) == (
        f"data.source: {sparse}: {MAX_SOURCE_BYTES + 1:,} bytes, over the {limit} (64 MiB) for "
        f"data.source; not read"
    )

    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    cases = {
        "/dev/zero": "not a regular file (a device, pipe or socket, such as /dev/zero)",
        str(loop): "a symlink loop (a link that leads back to itself)",
        str(tmp_path): "is a folder, not a file",
    }
    for source, problem in cases.items():
        for make in (
            lambda s: prepare(s, tmp_path / "out"),
            lambda s: SpamDataModule(source=s, data_dir=str(tmp_path / "out")),
            lambda s: CSVDataModule(train=s, validation=s, test=s),
        ):
            with pytest.raises(DataError) as info:
                make(source)
            message = str(info.value)
            assert message.startswith(("data.source: ", "data.train: ")), message
            assert source in message and problem in message, message

    locked_out = Path(tempfile.mkdtemp(dir="/tmp"))  # traversable by any user (not pytest's 0700)
    try:
        locked_out.chmod(0o755)
        secret = locked_out / "SMSSpamCollection"
        secret.write_bytes(b"ham\thi\nspam\twin\n")
        secret.chmod(0o000)
        message = _read_as_nobody(secret)
        assert message.startswith(f"data.source: {secret}: permission denied"), message
    finally:
        shutil.rmtree(locked_out)
    assert leftovers(tmp_path) == []
