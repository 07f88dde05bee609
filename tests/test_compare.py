"""Baselines and encoder models as models of the framework (issue 16): `python train.py
model=logreg|majority|encoder`, their run folders, bundles and `spam-classify`, and the one
multirun that compares them with the chapter's GPT-2 on the same split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_encoders import FAMILIES, write_hub_cache, write_tiny_encoder
from hydra.utils import get_class
from sklearn.dummy import DummyClassifier
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from spam_lightning.data.datamodule import SpamDataModule
from spam_lightning.inference.classify import Classifier
from spam_lightning.inference.classify import main as classify_main
from spam_lightning.training.checks import ConfigError

REPO = Path(__file__).resolve().parents[1]
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def chapter_split(tmp_path_factory: pytest.TempPathFactory, sms_file: Path) -> dict:
    """The chapter's train / validation / test texts and labels, as the data module gives them."""
    dm = SpamDataModule(source=str(sms_file), data_dir=str(tmp_path_factory.mktemp("sms") / "d"))
    dm.prepare_data()
    dm.setup("fit")
    return {s: getattr(dm, f"{s}_dataset") for s in ("train", "val", "test")}


def _sklearn_predictions(name: str, features: str, split: dict) -> dict:
    """The book's train_sklearn_logreg.py, run directly on the same split."""
    vectorizer = CountVectorizer() if features == "count" else TfidfVectorizer()
    x_train = vectorizer.fit_transform(split["train"].texts)
    model = (
        DummyClassifier(strategy="most_frequent")
        if name == "majority"
        else LogisticRegression(max_iter=1000)
    )
    model.fit(x_train, split["train"].labels)
    return {s: model.predict(vectorizer.transform(split[s].texts)) for s in split}


