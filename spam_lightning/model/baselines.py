"""The book's baselines (``ch06/03_bonus_imdb-classification/train_sklearn_logreg.py``): the
majority class and logistic regression on bag-of-words features, the floor GPT-2 has to beat.
Stored as JSON plus float64 safetensors, never as a pickle (unpickling could run arbitrary code);
scikit-learn is imported only when needed.
"""

from __future__ import annotations

import importlib.util
import reprlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from spam_lightning.io_utils import write_safetensors
from spam_lightning.model.family import FINAL_SPLITS, Fitted, ModelFamily, Predictor
from spam_lightning.rules import choice_problems, is_int

BASELINES = ("majority", "logreg")
FEATURES = ("count", "tfidf")  # count: CountVectorizer() as the book; tfidf: TfidfVectorizer()
BUNDLE_FORMAT = 1
INSTALL_HINT = 'the baselines need scikit-learn: pip install -e ".[baselines]"'
FIX = "re-create the bundle with a training run"
# What shapes a vectorizer's transform once its vocabulary is fixed (not fit-only options such
# as min_df): recorded at fit time, passed back to the rebuilt vectorizer.
COUNT_OPTIONS = ("analyzer", "lowercase", "strip_accents", "stop_words", "token_pattern", "ngram_range", "binary")
TFIDF_OPTIONS = (*COUNT_OPTIONS, "norm", "use_idf", "smooth_idf", "sublinear_tf")
_SHAPES = {"probs": "one per class", "intercept": "one per coef row", "idf": "one per vocabulary token",
           "coef": "1 row for 2 classes, else 1 per class seen; 1 column per vocabulary token"}


class BaselineBundleError(ValueError):
    """A baseline's part of a bundle is missing, malformed or inconsistent."""


def _bad(field_name: str, problem: str) -> BaselineBundleError:
    return BaselineBundleError(f"baseline bundle, {field_name}: {problem}; {FIX}")


def _sklearn() -> Any:
    """scikit-learn with the parts used here, or an ImportError that names the extra."""
    try:
        import sklearn.dummy
        import sklearn.feature_extraction.text
        import sklearn.linear_model
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return sklearn


def _vectorizer_class(features: str) -> type:
    text = _sklearn().feature_extraction.text
    return text.CountVectorizer if features == "count" else text.TfidfVectorizer


