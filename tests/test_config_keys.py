"""Unknown config keys (issue 29, item 6): Hydra's hint ``+KEY=VALUE`` adds a key whether or not
anything reads it; such a key is refused before any work, with the node's known keys and the
closest one (spam_lightning/config_keys.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _compose import CONF, compose_train

from spam_lightning.config_keys import unknown_key_problems
from spam_lightning.training.checks import ConfigError, validate_config

REPO = Path(__file__).resolve().parents[1]


def test_hydra_hint_keys_are_refused_in_one_message_before_any_work(tmp_path: Path) -> None:
    """The issue's two commands at once, as a user runs them: one `Error:`, exit 1, no traceback,
    nothing prepared or trained."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPAM_", "HYDRA_"))}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "model=gpt2-tiny",
         "+optimizer.learning_rate=1e-4", "+trainer.max_epoch=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "Error: Invalid configuration:\n  - " in proc.stderr
    # the optimizer group is a `_target_` node: its keys are torch.optim.AdamW's parameters
    assert ("  - optimizer.learning_rate: not an option of torch.optim.AdamW; known keys of "
            "optimizer: amsgrad, betas, " in proc.stderr)
    assert ("  - trainer.max_epoch: not an option of lightning.pytorch.Trainer (did you mean "
            "trainer.max_epochs?); known keys of trainer: accelerator, " in proc.stderr)
    assert not (tmp_path / "data").exists() and not list(tmp_path.rglob("metrics.json"))


def _problems(*overrides: str) -> list[str]:
    return unknown_key_problems(compose_train(["model=gpt2-tiny", *overrides]))


def test_a_targets_keys_are_its_constructors_parameters() -> None:
    """A ``_target_`` node takes what its target takes: the optimizer swapped for SGD (the
    design where ``optimizer`` has a ``_target_`` and ``_partial_``) takes ``momentum``, and
    still not ``learning_rate``."""
    sgd = ["++optimizer._target_=torch.optim.SGD", "++optimizer._partial_=true"]
    assert _problems(*sgd, "+optimizer.momentum=0.9") == []
    (problem,) = _problems(*sgd, "+optimizer.learning_rate=1e-4")
    assert problem.startswith("optimizer.learning_rate: not an option of torch.optim.SGD; "
                              "known keys of optimizer: dampening, "), problem
    assert "momentum" in problem and "lr" in problem and "params" in problem


def test_new_callbacks_are_accepted_and_their_keys_checked() -> None:
    new = "+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor"
    assert _problems(new, "+callbacks.lr.logging_interval=step") == []
    (problem,) = _problems(new, "+callbacks.lr.logging_intervl=step")
    assert problem.startswith(
        "callbacks.lr.logging_intervl: not an option of lightning.pytorch.callbacks."
        "LearningRateMonitor (did you mean callbacks.lr.logging_interval?); known keys of "
        "callbacks.lr: log_momentum, log_weight_decay, logging_interval"), problem


def test_plain_nodes_take_the_keys_the_shipped_configs_define(tmp_path: Path) -> None:
    """``++`` of a key the config has is an ordinary override; a new key of a node without a
    target (``cache``, ``loss``, the root) is refused, all of them in one message."""
    assert _problems("++cache.trunk=false", "++loss.ignore_index=3", "++seed=7") == []
    cfg = compose_train(["model=gpt2-tiny", "+cache.trunc=false", "+sed=7", "+data.foo=1"],
                        tmp_path)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    lines = str(err.value).splitlines()
    assert lines[0] == "Invalid configuration:"
    assert sorted(lines[1:]) == [
        "  - cache.trunc: not a key of cache (did you mean cache.trunk?); known keys of cache: "
        "dir, max_gb, memory_budget_gb, shared, trunk",
        "  - data.foo: not an option of spam_lightning.data.SpamDataModule; known keys of data: "
        "balance, batch_size, bucketing, context_length, data_dir, max_length, num_workers, on_bad_rows, "
        "pad_token_id, padding, seed, source, split, split_seed, train_frac, urls, val_frac",
        "  - sed: not a top-level key (did you mean seed?); known keys of the config: cache, "
        "calibration, callbacks, ckpt_path, data, eval_freq, eval_iter, final_weights, logger, loss, "
        "model, optimized_metric, optimizer, paths, reference, scheduler, seed, task_name, threshold, "
        "token, trainable, trainer",
    ]


def test_a_sweeps_gpt2_sizes_across_families_stay_the_familys_warning() -> None:
    """`++model.n_layers=2` on a baseline (a sweep across families, README's compare rows): the
    family names it in a warning; `+model.n_layer` (a typo) is refused."""
    assert _problems("model=majority", "++model.n_layers=2") == []
    (problem,) = _problems("+model.n_layer=1")
    assert "model.n_layer: not an option of spam_lightning.model.gpt2.GPT2Family (did you mean " \
        "model.n_layers?)" in problem


@pytest.mark.slow  # composes every config of every group (~10 s)
def test_every_shipped_config_passes() -> None:
    count = 0
    for group in ("experiment", "model", "data", "trainer", "logger", "debug", "callbacks",
                  "token", "trainable", "hparams_search"):
        for path in sorted((CONF / group).rglob("*.yaml")):
            if path.stem == "default":
                continue
            name = str(path.relative_to(CONF / group).with_suffix(""))
            assert unknown_key_problems(compose_train([f"{group}={name}"])) == [], name
            count += 1
    assert count > 60
