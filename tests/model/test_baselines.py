"""The book's baselines (``spam_lightning.model.baselines``) on the chapter's SMS split.

They must equal scikit-learn run as ``ch06/03_bonus_imdb-classification/train_sklearn_logreg.py``
does, and come back from a bundle (JSON + safetensors, no pickle) with identical probabilities.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.dummy import DummyClassifier
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from spam_lightning.model.baselines import (
    BASELINES,
    FEATURES,
    FIX,
    Baseline,
    BaselineBundleError,
    fit_baseline,
)

REPO = Path(__file__).resolve().parents[2]
Split = tuple[list[str], np.ndarray]


@pytest.fixture(scope="module")
def sms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Split]:
    """The chapter's balanced train / validation / test split of the SMS Spam Collection."""
    from spam_lightning.data.datamodule import SpamDataModule

    dm = SpamDataModule(data_dir=str(tmp_path_factory.mktemp("baselines") / "sms"))
    dm.prepare_data()
    dm.setup("fit")
    datasets = {"train": dm.train_dataset, "validation": dm.val_dataset, "test": dm.test_dataset}
    return {s: (list(d.texts), np.asarray(d.labels)) for s, d in datasets.items()}


@pytest.fixture(scope="module")
def fitted(sms: dict[str, Split]) -> dict[tuple[str, str], Baseline]:
    texts, labels = sms["train"]
    return {
        (name, features): fit_baseline(name, texts, labels.tolist(), 2, features=features)
        for name in BASELINES
        for features in FEATURES
    }


