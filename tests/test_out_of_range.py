"""Every option with an out-of-range value is one line of the "Invalid configuration" message
before any work, never a numpy / torch / Lightning traceback mid-run (issue 24, item 8): found
by trying each option of conf/*.yaml with values past its range on `model=gpt2-tiny`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _compose import compose_train

from spam_lightning.data import DataError
from spam_lightning.train import train
from spam_lightning.training.checks import ConfigError

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["model=gpt2-tiny", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "eval_iter=1",
         "trainer.enable_progress_bar=false", "logger=none"]

# override -> its line in the message; each used to pass the check and fail (or go wrong) later
OUT_OF_RANGE = {
    # numpy's seed range (Lightning's seed_everything, pandas' random_state): a ValueError mid-run
    "seed=1099511627776": "seed=1099511627776: must be an integer in [0, 4294967295] (numpy's "
                          "seed range)",
    "data.split_seed=4294967296": "data.split_seed=4294967296: must be an integer in "
                                  "[0, 4294967295]",
    "data=imdb data.shuffle_seed=-1": "data.shuffle_seed=-1: must be an integer in [0, 4294967295]",
    # an embedding row that does not exist: IndexError in the first batch
    "data.pad_token_id=50257": "data.pad_token_id=50257: must be < model.vocab_size=50257",
    "model.vocab_size=100": "model.vocab_size=100: must be >= 50257 (the GPT-2 tokenizer's token "
                            "ids go up to 50256)",
    # weights larger than any memory: an allocator error after the data is prepared
    "model.context_length=10000000000": "model sizes (vocab_size=50257, "
                                        "context_length=10000000000, emb_dim=64, n_layers=2) give",
    # LoRA on the 50257-row head with a rank past emb_dim: 20 GB of adapters, then the OOM killer
    "trainable=lora trainable.rank=100000": "trainable.rank=100000: must be <= model.emb_dim=64",
    # torch's cross_entropy: a TypeError in the first step
    "loss.ignore_index=x": "loss.ignore_index='x': must be an integer",
    # switches: a string was taken as true (model.compile=maybe compiled for a minute)
    "model.compile=maybe": "model.compile='maybe': must be true or false",
    "model.causal_mask=maybe": "model.causal_mask='maybe': must be true or false",
    "model.qkv_bias=maybe": "model.qkv_bias='maybe': must be true or false",
    "cache.shared=maybe": "cache.shared='maybe': must be true or false",
    "data.padding=batch data.bucketing=maybe": "data.bucketing='maybe': must be true or false",
    # Lightning: ZeroDivisionError in the loop, or accepted silently
    "trainer.val_check_interval=0": "trainer.val_check_interval=0: must be an integer >= 1 "
                                    "(batches), a fraction in (0, 1] of an epoch, or null",
    "trainer.gradient_clip_val=-1": "trainer.gradient_clip_val=-1: must be a finite number >= 0",
    "trainer.num_sanity_val_steps=-5": "trainer.num_sanity_val_steps=-5: must be an integer >= 0, "
                                       "or -1 (all)",
    "trainer.min_epochs=-3": "trainer.min_epochs=-3: must be an integer >= 0, or null",
    # one process per device on a CPU: devices=1000 forked until the OOM killer came
    "trainer.accelerator=cpu trainer.devices=1000": "trainer.devices=1000: more CPU processes than "
                                                    "this machine's",
    # what train.py returns to Optuna: None, silently
    "optimized_metric=nope": "optimized_metric='nope' is unknown; allowed: train_accuracy,",
}


@pytest.mark.parametrize("override", list(OUT_OF_RANGE))
def test_out_of_range_option_is_one_line_before_any_work(tmp_path: Path, override: str) -> None:
    cfg = compose_train([*SMOKE, *override.split()], tmp_path)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    lines = str(err.value).splitlines()
    assert lines[0] == "Invalid configuration:"
    assert any(line.startswith(f"  - {OUT_OF_RANGE[override]}") for line in lines[1:]), lines
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_legal_edges_still_pass_the_check(tmp_path: Path) -> None:
    from spam_lightning.training.checks import validate_config

    for overrides in (["seed=4294967295", "data.split_seed=0", "trainer.val_check_interval=0.5",
                       "trainer.gradient_clip_val=0", "trainer.num_sanity_val_steps=-1",
                       "optimized_metric=test_f1", "loss.ignore_index=50256"],
                      ["trainable=lora", "trainable.rank=64", "model.compile=false"]):
        validate_config(compose_train([*SMOKE, *overrides], tmp_path))


def test_data_dir_that_is_a_file_is_named(tmp_path: Path, sms_file: Path) -> None:
    """paths.data_dir (or data.data_dir) naming a file: NotADirectoryError's traceback before."""
    (a_file := tmp_path / "a-file").write_text("x")
    cfg = compose_train([*SMOKE, f"paths.data_dir={a_file}", f"data.source={sms_file}"], tmp_path)
    with pytest.raises(DataError, match=f"data.data_dir={a_file}/sms_spam: cannot write there"):
        train(cfg)


def long_text_csvs(folder: Path) -> list[str]:
    long = " ".join(["word"] * 1500)  # 1,500 tokens: more than gpt2-tiny's 1,024
    files = []
    for split in ("train", "validation", "test"):
        body = "".join(f"message {i},{'ab'[i % 2]}\n" for i in range(8))
        if split == "train":
            body = body.replace("message 3,", f"{long},")  # data line 5
        (folder / f"{split}.csv").write_text("text,label\n" + body)
        files.append(f"data.{split}={split}.csv")
    return ["data=csv", *files]


def test_text_longer_than_the_context_names_file_line_and_fix(tmp_path: Path) -> None:
    """data.max_length=null pads to the longest training text: one longer than the context was
    a ValueError traceback after tokenizing."""
    overrides = [*SMOKE, *long_text_csvs(tmp_path), "data.batch_size=2"]
    cfg = compose_train([o.replace("=", f"={tmp_path}/") if o.startswith("data.") and o.endswith(
        ".csv") else o for o in overrides], tmp_path)
    with pytest.raises(DataError) as err:
        train(cfg)
    assert str(err.value) == (
        f"{tmp_path / 'train.csv'}, line 5: a training text of 1500 tokens (1 of 8 are longer "
        "than the model's context length 1024); data.max_length=null pads to the longest "
        "training text. Set data.max_length=model (truncate to 1024 tokens) or an integer <= "
        "1024, or shorten the texts")


@pytest.mark.slow  # two `python train.py` processes (seconds of imports each), run together
def test_cli_prints_the_error_logs_it_and_shows_no_traceback(tmp_path: Path) -> None:
    runs = {"seed": (tmp_path / "seed", ["model=gpt2-tiny", "seed=1099511627776"]),
            "long": (tmp_path / "long", ["model=gpt2-tiny", "trainer.max_epochs=1"])}
    for folder, _ in runs.values():
        folder.mkdir()
    runs["long"][1].extend(long_text_csvs(runs["long"][0]))
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=folder,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (folder, args) in runs.items()}
    expected = {"seed": "Error: Invalid configuration:\n  - seed=1099511627776: must be an "
                        "integer in [0, 4294967295] (numpy's seed range)",
                "long": "Error: " + str(runs["long"][0] / "train.csv") + ", line 5: a training "
                        "text of 1500 tokens"}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-3000:]
        assert "Traceback" not in out + err and expected[name] in err, err[-3000:]
        (log,) = (runs[name][0] / "outputs").rglob("train.log")
        assert expected[name].removeprefix("Error: ") in log.read_text()
