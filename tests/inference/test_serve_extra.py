"""``spam-serve`` after a plain ``pip install .`` (no ``serve`` extra): one line that names the
extra, exit status 1, no traceback (issue 29 item 5)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# the console script pip wrote, run as a user runs it, with fastapi (or uvicorn) not importable:
# None in sys.modules makes `import fastapi` raise ModuleNotFoundError, as when it is not installed
RUN_WITHOUT = ("import runpy, sys\nsys.modules[{module!r}] = None\nsys.argv = {argv!r}\n"
               "runpy.run_path({script!r}, run_name='__main__')\n")


def spam_serve_without(module: str, *args: str) -> subprocess.CompletedProcess:
    script = shutil.which("spam-serve", path=str(Path(sys.executable).parent))
    assert script, "the spam-serve console script is not installed beside this interpreter"
    code = RUN_WITHOUT.format(module=module, argv=["spam-serve", *args], script=script)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("module", ["fastapi", "uvicorn"])
def test_missing_serve_extra_is_one_line_naming_it(module: str, tmp_path: Path) -> None:
    proc = spam_serve_without(module, str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [
        f"spam-serve: error: the web demo needs the serve extra ({module} is not installed): "
        'pip install "spam-lightning[serve]"'], proc.stderr
    assert proc.stdout == ""


def test_help_needs_no_extra() -> None:
    proc = spam_serve_without("fastapi", "--help")
    assert proc.returncode == 0 and "--threshold" in proc.stdout, proc.stderr
