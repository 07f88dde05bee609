"""A model family is one module and one yaml (issue 22): a toy family, defined here and in a yaml
written beside it, trains, resumes, bundles, classifies and serves through the same commands as
GPT-2, touching nothing else. What docs/ARCHITECTURE.md's "how to add a model family" lists:

1. a ``ModelFamily`` subclass with a ``kind`` (``build``, ``save``, ``load``; ``problems`` and
   ``preflight`` when it has options or weights to check) - here the classes below;
2. ``conf/model/NAME.yaml`` with ``_target_`` and the class's options (``context_length``: the
   data configs read ``${model.context_length}``) - here written to a folder on Hydra's search path;
3. for ``spam-classify``/``spam-serve`` in a new process, one line in ``model.family.BUILTIN``
   (``kind: "module:Class"``); in this process the class registered itself when defined.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from _compose import compose_train
from safetensors.torch import load_file, save_file
from torch import nn

from spam_lightning.data.tokens import PAD_TOKEN_ID, encode_texts
from spam_lightning.inference.bundle import WEIGHTS, fresh_bundle_dir, write_bundle_config
from spam_lightning.inference.classify import Classifier
from spam_lightning.inference.classify import main as classify_main
from spam_lightning.model.family import ModelFamily, Predictor, family_class
from spam_lightning.rules import is_int
from spam_lightning.train import train
from spam_lightning.training.checks import ConfigError, validate_config

VOCAB = 50257


class BagOfEmbeddings(nn.Module):
    """The mean of the real tokens' embeddings, then a linear head."""

    def __init__(self, emb_dim: int, num_classes: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, emb_dim)
        self.head = nn.Linear(emb_dim, num_classes)

    def forward(self, input_ids, lengths=None) -> torch.Tensor:
        if lengths is None:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
        mask = torch.arange(input_ids.shape[1], device=input_ids.device)[None] < lengths[:, None]
        summed = (self.emb(input_ids) * mask[..., None]).sum(1)
        return self.head(summed / lengths.clamp(min=1)[:, None])


@dataclass
class BagFamily(ModelFamily):
    kind = "toy-bag"
    name: str = "bag"
    emb_dim: Any = 16
    context_length: Any = 1024

    def problems(self, cfg) -> list[str]:
        bad = [] if is_int(self.emb_dim, 1) else [f"model.emb_dim={self.emb_dim!r}: must be an integer >= 1"]
        return bad + super().problems(cfg)

    def build(self, cfg, num_classes: int) -> BagOfEmbeddings:
        torch.manual_seed(cfg.seed)
        return BagOfEmbeddings(self.emb_dim, num_classes)

    def save(self, run_dir: Path, model, datamodule, cfg, trained: dict) -> Path:
        out = fresh_bundle_dir(run_dir)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS)
        return write_bundle_config(out, self.kind, list(datamodule.class_names), emb_dim=self.emb_dim,
                                   max_length=int(datamodule.max_length), trained=trained)

    @classmethod
    def load(cls, folder: Path, config: dict, device, dtype) -> Predictor:
        model = BagOfEmbeddings(config["emb_dim"], config["num_classes"])
        model.load_state_dict(load_file(folder / WEIGHTS))
        return BagPredictor(model.to(device=device, dtype=dtype).eval(), config, device)


class BagPredictor(Predictor):
    dynamic = True  # the masked mean never reads padding: messages are padded per batch

    def __init__(self, model: BagOfEmbeddings, config: dict, device) -> None:
        self.model, self.device, self.pad_token_id = model, device, PAD_TOKEN_ID
        self.max_length = config["max_length"]

    def encode(self, texts: list[str]) -> list[list[int]]:
        return encode_texts(texts, max_length=self.max_length)

    def describe(self) -> dict:
        return {"emb_dim": self.model.emb.embedding_dim}