@dataclass(eq=False)
class Baseline:
    """A fitted baseline. ``classes``: the class indices seen in training (sklearn's
    ``classes_``); ``predict_proba`` gives an unseen class probability 0."""

    name: str
    features: str
    num_classes: int
    classes: tuple[int, ...]
    vectorizer: Any = field(default=None, repr=False)  # logreg: the sklearn objects
    model: Any = field(default=None, repr=False)
    probs: np.ndarray | None = field(default=None, repr=False)  # majority: [num_classes]
    options: dict[str, Any] = field(default_factory=dict, repr=False)  # the classifier's

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """float64 ``[N, num_classes]``: column ``i`` is the probability of class index ``i``."""
        if isinstance(texts, str):
            raise TypeError("predict_proba takes a sequence of texts, not one string: use [text]")
        texts = list(texts)
        out = np.zeros((len(texts), self.num_classes), dtype=np.float64)
        if self.probs is not None:  # majority: the same distribution whatever the text
            out[:] = self.probs
        elif texts:
            out[:, list(self.classes)] = self.model.predict_proba(self.vectorizer.transform(texts))
        return out

    def to_bundle(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-serialisable config, float64 tensors for safetensors)."""
        config: dict[str, Any] = {
            "format": BUNDLE_FORMAT, "name": self.name, "features": self.features,
            "num_classes": self.num_classes, "classes": list(self.classes),
            "classifier": dict(self.options)}
        if self.probs is not None:
            return config, {"probs": torch.tensor(self.probs, dtype=torch.float64)}
        vec, params = self.vectorizer, self.vectorizer.get_params()
        keys = COUNT_OPTIONS if self.features == "count" else TFIDF_OPTIONS
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
        config["vectorizer"] = {k: plain[k] for k in keys}
        config["vocabulary"] = sorted(vec.vocabulary_, key=vec.vocabulary_.__getitem__)
        tensors = {"coef": self.model.coef_, "intercept": self.model.intercept_}
        if self.features == "tfidf":
            tensors["idf"] = vec.idf_
        # C order: sklearn's multiclass coef_ is Fortran-ordered, and safetensors wants contiguous
        return config, {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).clone()
                        for k, v in tensors.items()}

    @classmethod
    def from_bundle(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                    num_classes: int) -> Baseline:
        """Check a bundle's baseline part and rebuild the fitted sklearn objects (no unpickling):
        the vectorizer with its vocabulary (and ``idf_``), LogisticRegression with its arrays,
        so the same text analysis and the same probabilities."""
        if not isinstance(config, dict) or not isinstance(tensors, dict):
            raise _bad("config", "expected a JSON object and a dict of tensors")

        def get(key: str, ok: Callable[[Any], bool], expected: str) -> Any:
            value = config.get(key)
            if not ok(value):
                raise _bad(key, f"{reprlib.repr(value)}, expected {expected}")
            return value

        get("format", lambda v: v == BUNDLE_FORMAT, f"{BUNDLE_FORMAT} (this version's format)")
        name = get("name", lambda v: v in BASELINES, f"one of {', '.join(BASELINES)}")
        features = get("features", lambda v: v in FEATURES, f"one of {', '.join(FEATURES)}")
        get("num_classes", lambda v: v == num_classes, f"{num_classes}, as the model")
        least = 1 if name == "majority" else 2
        classes = get("classes", lambda v: isinstance(v, list) and len(v) >= least and all(
            type(c) is int and 0 <= c < num_classes for c in v) and v == sorted(set(v)),
            f"at least {least} increasing class indices in 0..{num_classes - 1}")
        options = get("classifier", lambda v: isinstance(v, dict), "a JSON object")
        if name == "majority":
            probs = _arrays(tensors, {"probs": (num_classes,)})["probs"]
            if (probs < 0).any() or abs(probs.sum() - 1.0) > 1e-9:
                raise _bad("tensor 'probs'", "not a probability distribution")
            return cls(name, features, num_classes, tuple(classes), probs=probs, options=options)
        vocab = get("vocabulary", lambda v: isinstance(v, list) and v and all(
            isinstance(t, str) for t in v) and len(set(v)) == len(v), "a non-empty list of distinct tokens")
        keys = COUNT_OPTIONS if features == "count" else TFIDF_OPTIONS
        given = get("vectorizer", lambda v: isinstance(v, dict) and set(v) == set(keys),
                    f"a JSON object of {', '.join(keys)}")
        k = 1 if len(classes) == 2 else len(classes)  # sklearn: one row for two classes
        shapes = {"coef": (k, len(vocab)), "intercept": (k,)}  # coef[:, j] weighs vocab[j]
        arrays = _arrays(tensors, shapes | ({"idf": (len(vocab),)} if features == "tfidf" else {}))
        vectorizer_class = _vectorizer_class(features)  # the message that names the extra
        try:
            kwargs = {k: tuple(v) if k == "ngram_range" else v for k, v in given.items()}
            vectorizer = vectorizer_class(vocabulary=vocab, **kwargs)
            vectorizer._validate_params()  # sklearn's own check of every option
            if features == "tfidf":
                vectorizer.idf_ = arrays["idf"]
        except (TypeError, ValueError) as e:
            raise _bad("vectorizer", str(e)) from e
        model = _sklearn().linear_model.LogisticRegression()
        model.classes_ = np.asarray(classes, dtype=np.int64)
        model.coef_, model.intercept_ = arrays["coef"], arrays["intercept"]
        model.n_features_in_ = len(vocab)
        return cls(name, features, num_classes, tuple(classes), vectorizer, model, options=options)


def _arrays(tensors: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The expected tensors, each dense finite float64 of its shape, as numpy copies."""
    out = {}
    for key, shape in shapes.items():
        t, where = tensors.get(key), f"tensor {key!r}"
        if t is None:
            raise _bad(where, f"missing (the bundle has: {', '.join(sorted(tensors)) or 'none'})")
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float64 or t.is_sparse:
            raise _bad(where, f"{getattr(t, 'dtype', type(t).__name__)}, expected torch.float64")
        if tuple(t.shape) != shape:
            raise _bad(where, f"shape {list(t.shape)}, expected {list(shape)} ({_SHAPES[key]})")
        if not bool(torch.isfinite(t).all()):
            raise _bad(where, "holds NaN or infinite values")
        out[key] = t.detach().cpu().numpy().copy()
    if extra := sorted(set(tensors) - set(shapes)):
        raise _bad(f"tensor {extra[0]!r}", f"unexpected (expected: {', '.join(shapes)})")
    return out


