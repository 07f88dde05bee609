"""Issue 15, item 5: the frozen-trunk cache shared across runs (``cache.shared=true``).

- runs that share the cache (the one that computes it and later ones that load it) give the
  metrics, loss curves and bundle of an unshared run, bit for bit;
- another seed, learning rate or pooling option with the same trunk loads it (hit); another
  max_length, precision, frozen weights or block range is another key (miss);
- two processes that need the same key at once compute it once (the second waits, then loads);
- least-recently-used files go past the size cap, never one the current run uses;
- a truncated or corrupt file is noticed (safetensors header, sizes, key) and recomputed;
- so is one whose tensor bytes changed with its header intact (the sha256 of its tensors, issue 24
  item 3), and a full disk or a killed writer leaves nothing that is not swept (items 6, 7).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _compose import compose_train
from _weights import hf_weights
from safetensors.torch import load_file

from spam_lightning.data.datamodule import TokenDataset
from spam_lightning.model.classifier import GPTClassifier, make_classifier
from spam_lightning.model.gpt import MODEL_CONFIGS, GPTModel
from spam_lightning.model.trunk_cache import SharedTrunkStore, TrunkCache

REPO = Path(__file__).resolve().parents[2]
LOGGER = "spam_lightning.model.trunk_cache"
SPLITS = ("train", "val", "test")
# short messages: 8.5 MB of gpt2-tiny states for the chapter's train split instead of 32 MB
RUN = [
    "model=gpt2-tiny", "debug=limit", "logger=none", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "data.max_length=32", "cache.trunk=true",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: two threads on a busy 2-core machine are slower
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt2-tiny weights in the Hub's layout, so the trunk does not depend on ``seed``
    (random weights are drawn from it) and other seeds can share it."""
    return hf_weights(tmp_path_factory.mktemp("tiny-weights") / "model.safetensors", seed=0)


