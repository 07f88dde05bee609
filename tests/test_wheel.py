"""A built wheel trains from an empty folder: the configs and the data ship inside the package
(issue 12 item 5), so a non-editable install needs no checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RUN = ["model=gpt2-tiny", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
       "trainer.limit_val_batches=1", "eval_iter=1"]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{cmd}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow  # a wheel build, an install and a training run in fresh interpreters: ~30 s
def test_wheel_trains_from_an_empty_folder(tmp_path: Path) -> None:
    # a copy of the checkout's package, so the build leaves nothing in the checkout
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("spam_lightning", "conf"):  # conf/ ships in the wheel as spam_lightning.conf
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)])
    (wheel,) = (tmp_path / "dist").glob("spam_lightning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("conf/__init__.py", "conf/train.yaml", "conf/model/gpt2-tiny.yaml",
                 "conf/experiment/table/row01.yaml", "conf/debug/limit.yaml",
                 "data/assets/SMSSpamCollection"):
        assert f"spam_lightning/{path}" in names, path

    # installed on its own (dependencies from this interpreter), with its console script
    site = tmp_path / "site"
    run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)])
    spam_train = site / "bin" / "spam-train"
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPAM_", "HYDRA_"))}
    env["PYTHONPATH"] = str(site)  # ahead of the checkout's editable install
    where = run([sys.executable, "-c", "import spam_lightning; print(spam_lightning.__file__)"],
                cwd=empty, env=env)
    assert Path(where.stdout.strip()).parent == site / "spam_lightning"

    run([str(spam_train), *RUN], cwd=empty, env=env)
    (run_dir,) = (p for p in (empty / "outputs" / "runs").iterdir() if not p.is_symlink())
    assert (empty / "outputs" / "runs" / "latest").resolve() == run_dir.resolve()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "gpt2-tiny" and metrics["global_step"] == 2
    assert metrics["test_count"] == 300  # the bundled SMS file, split as the chapter does
    assert (run_dir / "bundle" / "model.safetensors").is_file()
    hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    main = [s for s in hydra["runtime"]["config_sources"] if s["provider"] == "main"]
    assert main == [{"path": "spam_lightning.conf", "schema": "pkg", "provider": "main"}]
    assert sorted(p.name for p in empty.iterdir()) == ["data", "outputs"]  # nothing else written
