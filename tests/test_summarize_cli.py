"""`python scripts/summarize.py FOLDER` on what is not a sweep (issue 29, item 8): one message
naming the fix, exit status 1, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _summarize(folder: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "summarize.py"), folder],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_parent_of_sweeps_names_them_and_a_missing_folder_is_named(tmp_path: Path) -> None:
    parent = tmp_path / "outputs" / "multirun"
    for sweep in ("2026-12-01_10-00-00_aaaaaa", "2026-12-02_10-00-00_bbbbbb"):
        (parent / sweep / "0" / ".hydra").mkdir(parents=True)
        (parent / sweep / "multirun.yaml").write_text("hydra: {}\n")
    (tmp_path / "empty").mkdir()
    results = {arg: _summarize(arg, tmp_path)
               for arg in ("outputs/multirun", "outputs/multirun/nope", "empty")}
    for arg, proc in results.items():
        assert proc.returncode == 1, (arg, proc.stderr)
        assert proc.stdout == "" and "Traceback" not in proc.stderr, (arg, proc.stderr)
        assert proc.stderr.startswith("Error: ") and proc.stderr.count("Error: ") == 1, proc.stderr
    assert results["outputs/multirun"].stderr == (
        "Error: outputs/multirun holds 2 sweep folder(s), not a sweep's jobs; summarize one of "
        "them (the newest is last):\n"
        "  outputs/multirun/2026-12-01_10-00-00_aaaaaa\n"
        "  outputs/multirun/2026-12-02_10-00-00_bbbbbb\n"
        'e.g. python scripts/summarize.py "outputs/multirun/2026-12-02_10-00-00_bbbbbb"\n')
    assert results["outputs/multirun/nope"].stderr.startswith(
        "Error: outputs/multirun/nope: no such folder; pass a sweep folder, e.g. outputs/multirun/")
    assert "empty holds no sweep jobs (folders with a .hydra/ inside)" in results["empty"].stderr
    assert not list(tmp_path.rglob("summary.*"))
