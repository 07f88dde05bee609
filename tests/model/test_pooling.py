"""Pooling (`token=NAME`, model/pooling.py): each strategy's declaration and what is derived from
it, and a pooling added from outside the package (a class and a yaml, nothing else)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _compose import compose_train
from test_learning import write_easy_tsv
from test_performance import BASE, assert_same_run, tiny

from spam_lightning.inference.classify import Classifier
from spam_lightning.model.classifier import GPTClassifier
from spam_lightning.model.pooling import (
    POOLINGS,
    First,
    Flexible,
    Last,
    MaskedMean,
    Mean,
    get_pooling,
)
from spam_lightning.train import train

LENGTHS = torch.tensor([2, 5, 1])


@pytest.mark.parametrize(
    ("name", "span", "positions", "reads_padding", "unpadded"),
    [  # span and positions of a 6-wide batch with real lengths 2, 5, 1
        ("last", [6, 6, 6], [5, 5, 5], True, Flexible),
        ("first", [1, 1, 1], [0, 0, 0], False, First),
        ("flexible", [2, 5, 1], [1, 4, 0], False, Flexible),
        ("mean", [6, 6, 6], None, True, MaskedMean),
        ("masked_mean", [2, 5, 1], None, False, MaskedMean),
    ],
)
def test_what_each_pooling_reads_decides_the_rest(name, span, positions, reads_padding, unpadded) -> None:
    pooling = get_pooling(name)
    assert pooling.span(6, LENGTHS).tolist() == span
    got = pooling.positions(6, LENGTHS)
    assert (got if got is None else got.tolist()) == positions
    assert pooling.reads_padding() is reads_padding
    assert type(pooling.unpadded()) is unpadded  # padding=none: last -> flexible, mean -> masked_mean


def test_the_classifier_takes_a_name_or_an_instance_and_refuses_a_typo() -> None:
    gpt = tiny()
    assert type(GPTClassifier(gpt, token="last").pooling) is Last
    mean = Mean()
    assert GPTClassifier(gpt, token=mean).pooling is mean
    ids = torch.randint(0, 50000, (3, 6))
    flexible = GPTClassifier(gpt, token="flexible")
    assert flexible.padding_free and flexible.needed_length(6, LENGTHS) == 5
    assert not GPTClassifier(gpt, token="last").padding_free
    assert GPTClassifier(gpt, token="first").needed_length(6, LENGTHS) == 1
    assert flexible(ids, LENGTHS).shape == (3, 2)
    with pytest.raises(ValueError, match="unknown token='lastt'; allowed: last, first, flexible, mean, masked_mean"):
        GPTClassifier(gpt, token="lastt")
    with pytest.raises(ValueError, match="token.name='first' does not match its _target_ Last"):
        get_pooling({"_target_": "spam_lightning.model.pooling.Last", "name": "first"})


# ------------------------------------------------------- a pooling added from outside the package
MAX_POOLING = '''
import torch

from spam_lightning.model.pooling import REAL, Pooling


class Max(Pooling):
    """The largest value of each feature over the real tokens."""

    name, reads = "max", REAL

    def __call__(self, x, lengths):
        real = torch.arange(x.shape[1], device=x.device)[None, :, None] < lengths.to(x.device)[:, None, None]
        return x.masked_fill(~real, float("-inf")).amax(dim=1)
'''


@pytest.fixture
def max_pooling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The two files a new pooling needs: its class (any importable module) and
    ``token/max.yaml`` (here in a config folder of its own, on Hydra's search path)."""
    (tmp_path / "toy_pooling.py").write_text(MAX_POOLING)
    (tmp_path / "conf" / "token").mkdir(parents=True)
    (tmp_path / "conf" / "token" / "max.yaml").write_text(
        textwrap.dedent("""\
            # The largest value of each feature over the real tokens.
            _target_: toy_pooling.Max
            name: max
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "token=max"]
    POOLINGS.pop("max", None)  # the registry is the process's: leave it as it was
    sys.modules.pop("toy_pooling", None)


def test_a_new_pooling_is_a_class_and_a_yaml(max_pooling, tmp_path: Path) -> None:
    """Trained with and without the frozen-trunk cache (the same run), then classified with
    per-batch padding: each derived from what ``Max`` declares (it reads the real tokens)."""
    source = tmp_path / "easy.tsv"
    write_easy_tsv(source)
    runs = []
    for cache in ("true", "false"):
        work = tmp_path / f"cache_{cache}"
        overrides = [*BASE, f"data.source={source}", "data.padding=longest", *max_pooling]
        cfg = compose_train([*overrides, f"cache.trunk={cache}"], work)
        metrics = train(cfg)
        runs.append((json.loads((work / "run" / "history.json").read_text()), metrics))
        assert metrics["token"] == "max" and metrics["trunk_cache"] is (cache == "true")
    assert_same_run(*runs)
    clf = Classifier(tmp_path / "cache_true" / "run")
    assert type(clf.model.pooling).__name__ == "Max" and clf.predictor.dynamic  # per-batch padding
    texts = ["WIN CASH NOW", "see you at lunch tomorrow mum", "ok"]
    one_by_one = torch.cat([clf.predict_proba([t]) for t in texts])
    torch.testing.assert_close(clf.predict_proba(texts), one_by_one, atol=1e-5, rtol=0)