def option_problems(name: Any, features: Any, max_iter: Any) -> list[str]:
    """The baseline's options, checked for the config and for ``fit_baseline`` alike."""
    problems = choice_problems("model.name", name, BASELINES) + choice_problems("model.features", features, FEATURES)
    return problems + ([] if is_int(max_iter, 1) else [f"model.max_iter={max_iter!r}: must be an integer >= 1"])


def fit_baseline(name: str, texts: Sequence[str], labels: Sequence[int], num_classes: int, *,
                 features: str = "count", max_iter: int = 1000, seed: int = 123) -> Baseline:
    """Fit as the book's bonus script: ``majority``: ``DummyClassifier("most_frequent")``;
    ``logreg``: ``CountVectorizer()`` (or Tfidf) + ``LogisticRegression(max_iter, seed)``."""
    if problems := option_problems(name, features, max_iter):
        raise ValueError("; ".join(problems))
    if not is_int(num_classes, 2):
        raise ValueError(f"num_classes={num_classes!r}: need an integer >= 2")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts: need a sequence of strings")
    y = np.asarray(list(labels))
    if len(y) != len(texts) or not len(y):
        raise ValueError(f"{len(texts)} texts and {len(y)} labels: need as many, at least one")
    if y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels: need class indices in 0..{num_classes - 1}")
    sk = _sklearn()
    y, version = y.astype(np.int64), {"sklearn_version": sk.__version__}
    if name == "majority":
        dummy = sk.dummy.DummyClassifier(strategy="most_frequent").fit(np.zeros((len(y), 1)), y)  # X unused
        probs = np.zeros(num_classes, dtype=np.float64)
        probs[dummy.classes_] = dummy.predict_proba(np.zeros((1, 1)))[0]
        options = {"class": "DummyClassifier", "strategy": "most_frequent", **version}
        classes = tuple(dummy.classes_.tolist())
        return Baseline(name, features, num_classes, classes, probs=probs, options=options)
    if len(np.unique(y)) < 2:
        raise ValueError(f"labels: only class {y[0]} in the training split; logreg needs two")
    vectorizer = _vectorizer_class(features)()
    model = sk.linear_model.LogisticRegression(max_iter=int(max_iter), random_state=int(seed))
    model.fit(vectorizer.fit_transform(list(texts)), y)
    options = {"class": "LogisticRegression", **version} | {
        k: v for k, v in model.get_params().items() if v is None or isinstance(v, (bool, int, float, str))}
    classes = tuple(model.classes_.tolist())
    return Baseline(name, features, num_classes, classes, vectorizer, model, options=options)


