"""What a message, a file or a request may hold and what it may cost (issue 24, items 5, 11, 12):
terminal escapes in ``spam-classify``'s output, memory bounded by what the model reads, and what
``spam-serve`` answers, to whom, and how long it waits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_inference_reliability import cli, make_bundle

# what a hostile message may hold: clear screen, a colour, NUL, BEL, 8-bit CSI, DEL, a bidi override
HOSTILE = "win\x1b[2J\x1b[31m now\x00\x07\x9b6n\x7f \u202eelif\u202c..."


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("untrusted") / "run")


def raw_controls(out: str) -> set[str]:
    """The characters of ``out`` a terminal acts on (line feeds and tabs aside)."""
    return {c for c in out if (ord(c) < 0x20 and c not in "\t\n") or 0x7F <= ord(c) < 0xA0
            or 0x202A <= ord(c) <= 0x202E or 0x2066 <= ord(c) <= 0x2069}


# ------------------------------------------------------------------ 12. terminal output
def test_text_and_json_output_are_terminal_safe(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.txt"
    path.write_text(f"{HOSTILE}\nplain message\n", encoding="utf-8")
    rc, out, err = cli([str(run_dir), HOSTILE[:20], "--file", str(path)], capsys)
    assert rc == 0, err
    assert len(out) == 3 and not raw_controls("\n".join(out))
    assert out[0].split("\t")[2] == r"win\x1b[2J\x1b[31m now\x00\x07\x9b6"
    assert out[1].split("\t")[2] == r"win\x1b[2J\x1b[31m now\x00\x07\x9b6n\x7f \u202eelif\u202c..."
    assert out[2].endswith("\tplain message")
    rc, out, err = cli([str(run_dir), "--json", "--file", str(path)], capsys)
    assert rc == 0, err
    assert not raw_controls("\n".join(out))
    assert [json.loads(x)["text"] for x in out] == [HOSTILE, "plain message"]  # the same values