def write_yaml(folder: Path) -> Path:
    """``conf/model/bag.yaml`` in ``folder``: the family's config, as a user adds it."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "bag.yaml").write_text(
        f"_target_: {__name__}.BagFamily\nname: bag\nemb_dim: 16\ncontext_length: 1024\n"
    )
    return folder


@pytest.fixture
def bag_run(tmp_path: Path, sms_file: Path, tiny_data_dir: Path):
    """``bag_run(*overrides)`` -> (config, metrics, run folder) with ``model=bag`` from the yaml."""
    conf = write_yaml(tmp_path / "conf")

    def run(*overrides: str):
        cfg = compose_train([
            f"hydra.searchpath=[file://{conf}]", "model=bag", "debug=limit", "logger=tensorboard",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "optimizer.lr=0.01", f"data.source={sms_file}", f"paths.data_dir={tiny_data_dir}",
            *overrides,
        ], tmp_path)
        return cfg, train(cfg), Path(cfg.paths.output_dir)

    return run


def test_toy_family_trains_resumes_bundles_and_classifies(bag_run, capsys) -> None:
    cfg, first, run = bag_run()
    assert first["model"] == "bag" and first["token"] is None and first["trunk_cache"] is False
    assert first["epochs"] == 1 and first["global_step"] == 3 and first["test_count"] > 0
    assert (run / "tensorboard").is_dir() and (run / "history.json").is_file()
    # a resume continues the same run from last.ckpt, as for GPT-2
    _, second, _ = bag_run("ckpt_path=last", "trainer.max_epochs=2")
    assert second["epochs"] == 2 and second["global_step"] == 6
    bundle = json.loads((run / "bundle" / "bundle.json").read_text())
    assert bundle["kind"] == "toy-bag" and bundle["trained"]["model"] == "bag"
    assert family_class("toy-bag") is BagFamily
    # spam-classify: the bundle's family loads it; the predictions are the trained model's own
    # (raw: without the temperature the run fitted on its validation set)
    clf = Classifier(run, raw=True)
    texts = ["WIN a FREE prize! Call now", "see you at dinner", "ok"]
    model = BagOfEmbeddings(16, 2)
    model.load_state_dict(load_file(run / "bundle" / WEIGHTS))
    want = [torch.softmax(model(torch.tensor([ids])), -1)[0] for ids in encode_texts(texts)]
    torch.testing.assert_close(clf.predict_proba(texts), torch.stack(want), atol=1e-6, rtol=0)
    capsys.readouterr()
    assert classify_main([str(run), *texts, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["label"] for line in lines] == [p.label for p in clf.predict(texts)]
    # spam-serve describes it through the family
    from spam_lightning.inference.serve import create_app

    app = create_app(run)
    health = next(r for r in app.routes if getattr(r, "path", "") == "/api/health").endpoint()
    assert health["kind"] == "toy-bag" and health["model"] == {"emb_dim": 16}


def test_toy_family_reports_its_own_and_shared_problems_together(tmp_path: Path) -> None:
    conf = write_yaml(tmp_path / "conf")
    cfg = compose_train([f"hydra.searchpath=[file://{conf}]", "model=bag", "model.emb_dim=0",
                         "optimizer.lr=-1", "data.batch_size=0"], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    lines = str(err.value).splitlines()
    assert lines[0] == "Invalid configuration:"
    assert "  - model.emb_dim=0: must be an integer >= 1" in lines
    assert "  - optimizer.lr=-1: must be a finite number > 0" in lines
    assert any(line.startswith("  - data.batch_size=0: must be an integer >= 1") for line in lines)


def test_a_key_the_family_does_not_take_is_named_and_left_out(tmp_path: Path, caplog) -> None:
    """One sweep over several families shares overrides (``++model.n_layers=2`` for GPT-2 beside a
    baseline): a family gets the keys it takes, and the others are named in a warning."""
    cfg = compose_train(["model=logreg", "++model.n_layers=2"], tmp_path)
    family, _ = validate_config(cfg)
    assert family.name == "logreg" and not hasattr(family, "n_layers")
    assert "model.n_layers: not an option of spam_lightning.model.baselines.BaselineFamily; ignored" in caplog.text