def cache_messages(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(hit|miss, split) per split of the runs since the last ``caplog.clear()``."""
    found = []
    for record in caplog.records:
        text = record.getMessage()
        for kind, marker in (("hit", "Frozen-trunk cache hit: "), ("miss", "Frozen-trunk cache miss: computing ")):
            if text.startswith(marker):
                found.append((kind, text[len(marker):].split(" ")[0]))
    return found


def outcome(run: dict) -> dict:
    """What a run produced that must not depend on the cache: metrics (but the time), loss and
    accuracy curves, and the bundle's tensors."""
    metrics = {k: v for k, v in run["metrics"].items() if k != "training_seconds"}
    return {"metrics": metrics, "history": run["history"], "bundle": run["bundle"]}


def assert_identical(a: dict, b: dict) -> None:
    assert outcome(a)["metrics"] == outcome(b)["metrics"]
    assert a["history"] == b["history"]
    assert a["bundle"].keys() == b["bundle"].keys()
    for key, tensor in a["bundle"].items():
        assert torch.equal(tensor, b["bundle"][key]), key


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_shared_runs_equal_an_unshared_run_and_other_seeds_hit(
    tmp_path: Path, sms_file: Path, tiny_data_dir: Path, tiny_checkpoint: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from spam_lightning.train import train

    caplog.set_level(logging.INFO, logger=LOGGER)
    cache_dir = tmp_path / "trunk_cache"
    runs = iter(range(100))

    def run(*overrides: str) -> dict:
        work = tmp_path / f"w{next(runs)}"
        cfg = compose_train(
            [*RUN, f"data.source={sms_file}", f"paths.data_dir={tiny_data_dir}",
             "model.weights=pretrained", f"model.checkpoint={tiny_checkpoint}",
             f"cache.dir={cache_dir}", *overrides],
            work,
        )
        caplog.clear()
        metrics = train(cfg)
        out = work / "run"
        return {
            "metrics": metrics, "history": json.loads((out / "history.json").read_text()),
            "bundle": load_file(str(out / "bundle" / "model.safetensors")), "log": cache_messages(caplog),
            "text": caplog.text,
        }

    unshared = run("cache.shared=false")
    assert unshared["log"] == [] and not cache_dir.exists()

    first = run("cache.shared=true")  # computes every split and saves it
    assert first["log"] == [("miss", s) for s in SPLITS]
    assert first["text"].count(f"saved to {cache_dir}") == 3
    files = sorted(cache_dir.glob("*.safetensors"))
    assert len(files) == 3

    again = run("cache.shared=true")  # loads every split
    assert again["log"] == [("hit", s) for s in SPLITS]
    assert f"from {cache_dir}" in again["text"] and "MiB)" in again["text"]
    assert_identical(unshared, first)
    assert_identical(unshared, again)

    # another seed, learning rate and pooling (mean stores what last stores): the same trunk
    other = run("cache.shared=true", "seed=7", "optimizer.lr=1e-3", "token=mean")
    assert other["log"] == [("hit", s) for s in SPLITS]
    assert other["metrics"]["seed"] == 7 and other["metrics"]["trunk_cache"] is True
    assert sorted(cache_dir.glob("*.safetensors")) == files  # nothing new written

    # another max_length, precision, frozen weights...: another key (test below)


# ------------------------------------------------------------------- the key and the store
def tiny_model(seed: int = 0, token: str = "last", causal: bool = True) -> GPTClassifier:
    torch.manual_seed(seed)
    gpt = GPTModel({**MODEL_CONFIGS["gpt2-tiny"], "causal_mask": causal})
    return GPTClassifier(make_classifier(gpt, 2, "last_block", seed=seed), token=token)


def toy_data(n: int = 6, seed: int = 0, length: int | None = None) -> SimpleNamespace:
    """A split of ``n`` random messages (of ``length`` tokens, else 1-11)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [length] * n if length else torch.randint(1, 12, (n,), generator=g).tolist()
    return SimpleNamespace(token_ids=[torch.randint(0, 50000, (k,), generator=g).tolist() for k in lengths])


def key_of(model, data, *, start: int = 1, token: str = "last", max_length: int = 12, pad: int = 50256,
           precision: str = "32-true", dtype: torch.dtype = torch.float32) -> str:
    cache = TrunkCache(start, token=token, causal=model.causal_mask, dtype=dtype)
    return cache.split_key(cache.config_digest(model, torch.device("cpu"), precision), data, max_length, pad)


def test_the_key_covers_what_the_trunk_reads_and_nothing_else() -> None:
    model, data = tiny_model(), toy_data()
    base = key_of(model, data)
    assert base == key_of(model, data)
    # the head, the trainable block and the seed of the head are not in the key
    other = tiny_model()
    with torch.no_grad():
        other.out_head.weight.add_(1.0)
        next(other.trf_blocks[1].parameters()).add_(1.0)
    assert key_of(other, data) == base
    assert key_of(model, data, token="mean") == base  # both store every position
    # everything that changes the stored states is
    with torch.no_grad():
        next(other.trf_blocks[0].parameters()).view(-1)[0] += 1e-6
    differs = {
        "frozen weights": key_of(other, data),
        "random weights of another seed": key_of(tiny_model(seed=1), data),
        "block range": key_of(model, data, start=2),
        "stored positions": key_of(model, data, token="flexible"),
        "causal mask": key_of(tiny_model(causal=False), data),
        "max_length": key_of(model, data, max_length=11),
        "pad id": key_of(model, data, pad=0),
        "precision": key_of(model, data, precision="bf16-mixed"),
        "dtype": key_of(model, data, dtype=torch.bfloat16),
        "data": key_of(model, toy_data(seed=1)),
    }
    assert all(key != base for key in differs.values()), [k for k, v in differs.items() if v == base]
    assert len(set(differs.values())) == len(differs)


def fetch(store: SharedTrunkStore, key: str, model, data, split: str = "train", max_length: int = 12):
    """(outcome, cache, number of computations) of one ``store.fetch``."""
    cache = TrunkCache(1, token="flexible")
    calls = []

    def compute():
        calls.append(1)
        cache.build(split, model, data, max_length, 50256, torch.device("cpu"))

    def load(path):
        cache.load(split, path, key, data, model, max_length)

    return store.fetch(cache, split, key, compute, load), cache, len(calls)


def test_hit_equals_the_computation_and_comes_from_the_mapped_file(tmp_path: Path) -> None:
    model, data = tiny_model(), toy_data(n=20)
    key = key_of(model, data, token="flexible")
    store = SharedTrunkStore(tmp_path, 2**30)
    first, computed, n = fetch(store, key, model, data)
    assert (first, n) == ("miss", 1)
    second, loaded, n = fetch(SharedTrunkStore(tmp_path, 2**30), key, model, data)
    assert (second, n) == ("hit", 0)
    data = TokenDataset(data.token_ids, [0] * 20, [""] * 20)
    batches = [
        (f := cache.features("train", data, 12)).collate([f[i] for i in (3, 0, 19, 7)])
        for cache in (loaded, computed)
    ]
    assert torch.equal(batches[0]["features"], batches[1]["features"])
    assert torch.equal(loaded._states["train"], computed._states["train"])


def test_lru_eviction_keeps_the_cap_and_the_files_in_use(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = tiny_model()
    datasets = [toy_data(n=10, seed=s, length=10) for s in range(4)]  # files of one size
    keys = [key_of(model, d, token="flexible") for d in datasets]
    paths = [SharedTrunkStore(tmp_path, 0).path(k) for k in keys]

    def use(cap: float, i: int, store: SharedTrunkStore | None = None) -> str:
        return fetch(store or SharedTrunkStore(tmp_path, cap), keys[i], model, datasets[i])[0]

    assert use(2**30, 0) == use(2**30, 1) == "miss"
    size = paths[0].stat().st_size
    assert paths[1].stat().st_size == size
    os.utime(paths[0], (1_000, 1_000))  # key 0 used long ago, key 1 later...
    os.utime(paths[1], (2_000, 2_000))
    assert use(2 * size + 100, 0) == "hit"  # ...and key 0 again now
    assert paths[0].stat().st_mtime > 2_000
    # a third file over a cap of two: the least recently used one (key 1) goes
    assert use(2 * size + 100, 2) == "miss"
    assert [p.exists() for p in paths] == [True, False, True, False]
    assert f"evicted {paths[1].name}" in caplog.text
    # a cap of one file: what this run uses stays (even over the cap), older files go
    store = SharedTrunkStore(tmp_path, size + 100)
    os.utime(paths[0], (1_000, 1_000))
    assert use(0, 2, store) == "hit" and use(0, 3, store) == "miss"
    assert [p.exists() for p in paths] == [False, False, True, True]
    assert store.in_use == {paths[2], paths[3]}
    # a file larger than the whole cap is computed and used, not saved
    assert use(size / 2, 1) == "miss" and not paths[1].exists()
    assert "not saved" in caplog.text


def zero_inside(path: Path) -> None:
    """Zero the middle third of a safetensors file's tensor bytes; the header stays intact."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    third = (len(data) - start) // 3
    data[start + third : start + 2 * third] = bytes(third)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other key", "zeroed inside"])
def test_a_damaged_file_is_recomputed_with_a_warning(tmp_path: Path, caplog, damage: str) -> None:
    model, data = tiny_model(), toy_data(n=8)
    key = key_of(model, data, token="flexible")
    _, reference, _ = fetch(SharedTrunkStore(tmp_path, 2**30), key, model, data)
    path = SharedTrunkStore(tmp_path, 0).path(key)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-64])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 16 + os.urandom(256))
    elif damage == "zeroed inside":  # issue 24 item 3: header, sizes and key all intact
        zero_inside(path)
    else:  # a complete file of another split under this key's name
        other = toy_data(n=9, seed=3)
        other_key = key_of(model, other, token="flexible")
        fetch(SharedTrunkStore(tmp_path, 2**30), other_key, model, other)
        os.replace(SharedTrunkStore(tmp_path, 0).path(other_key), path)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    result, cache, n = fetch(SharedTrunkStore(tmp_path, 2**30), key, model, data)
    assert (result, n) == ("miss", 1)
    assert "removing it and recomputing train" in caplog.text
    assert torch.equal(cache._states["train"], reference._states["train"])
    assert fetch(SharedTrunkStore(tmp_path, 2**30), key, model, data)[0] == "hit"  # repaired