def bundle(baseline: Baseline) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``to_bundle`` as a bundle stores it: the config through JSON, the tensors cloned."""
    config, tensors = baseline.to_bundle()
    return json.loads(json.dumps(config)), {k: t.clone() for k, t in tensors.items()}


@pytest.mark.parametrize(
    "features, vectorizer", [("count", CountVectorizer), ("tfidf", TfidfVectorizer)]
)
def test_logreg_is_the_books_sklearn_run(sms, fitted, features, vectorizer) -> None:
    (train_x, train_y), (test_x, test_y) = sms["train"], sms["test"]
    vec = vectorizer()
    model = LogisticRegression(max_iter=1000).fit(vec.fit_transform(train_x), train_y)
    X_test = vec.transform(test_x)
    ours = fitted["logreg", features].predict_proba(test_x)
    assert ours.dtype == np.float64 and ours.shape == (len(test_x), 2)
    np.testing.assert_allclose(ours, model.predict_proba(X_test), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ours.argmax(1), model.predict(X_test))
    majority_share = (test_y == np.bincount(train_y).argmax()).mean()
    assert (ours.argmax(1) == test_y).mean() > majority_share + 0.3  # it learned something


def test_majority_is_the_books_dummy_classifier(sms, fitted) -> None:
    (train_x, train_y), (test_x, test_y) = sms["train"], sms["test"]
    vec = CountVectorizer()
    dummy = DummyClassifier(strategy="most_frequent").fit(vec.fit_transform(train_x), train_y)
    ours = fitted["majority", "count"].predict_proba(test_x)
    np.testing.assert_array_equal(ours, dummy.predict_proba(vec.transform(test_x)))
    np.testing.assert_array_equal(ours.argmax(1), dummy.predict(vec.transform(test_x)))
    share = (test_y == np.bincount(train_y).argmax()).mean()  # of the majority training class
    assert (ours.argmax(1) == test_y).mean() == share


@pytest.mark.parametrize(
    "name, features", [("majority", "count"), ("logreg", "count"), ("logreg", "tfidf")]
)
def test_bundle_round_trip_through_safetensors(sms, fitted, tmp_path, name, features) -> None:
    baseline = fitted[name, features]
    config, tensors = baseline.to_bundle()
    text = json.dumps(config)  # the config part is plain JSON
    assert all(type(t) is torch.Tensor and t.dtype == torch.float64 for t in tensors.values())
    save_file(tensors, tmp_path / "baseline.safetensors")
    loaded = Baseline.from_bundle(json.loads(text), load_file(tmp_path / "baseline.safetensors"), 2)
    assert (loaded.name, loaded.features, loaded.num_classes) == (name, features, 2)
    for split in ("train", "validation", "test"):
        texts = sms[split][0]
        np.testing.assert_array_equal(loaded.predict_proba(texts), baseline.predict_proba(texts))
    assert config["classes"] == [0, 1]
    if name == "logreg":  # rebuilt, not the fitted objects
        assert loaded.vectorizer is not baseline.vectorizer and loaded.model is not baseline.model
        vocabulary = CountVectorizer().fit(sms["train"][0]).get_feature_names_out().tolist()
        assert config["vocabulary"] == vocabulary  # in column order
        assert tensors["coef"].shape == (1, len(vocabulary)) and tensors["intercept"].shape == (1,)
        assert config["classifier"]["max_iter"] == 1000 and config["vectorizer"]["lowercase"]
        assert ("idf" in tensors) == (features == "tfidf")
    else:
        assert sorted(tensors) == ["probs"] and "vocabulary" not in config


def _pop_token(c: dict, t: dict) -> None:
    c["vocabulary"].pop()


def _set(where: str, key: str, value: Any) -> Callable[[dict, dict], None]:
    def change(c: dict, t: dict) -> None:
        (c if where == "config" else t)[key] = value

    return change


def _nan(c: dict, t: dict) -> None:
    t["coef"][0, 0] = float("nan")


BROKEN = {  # id: (baseline, change to its bundle, words the message must hold)
    "vocabulary-shorter-than-coef": ("logreg/count", _pop_token, ["tensor 'coef'", "vocabulary"]),
    "unknown-name": ("logreg/count", _set("config", "name", "svm"), ["name", "majority, logreg"]),
    "unknown-features": ("logreg/count", _set("config", "features", "bigram"), ["features"]),
    "missing-intercept": (
        "logreg/count",
        lambda c, t: t.pop("intercept"),
        ["'intercept'", "missing"],
    ),
    "missing-idf": ("logreg/tfidf", lambda c, t: t.pop("idf"), ["'idf'", "missing"]),
    "missing-probs": ("majority/count", lambda c, t: t.pop("probs"), ["'probs'", "missing"]),
    "float32-coef": ("logreg/count", lambda c, t: t.update(coef=t["coef"].float()), ["float64"]),
    "nan-coef": ("logreg/count", _nan, ["'coef'", "NaN"]),
    "extra-tensor": (
        "logreg/count",
        _set("tensors", "idf", torch.ones(3)),
        ["'idf'", "unexpected"],
    ),
    "class-out-of-range": ("logreg/count", _set("config", "classes", [0, 5]), ["classes"]),
    "no-vocabulary": ("logreg/count", lambda c, t: c.pop("vocabulary"), ["vocabulary"]),
    "bad-vectorizer-option": (
        "logreg/tfidf",
        lambda c, t: c["vectorizer"].update(analyzer="sentence"),
        ["vectorizer", "analyzer"],
    ),
    "newer-format": ("majority/count", _set("config", "format", 99), ["format"]),
    "probs-not-a-distribution": (
        "majority/count",
        _set("tensors", "probs", torch.tensor([0.7, 0.7], dtype=torch.float64)),
        ["'probs'", "probability"],
    ),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_from_bundle_refuses_a_broken_bundle(fitted, case) -> None:
    which, change, words = BROKEN[case]
    config, tensors = bundle(fitted[tuple(which.split("/"))])
    change(config, tensors)
    with pytest.raises(BaselineBundleError) as caught:
        Baseline.from_bundle(config, tensors, 2)
    assert isinstance(caught.value, ValueError)
    assert all(w in str(caught.value) for w in [*words, FIX]), str(caught.value)


def test_from_bundle_refuses_another_class_count(fitted) -> None:
    with pytest.raises(BaselineBundleError, match="num_classes.*re-create the bundle"):
        Baseline.from_bundle(*bundle(fitted["logreg", "count"]), num_classes=3)


@pytest.mark.parametrize(
    "option, value, allowed", [("name", "svm", BASELINES), ("features", "bigrams", FEATURES)]
)
def test_fit_baseline_names_an_unknown_option(option, value, allowed) -> None:
    args = {"name": "logreg", "features": "count", option: value}
    with pytest.raises(ValueError) as caught:
        fit_baseline(args.pop("name"), ["cheap pills", "see you"], [1, 0], 2, **args)
    message = str(caught.value)
    assert f"model.{option}" in message and value in message
    assert all(a in message for a in allowed), message


@pytest.mark.parametrize(
    "texts, labels, words",
    [
        (["a b", "c d"], [0, 2], "labels"),  # 2 is not a class index of 2 classes
        (["a b", "c d"], [0], "labels"),
        (["a b", "c d"], [1, 1], "only class 1"),  # logreg needs two classes
        ("a b c d", [0, 1], "texts"),
    ],
)
def test_fit_baseline_refuses_bad_data(texts, labels, words) -> None:
    with pytest.raises((ValueError, TypeError), match=words):
        fit_baseline("logreg", texts, labels, 2)


def test_predict_proba_wants_a_sequence_of_texts(fitted) -> None:
    baseline = fitted["logreg", "count"]
    with pytest.raises(TypeError, match="not one string"):
        baseline.predict_proba("WINNER! claim your prize")
    assert baseline.predict_proba([]).shape == (0, 2)


def _three_topics() -> tuple[list[str], list[int], list[str]]:
    """Texts of classes 0, 1 and 3 (of 4: class 2 has no example), and one probe per topic."""
    rng = np.random.default_rng(0)
    topics = {
        0: "cheap pills offer prize cash",
        1: "meeting lunch tomorrow office",
        3: "goal match team score",
    }
    filler = "the a and then so".split()
    texts, labels = [], []
    for label, words in topics.items():
        for _ in range(12):
            texts.append(" ".join(rng.choice(words.split() + filler, size=6)))
            labels.append(label)
    return texts, labels, ["cash prize offer", "lunch meeting tomorrow", "team score goal"]


@pytest.mark.parametrize(
    "features, vectorizer", [("count", CountVectorizer), ("tfidf", TfidfVectorizer)]
)
def test_three_classes_and_one_without_examples(tmp_path, features, vectorizer) -> None:
    texts, labels, probes = _three_topics()
    baseline = fit_baseline("logreg", texts, labels, 4, features=features)
    probs = baseline.predict_proba(probes)
    assert probs.shape == (3, 4) and (probs[:, 2] == 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=0, atol=1e-12)
    assert probs.argmax(1).tolist() == [0, 1, 3]
    vec = vectorizer()
    model = LogisticRegression(max_iter=1000).fit(vec.fit_transform(texts), labels)
    np.testing.assert_allclose(
        probs[:, [0, 1, 3]], model.predict_proba(vec.transform(probes)), atol=1e-12
    )
    config, tensors = baseline.to_bundle()
    assert config["classes"] == [0, 1, 3] and tensors["coef"].shape == (
        3,
        len(config["vocabulary"]),
    )
    save_file(tensors, tmp_path / "t.safetensors")
    loaded = Baseline.from_bundle(
        json.loads(json.dumps(config)), load_file(tmp_path / "t.safetensors"), 4
    )
    np.testing.assert_array_equal(
        loaded.predict_proba(probes + texts), baseline.predict_proba(probes + texts)
    )
    majority = fit_baseline("majority", texts, [3] + labels[1:], 4)  # one more 3 than 0 or 1
    assert majority.predict_proba(probes).tolist() == [[0.0, 0.0, 0.0, 1.0]] * 3


def test_works_without_sklearn_where_it_can(fitted, tmp_path) -> None:
    """Without scikit-learn the module imports and a majority bundle loads; fitting, or loading
    logreg, says which extra to install."""
    for name in BASELINES:
        config, tensors = fitted[name, "count"].to_bundle()
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        save_file(tensors, tmp_path / f"{name}.safetensors")
    script = """
import json, sys
from pathlib import Path
sys.modules["sklearn"] = None  # as if scikit-learn were not installed
from safetensors.torch import load_file
from spam_lightning.model.baselines import Baseline, fit_baseline
def load(name):
    config = json.loads((Path(sys.argv[1]) / f"{name}.json").read_text())
    return Baseline.from_bundle(config, load_file(Path(sys.argv[1]) / f"{name}.safetensors"), 2)
print(json.dumps(load("majority").predict_proba(["hi"]).tolist()))
for attempt in (lambda: load("logreg"), lambda: fit_baseline("majority", ["a"], [0], 2)):
    try:
        attempt()
    except ImportError as e:
        print(e)
"""
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    first, *errors = run.stdout.splitlines()
    assert json.loads(first) == fitted["majority", "count"].predict_proba(["hi"]).tolist()
    assert errors == ['the baselines need scikit-learn: pip install -e ".[baselines]"'] * 2
