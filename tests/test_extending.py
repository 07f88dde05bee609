"""docs/ARCHITECTURE.md's "how to add a dataset / a logger", followed from outside the package:
each is a class in any importable module plus one yaml (here on Hydra's search path), nothing
else. (A model family: tests/model/test_model_family.py; a pooling: tests/model/test_pooling.py.)"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from _compose import compose_train
from conftest import TINY_RUN

from spam_lightning.train import train

TOY_DATA = '''
from spam_lightning.data.datamodule import TextClassificationDataModule
from spam_lightning.data.table import Table

WORDS = {"red": "apple cherry tomato", "green": "lime leaf frog", "blue": "sky sea whale"}


class ColoursDataModule(TextClassificationDataModule):
    """Three classes of three-word messages, made in memory: nothing to prepare."""

    def __init__(self, rows_per_class: int = 12, **loader_options):
        super().__init__(**loader_options)
        if not isinstance(rows_per_class, int) or rows_per_class < 3:
            raise ValueError(f"data.rows_per_class={rows_per_class!r}: must be an integer >= 3")
        self.rows_per_class = rows_per_class

    def prepare_data(self):
        pass

    def load_splits(self):
        self.class_names = list(WORDS)
        out = {}
        for split, n in (("train", self.rows_per_class), ("validation", 3), ("test", 3)):
            texts = [f"{WORDS[c]} {i}" for i in range(n) for c in WORDS]
            labels = [k for _ in range(n) for k in range(len(WORDS))]
            out[split] = Table(texts, labels, f"<colours {split}>")
        return out
'''

TOY_LOGGER = '''
import json
from pathlib import Path

from lightning.pytorch.loggers.logger import Logger


class JsonLinesLogger(Logger):
    """Every logged metric as one JSON line in ``save_dir/metrics.jsonl``."""

    def __init__(self, save_dir):
        super().__init__()
        self.path = Path(save_dir) / "metrics.jsonl"

    name = "jsonl"
    version = "0"

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\\n")
'''


@pytest.fixture
def extension(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``extension(module, source, {"group/name.yaml": text})`` -> the Hydra search path override."""
    conf = tmp_path / "conf"

    def add(module: str, source: str, yamls: dict[str, str]) -> str:
        (tmp_path / f"{module}.py").write_text(source)
        for rel, text in yamls.items():
            (conf / rel).parent.mkdir(parents=True, exist_ok=True)
            (conf / rel).write_text(textwrap.dedent(text))
        return f"hydra.searchpath=[file://{conf}]"

    monkeypatch.syspath_prepend(str(tmp_path))
    yield add
    for module in ("toy_data", "toy_logger"):
        sys.modules.pop(module, None)


def test_a_new_dataset_is_a_datamodule_and_a_yaml(extension, tmp_path: Path) -> None:
    search = extension("toy_data", TOY_DATA, {"data/colours.yaml": """\
        # Three made-up classes (tests/test_extending.py).
        _target_: toy_data.ColoursDataModule
        rows_per_class: 12
        # the loader options every data module takes (TextClassificationDataModule's)
        context_length: ${model.context_length}
        seed: ${seed}
        padding: longest
        batch_size: 4
    """})
    # every batch of the small splits (TINY_RUN's debug=limit would stop the test split at 2)
    run = [*TINY_RUN, search, "data=colours", "trainer.max_epochs=1", "trainer.limit_test_batches=null"]
    metrics = train(compose_train(run, tmp_path / "ok"))
    assert metrics["train_count"] == 36 and metrics["test_count"] == 9  # every row, once
    bundle = json.loads((tmp_path / "ok" / "run" / "bundle" / "bundle.json").read_text())
    assert bundle["class_names"] == ["red", "green", "blue"] and bundle["num_classes"] == 3
    # its own option check joins the one "Invalid configuration" message, before any work
    with pytest.raises(Exception, match=r"Invalid configuration:[\s\S]*data.rows_per_class=1: must be"):
        train(compose_train([*run, "data.rows_per_class=1"], tmp_path / "bad"))
    assert not (tmp_path / "bad" / "run" / "metrics.json").exists()


def test_a_new_logger_is_a_yaml(extension, tmp_path: Path) -> None:
    search = extension("toy_logger", TOY_LOGGER, {"logger/jsonl.yaml": """\
        # Metrics as JSON lines (tests/test_extending.py).
        jsonl:
          _target_: toy_logger.JsonLinesLogger
          save_dir: ${paths.output_dir}
    """})
    overrides = [o for o in TINY_RUN if not o.startswith("logger=")]
    metrics = train(compose_train([*overrides, search, "logger=jsonl"], tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss_epoch" in x and "val/acc" not in x for x in lines)  # logged while training
    final = {k: v for x in lines for k, v in x.items() if k.startswith("hparams/")}
    assert final["hparams/test_accuracy"] == pytest.approx(metrics["test_accuracy"])  # the run's result