CONCURRENT = textwrap.dedent(
    """
    import logging, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from spam_lightning.model.gpt import MODEL_CONFIGS, GPTModel
    from spam_lightning.model.trunk_cache import SharedTrunkStore, TrunkCache
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    folder = Path(sys.argv[1])
    torch.manual_seed(0)
    model = GPTModel(dict(MODEL_CONFIGS["gpt2-tiny"]))
    g = torch.Generator().manual_seed(0)
    data = type("Split", (), {"token_ids": [torch.randint(0, 50000, (k,), generator=g).tolist()
                                           for k in range(1, 31)]})
    cache, calls = TrunkCache(1, token="flexible"), []
    key = cache.split_key(cache.config_digest(model, torch.device("cpu"), "32-true"), data, 12, 50256)
    (folder / "ready-child").touch()
    while not (folder / "ready-parent").exists():  # start together
        time.sleep(0.005)
    def compute():
        calls.append(1)
        time.sleep(1.0)  # a long computation: the other process arrives while it runs
        cache.build("train", model, data, 12, 50256, torch.device("cpu"))
    def load(path):
        cache.load("train", path, key, data, model, 12)
    result = SharedTrunkStore(folder / "cache", 2**30).fetch(cache, "train", key, compute, load)
    print("RESULT", result, len(calls), float(cache._states["train"].double().sum()))
    """
)


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_two_processes_compute_a_key_once(tmp_path: Path, caplog) -> None:
    """This process and a child need the same key at the same moment: one computes it (slowly),
    the other waits on the lock and loads the file."""
    import time

    caplog.set_level(logging.INFO, logger=LOGGER)
    script = tmp_path / "job.py"
    script.write_text(CONCURRENT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    torch.manual_seed(0)
    model = GPTModel(dict(MODEL_CONFIGS["gpt2-tiny"]))
    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(token_ids=[torch.randint(0, 50000, (k,), generator=g).tolist() for k in range(1, 31)])
    cache, calls = TrunkCache(1, token="flexible"), []
    key = cache.split_key(cache.config_digest(model, torch.device("cpu"), "32-true"), data, 12, 50256)

    def compute():
        calls.append(1)
        time.sleep(1.0)
        cache.build("train", model, data, 12, 50256, torch.device("cpu"))

    def load(path):
        cache.load("train", path, key, data, model, 12)

    deadline = time.monotonic() + 120
    while not (tmp_path / "ready-child").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    (tmp_path / "ready-parent").touch()
    mine = SharedTrunkStore(tmp_path / "cache", 2**30).fetch(cache, "train", key, compute, load)
    output = child.communicate(timeout=120)[0]
    assert child.returncode == 0, output
    (line,) = [x for x in output.splitlines() if x.startswith("RESULT")]
    theirs, their_calls, their_sum = line.split()[1:]
    assert sorted([(mine, len(calls)), (theirs, int(their_calls))]) == [("hit", 0), ("miss", 1)], output
    assert float(their_sum) == float(cache._states["train"].double().sum())  # the same states
    waited = "waiting for another job computing train"
    assert waited in (output if theirs == "hit" else caplog.text), output
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_default_dir_is_under_outputs(tmp_path: Path) -> None:
    cfg = compose_train([], tmp_path)
    assert Path(cfg.cache.dir) == tmp_path / "outputs" / "trunk_cache"
    assert cfg.cache.shared is True and cfg.cache.max_gb > 0


@pytest.mark.slow  # two tiny training runs: about 20 s
def test_a_run_recomputes_a_cache_file_damaged_inside(
    tmp_path: Path, sms_file: Path, tiny_data_dir: Path, tiny_checkpoint: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 24 item 3, through train(): 1/3 of the cached train split's bytes zeroed, header
    intact, was used silently. Now the second run warns, recomputes it, and ends as the first."""
    from spam_lightning.train import train

    caplog.set_level(logging.INFO, logger=LOGGER)
    cache_dir = tmp_path / "trunk_cache"

    def run(name: str) -> dict:
        cfg = compose_train(
            [*RUN, f"data.source={sms_file}", f"paths.data_dir={tiny_data_dir}",
             "model.weights=pretrained", f"model.checkpoint={tiny_checkpoint}", f"cache.dir={cache_dir}"],
            tmp_path / name,
        )
        caplog.clear()
        metrics = train(cfg)
        out = tmp_path / name / "run"
        return {"metrics": metrics, "history": json.loads((out / "history.json").read_text()),
                "bundle": load_file(str(out / "bundle" / "model.safetensors")), "log": cache_messages(caplog),
                "text": caplog.text}

    first = run("first")
    assert first["log"] == [("miss", s) for s in SPLITS]
    (train_file,) = [p for p in cache_dir.glob("*.safetensors") if f"saved to {p}" in
                     next(r.getMessage() for r in caplog.records if "computed train" in r.getMessage())]
    zero_inside(train_file)
    again = run("again")
    assert again["log"] == [("miss", "train"), ("hit", "val"), ("hit", "test")]
    assert f"{train_file}: damaged (its tensors' sha256 differs" in again["text"]
    assert "removing it and recomputing train" in again["text"]
    assert_identical(first, again)


def test_tensor_digest_covers_every_byte_and_the_names(tmp_path: Path) -> None:
    """The sha256 read check covers every byte: 1 byte changed anywhere is another digest."""
    from spam_lightning.model.trunk_cache import tensor_digest

    states = torch.randn(3000, 64)
    base = tensor_digest({"states": states})
    changed = states.clone()
    changed.view(-1)[-1] = 0.0
    assert tensor_digest({"states": changed}) != base
    assert tensor_digest({"states": states.clone()}) == base
    assert tensor_digest({"other": states}) != base  # the names count too


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from spam_lightning.model.trunk_cache import SharedTrunkStore, TrunkCache
    cache = TrunkCache(1)
    def compute():  # a large split: the write takes a while
        cache._states["train"] = torch.ones(2**26 // 64, 64)
        cache._stored["train"] = torch.ones(2**26 // 64, dtype=torch.long)
    print("writing", flush=True)
    SharedTrunkStore(Path(sys.argv[1]), 2**40).fetch(cache, "train", "k" * 64, compute, None)
    """
)


@pytest.mark.slow  # a child process killed mid-write: about 15 s
def test_kill_during_a_cache_write_leaves_only_what_the_sweep_removes(tmp_path: Path, caplog) -> None:
    """Issue 24 item 7: kill -9 while a split is written. safetensors' own writer left a
    ``.tmpXXXXXX`` (as large as the split) that no sweep removed; the write goes through the
    project's atomic_write, whose temporary the next run's sweep removes."""
    import signal
    import time

    folder = tmp_path / "cache"
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, str(script), str(folder)], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    try:  # killed as soon as a temporary holds a MiB of the split
        while time.monotonic() < deadline and child.poll() is None:
            if any(p.name.startswith(".") and p.stat().st_size > 2**20 for p in folder.glob(".*")):
                break
            time.sleep(0.002)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    left = sorted(p.name for p in folder.glob(".*") if not p.name.endswith(".lock"))
    assert left and all(n.startswith(f".{'k' * 64}.safetensors.") and n.endswith(".tmp") for n in left), left
    old = time.time() - 3600
    for name in left:
        os.utime(folder / name, (old, old))
    caplog.set_level(logging.INFO, logger=LOGGER)
    model, data = tiny_model(), toy_data(n=4)
    assert fetch(SharedTrunkStore(folder, 2**30), key_of(model, data, token="flexible"), model, data)[0] == "miss"
    assert not [p for p in folder.glob(".*") if not p.name.endswith(".lock")]
    assert "left by an interrupted write" in caplog.text