@pytest.mark.parametrize(
    ("name", "features"), [("logreg", "count"), ("logreg", "tfidf"), ("majority", "count")]
)
def test_baseline_run_equals_scikit_learn_and_classifies_from_its_bundle(
    name, features, tiny_run, chapter_split
) -> None:
    cfg, metrics, run = tiny_run(
        f"model={name}", f"model.features={features}", "logger=tensorboard"
    )
    expected = _sklearn_predictions(name, features, chapter_split)
    for split, ds in chapter_split.items():
        accuracy = float((torch.tensor(expected[split]) == torch.tensor(ds.labels)).double().mean())
        assert metrics[f"{split}_accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert metrics[f"{split}_count"] == len(ds)
    assert metrics["model"] == name and metrics["features"] == features
    assert torch.isfinite(torch.tensor(metrics["test_loss"]))
    # the bundle: JSON + safetensors, no pickle; spam-classify predicts what scikit-learn does
    bundle = run / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == ["bundle.json", "model.safetensors"]
    assert json.loads((bundle / "bundle.json").read_text())["kind"] == "baseline"
    clf = Classifier(run)
    texts = chapter_split["test"].texts
    got = [clf.class_names.index(p.label) for p in clf.predict(texts)]
    assert got == [int(v) for v in expected["test"]]
    # TensorBoard's hparams tab gets the run's options beside its final metrics
    (events,) = (run / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert "hparams/test_accuracy" in acc.Tags()["scalars"]
    assert acc.Scalars("hparams/test_accuracy")[0].value == pytest.approx(
        metrics["test_accuracy"], abs=1e-6
    )


def test_baseline_cli_and_errors(tiny_run, capsys) -> None:
    _, _, run = tiny_run("model=logreg")
    capsys.readouterr()  # the run's own printout
    assert (
        classify_main(
            [str(run), "WIN a FREE prize! Call now to claim", "see you at dinner", "--json"]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["label"] for line in lines] == ["spam", "ham"]
    # a baseline fits in one step: no checkpoint to resume from, said before any work
    with pytest.raises(Exception, match="model=logreg fits in one step"):
        tiny_run("model=logreg", "ckpt_path=last")


def _encoder_run(tiny_run, folder: Path, *extra: str):
    return tiny_run("model=encoder", f"model.name={folder}", *extra)


@pytest.mark.parametrize(  # bert in the default suite, every other family in the slow pass
    "family", [f if f == "bert" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_encoder_trains_resumes_and_classifies_from_a_local_folder(
    family, tiny_run, tmp_path_factory, chapter_split
) -> None:
    folder = write_tiny_encoder(tmp_path_factory.mktemp(family) / "enc", family)
    cfg, first, run = _encoder_run(tiny_run, folder, "trainable=last_block")
    assert cfg.data.pad_token_id == 50256  # the config's GPT-2 value; the run used the tokenizer's
    assert first["epochs"] == 1 and first["global_step"] == 3 and first["token"] is None
    # resume the same run folder for a second epoch: it continues from last.ckpt
    _, second, _ = _encoder_run(
        tiny_run, folder, "trainable=last_block", "ckpt_path=last", "trainer.max_epochs=2"
    )
    assert second["epochs"] == 2 and second["global_step"] == 6
    # the bundle is the model's own save_pretrained folder, safetensors only
    names = {p.name for p in (run / "bundle").iterdir()}
    assert {"bundle.json", "config.json", "model.safetensors"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth"))]
    # spam-classify reproduces the final test accuracy on the examples the test loop saw
    # (debug=limit: the first 2 batches of 8, in order), padded per batch instead of to max_length
    clf = Classifier(run)
    texts, labels = chapter_split["test"].texts[:16], chapter_split["test"].labels[:16]
    got = [clf.class_names.index(p.label) for p in clf.predict(texts)]
    accuracy = sum(g == y for g, y in zip(got, labels, strict=True)) / 16
    assert second["test_accuracy"] == pytest.approx(accuracy)


def test_encoder_is_refused_early_with_a_gpt2_option(tiny_run, tmp_path) -> None:
    folder = write_tiny_encoder(tmp_path / "enc", "distilbert")
    with pytest.raises(Exception, match=r"trainable.name='lora' is unknown; allowed: last_layer, last_block, all for encoders"):
        _encoder_run(tiny_run, folder, "trainable=lora")
    with pytest.raises(Exception, match="model.name=.*no folder"):
        _encoder_run(tiny_run, tmp_path / "missing" / "enc")
    with pytest.raises(Exception, match="token=flexible: the token option is GPT-2's") as err:
        _encoder_run(tiny_run, folder, "token=flexible", "cache.trunk=true")
    assert "cache.trunk=true: the frozen-trunk cache is GPT-2's" in str(err.value)
    # a family without the book's last_block mapping: one message, not a traceback
    from transformers import ElectraConfig, ElectraModel

    electra = tmp_path / "electra"
    tokenizer_files = [f for f in folder.iterdir() if f.name.startswith("tokenizer")]
    ElectraModel(ElectraConfig(vocab_size=200, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32,
                               embedding_size=16)).save_pretrained(electra)
    for f in tokenizer_files:
        (electra / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match="trainable=last_block is defined for the families"):
        _encoder_run(tiny_run, electra, "trainable=last_block")
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_one_multirun_compares_gpt2_an_encoder_and_the_baselines(tmp_path, sms_file) -> None:
    """The done-when of issue 16: one sweep, one split, one summary with each row's test
    accuracy and time. The encoder is a tiny random DistilBERT in the Hugging Face cache, where
    a user's first run would have downloaded distilbert-base-uncased."""
    home = tmp_path / "home"
    write_hub_cache(home, "distilbert-base-uncased", "distilbert")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home)}
    rows = "compare/sms/gpt2,compare/sms/majority,compare/sms/logreg,compare/sms/distilbert"
    smoke = [
        "model.weights=random",
        "++model.n_layers=2",
        "++model.emb_dim=32",
        "++model.n_heads=2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "eval_iter=1",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "-m", f"experiment={rows}", *smoke],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    import pandas as pd

    table = pd.read_csv(sweep / "summary.csv", keep_default_na=False)
    assert [c.split("experiment=")[1].split(",")[0] for c in table["Config"]] == rows.split(",")
    assert set(table["Status"]) == {"ok"}
    assert list(table["Model"]) == ["gpt2-small", "majority", "logreg", "distilbert-base-uncased"]
    for _, row in table.iterrows():
        assert row["Test acc"].endswith("%") and row["Training time"].endswith(" min")
    assert list(table["Reference test acc"]) == ["95.67%", "—", "—", "—"]
    # every job read the same split: the baselines' figures are scikit-learn's on it
    jobs = sorted(
        (p for p in sweep.iterdir() if (p / "metrics.json").is_file()), key=lambda p: int(p.name)
    )
    metrics = [json.loads((j / "metrics.json").read_text()) for j in jobs]
    assert len({(m["train_count"] >= 1040, m["test_count"]) for m in metrics}) == 1
    logreg = next(m for m in metrics if m["model"] == "logreg")
    dm = SpamDataModule(source=str(sms_file), data_dir=str(tmp_path / "check"))
    dm.prepare_data()
    dm.setup("fit")
    split = {s: getattr(dm, f"{s}_dataset") for s in ("train", "val", "test")}
    expected = _sklearn_predictions("logreg", "count", split)["test"]
    assert logreg["test_accuracy"] == pytest.approx(
        float((torch.tensor(expected) == torch.tensor(split["test"].labels)).double().mean()),
        abs=1e-6,
    )


# Each compare row: (model family, model.name, trainable, lr, epochs) as the book's bonus scripts run
# them; the IMDB rows carry the bonus table's test accuracy, the SMS rows only the chapter's GPT-2.
COMPARE_ROWS = {
    "gpt2": ("gpt2", "gpt2-small", "last_block", 5e-5, 5),
    "distilbert": ("encoder", "distilbert-base-uncased", "all", 5e-6, 1),
    "bert": ("encoder", "bert-large-uncased", "all", 5e-6, 1),
    "roberta": ("encoder", "FacebookAI/roberta-large", "last_block", 5e-6, 1),
    "deberta": ("encoder", "microsoft/deberta-v3-base", "all", 5e-6, 1),
    "modernbert_base": ("encoder", "answerdotai/ModernBERT-base", "all", 5e-6, 1),
    "modernbert_large": ("encoder", "answerdotai/ModernBERT-large", "all", 5e-6, 1),
    "logreg": ("baseline", "logreg", None, None, None),
    "majority": ("baseline", "majority", None, None, None),
}
# the decoder rows (issue 27): the chapter's GPT-2 config with the model swapped, SMS only
SMS_ONLY_ROWS = {
    "qwen3_0_6b": ("decoder", "qwen3-0.6b", "last_block", 5e-5, 5),
    "llama3_2_1b": ("decoder", "llama3.2-1b", "last_block", 5e-5, 5),
}
IMDB_REFERENCE = {"gpt2": 91.88, "bert": 90.89, "distilbert": 91.40, "roberta": 92.95,
                  "deberta": 94.69, "modernbert_base": 93.79, "modernbert_large": 95.07,
                  "logreg": 88.85, "majority": 49.91}


@pytest.mark.parametrize("dataset", ["sms", "imdb"])
def test_every_compare_row_resolves_to_the_books_settings(dataset) -> None:
    from _compose import CONF, compose_train

    rows = {**COMPARE_ROWS, **(SMS_ONLY_ROWS if dataset == "sms" else {})}
    on_disk = sorted(p.stem for p in (CONF / "experiment" / "compare" / dataset).glob("*.yaml"))
    assert on_disk == sorted(rows)
    for row, (kind, name, trainable, lr, epochs) in rows.items():
        cfg = compose_train([f"experiment=compare/{dataset}/{row}"])
        assert (get_class(cfg.model._target_).kind, cfg.model.name) == (kind, name), row
        assert cfg.data._target_.endswith("IMDBDataModule" if dataset == "imdb" else "SpamDataModule")
        if dataset == "sms":
            assert cfg.data.split == "chapter"  # one split for every row: the chapter's
        if kind == "encoder":
            assert (cfg.data.max_length, cfg.data.batch_size) == (256, 8), row
        if kind != "baseline":
            imdb_gpt2 = dataset == "imdb" and row == "gpt2"  # train_gpt.py --trainable_layers all
            assert cfg.trainable.name == ("all" if imdb_gpt2 else trainable), row
            assert cfg.optimizer.lr == lr and cfg.optimizer.weight_decay == 0.1, row
            assert cfg.trainer.max_epochs == (1 if imdb_gpt2 else epochs), row
        reference = (cfg.reference or {}).get("test_acc")
        if dataset == "imdb":
            assert reference == IMDB_REFERENCE[row], row
        else:
            assert reference == (95.67 if row == "gpt2" else None), row


def test_spam_serve_answers_with_a_baseline_and_an_encoder(tiny_run, tmp_path_factory) -> None:
    """The web demo's API over HTTP for both new bundle kinds: the Classifier's predictions."""
    import httpx
    from conftest import uvicorn_server

    from spam_lightning.inference.serve import create_app

    folder = write_tiny_encoder(tmp_path_factory.mktemp("serve") / "enc", "distilbert")
    texts = ["WIN a FREE prize! Call now to claim", "see you at dinner"]
    for overrides, kind in ((["model=logreg"], "baseline"),
                            (["model=encoder", f"model.name={folder}", "trainable=all"], "encoder")):
        _, _, run = tiny_run(*overrides)
        expected = [p.label for p in Classifier(run).predict(texts)]
        app = create_app(run)
        with uvicorn_server(app) as url, httpx.Client(base_url=url, trust_env=False) as client:
            health = client.get("/api/health").json()
            assert health["kind"] == kind and health["class_names"] == ["ham", "spam"]
            reply = client.post("/api/classify", json={"texts": texts})
            assert reply.status_code == 200
            assert [p["label"] for p in reply.json()["predictions"]] == expected
            note = "every word counts" if kind == "baseline" else "tokens are truncated"
            assert note in client.get("/").text