@dataclass
class BaselineFamily(ModelFamily):
    """``model=majority|logreg``: fitted in one step by scikit-learn on the training texts (no
    tokens, no Lightning loop), evaluated on every split, bundled as JSON + safetensors."""

    kind = "baseline"
    trained_keys = ("model", "seed", "features")
    name: str = "logreg"
    features: str = "count"
    max_iter: Any = 1000
    weights: Any = None
    context_length: Any = 1024  # the data's max_length is computed with GPT-2 tokens (unused)

    def problems(self, cfg: DictConfig) -> list[str]:
        problems = option_problems(self.name, self.features, self.max_iter)
        if importlib.util.find_spec("sklearn") is None:
            problems.append(f'model={self.name} needs scikit-learn: pip install -e ".[baselines]"')
        if cfg.get("ckpt_path") is not None:
            problems.append(f"ckpt_path={cfg.ckpt_path}: model={self.name} fits in one step and "
                            "writes no checkpoints; rerun without ckpt_path")
        if not is_int(cfg.get("seed"), 0):
            problems.append(f"seed={cfg.get('seed')!r}: must be an integer >= 0")
        return problems

    def fit(self, cfg: DictConfig, trainer: Any, datamodule: Any, ckpt_path: Any, checkpoint: Any) -> Fitted:
        from spam_lightning.training.module import split_metrics

        datamodule.prepare_data()
        datamodule.setup("fit")
        splits = {s: datamodule.token_dataset(s) for s in FINAL_SPLITS}
        num_classes = datamodule.num_classes
        start = time.perf_counter()
        baseline = fit_baseline(self.name, splits["train"].texts, splits["train"].labels, num_classes,
                                features=self.features, max_iter=self.max_iter, seed=cfg.seed)
        seconds = time.perf_counter() - start
        final = {}
        for split, ds in splits.items():
            probs = torch.from_numpy(baseline.predict_proba(ds.texts))
            for name, value in split_metrics(probs, torch.tensor(ds.labels), num_classes).items():
                final[f"{split}_{name}"] = value
        return Fitted(baseline, final, None, examples_seen=len(splits["train"]),
                      training_seconds=round(seconds, 3), max_length=None, num_batches=None,
                      epochs=1, global_step=0, precision="64", device="cpu")

    def recorded(self, cfg: DictConfig) -> dict[str, Any]:
        return {"model": self.name, "weights": None, "trainable": None, "token": None,
                "padding": None, "features": self.features}

    def hparams(self, cfg: DictConfig, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.name, "features": self.features, "max_iter": self.max_iter, "seed": cfg.seed}

    def save(self, run_dir: Path, model: Baseline, datamodule: Any, cfg: DictConfig,
             trained: dict[str, Any]) -> Path:
        """Options and vocabulary in ``bundle.json``, arrays as safetensors."""
        from spam_lightning.inference import bundle

        out, (part, tensors) = bundle.fresh_bundle_dir(run_dir), model.to_bundle()  # contiguous
        write_safetensors(out / bundle.WEIGHTS, tensors, {"format": "pt"})
        return bundle.write_bundle_config(out, self.kind, list(datamodule.class_names),
                                          baseline=part, trained=trained)

    @classmethod
    def load(cls, folder: Path, config: dict[str, Any], device: Any, dtype: Any) -> Predictor:
        from safetensors.torch import load_file

        from spam_lightning.inference import bundle

        config_path = folder / bundle.CONFIG
        bundle.check_class_count(config, config_path)
        bundle.read_header(folder / bundle.WEIGHTS)  # a clear error for a non-safetensors file
        if not isinstance(config.get("baseline"), dict):
            raise bundle.bad_field(config_path, "baseline", config.get("baseline"))
        try:
            tensors = load_file(str(folder / bundle.WEIGHTS))
            return BaselinePredictor(Baseline.from_bundle(config["baseline"], tensors, config["num_classes"]))
        except BaselineBundleError as err:
            raise bundle.BundleError(f"{config_path}: {err}") from err


class BaselinePredictor(Predictor):
    """Bag of words: no tokens, no torch model; float64 probabilities as float32 like the rest."""

    def __init__(self, baseline: Baseline) -> None:
        self.model = baseline

    def probs(self, items: list[str]) -> torch.Tensor:
        return torch.from_numpy(self.model.predict_proba(items)).float()

    def describe(self) -> str:
        return self.model.name