def test_temporaries_count_against_the_cap_and_strays_go(tmp_path: Path) -> None:
    """Issue 24 item 7: what is being written counts against cache.max_gb, and an old
    ``.tmpXXXXXX`` (what safetensors' own writer left when killed) is removed."""
    model = tiny_model()
    datasets = [toy_data(n=10, seed=s, length=10) for s in range(2)]
    keys = [key_of(model, d, token="flexible") for d in datasets]
    paths = [SharedTrunkStore(tmp_path, 0).path(k) for k in keys]
    assert fetch(SharedTrunkStore(tmp_path, 2**30), keys[0], model, datasets[0])[0] == "miss"
    size = paths[0].stat().st_size
    os.utime(paths[0], (1_000, 1_000))
    writing = tmp_path / f".{'f' * 64}.safetensors.a1b2c3.tmp"  # another job's write in progress
    writing.write_bytes(b"\0" * size)
    stray = tmp_path / ".tmpAb12Cd"
    stray.write_bytes(b"\0" * size)
    os.utime(stray, (1_000, 1_000))
    # two files fit the cap; with the write in progress they do not: the older one goes
    assert fetch(SharedTrunkStore(tmp_path, 2 * size + 100), keys[1], model, datasets[1])[0] == "miss"
    assert not stray.exists() and writing.exists()
    assert [p.exists() for p in paths] == [False, True]
