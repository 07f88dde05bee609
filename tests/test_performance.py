"""Issue 6: the speed-ups change nothing but speed.

- last-block pruning (``TransformerBlock.forward_at``) equals the full forward, logits and
  gradients, for every token option, with and without the causal mask, with LoRA;
- the frozen-trunk cache equals the uncached computation, at the module level and over whole
  training runs (loss curves and final metrics), with worker processes too;
- ``flexible`` and ``masked_mean`` do not depend on the padding mode;
- a bf16-mixed run learns; a compiled block equals the eager one;
- ``scripts/benchmark.py --quick`` runs end to end on the tiny model.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _book import add_classification_head
from _compose import compose_train
from llms_from_scratch.ch04 import GPTModel as BookGPTModel
from llms_from_scratch.ch06 import SpamDataset, train_classifier_simple
from test_learning import write_easy_tsv

from spam_lightning.data.datamodule import TokenDataset
from spam_lightning.data.tokens import get_tokenizer
from spam_lightning.model.classifier import GPTClassifier, make_classifier
from spam_lightning.model.gpt import MODEL_CONFIGS, GPTModel, TransformerBlock
from spam_lightning.model.gpt2 import build_model
from spam_lightning.model.pooling import POOLINGS, get_pooling
from spam_lightning.model.trunk_cache import TrunkCache
from spam_lightning.train import train

REPO = Path(__file__).resolve().parents[1]
TOKENS = tuple(POOLINGS)  # the package's own (imported before any test adds one)
PAD = 50256


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's matmuls are far too small to split across threads; on a busy 2-core
    machine two OpenMP threads make a run 5-10x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(causal: bool = True, trainable: str = "last_block", seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel({**MODEL_CONFIGS["gpt2-tiny"], "causal_mask": causal})
    return make_classifier(model, 2, trainable, rank=4, alpha=2.0, seed=seed)


def padded_batch(
    seed: int = 1, batch: int = 6, width: int = 13
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids right-padded with 50256; lengths include 1 and the full width."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    lengths[0], lengths[1] = 1, width
    ids = torch.randint(0, 50000, (batch, width), generator=g)
    ids[torch.arange(width)[None, :] >= lengths[:, None]] = PAD
    return ids, lengths


def full_logits(
    model: GPTModel, ids: torch.Tensor, lengths: torch.Tensor, token: str
) -> torch.Tensor:
    """The unpruned, uncut reference: every block on every position, then pool."""
    hidden = model.final_norm(model.run_blocks(model.embed(ids)))
    return model.out_head(get_pooling(token)(hidden, lengths))


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("causal", [True, False])
def test_block_forward_at_equals_forward(causal: bool) -> None:
    torch.manual_seed(0)
    block = TransformerBlock({**MODEL_CONFIGS["gpt2-tiny"], "causal_mask": causal}).eval()
    x = torch.randn(5, 11, 64)
    positions = torch.tensor([0, 10, 4, 7, 10])
    full = block(x)
    out = block.forward_at(x, positions)
    assert out.shape == (5, 64)
    torch.testing.assert_close(out, full[torch.arange(5), positions], atol=1e-5, rtol=0)
    # every query at the last position: the unmasked fast path
    last = torch.full((5,), 10)
    torch.testing.assert_close(block.forward_at(x, last), full[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("token", TOKENS)
def test_pruned_forward_equals_full_forward(token: str, causal: bool) -> None:
    model = tiny(causal)
    module = GPTClassifier(model, token=token)
    ids, lengths = padded_batch()
    out = module(ids, lengths)
    out.square().sum().backward()
    pruned_grads = grads(model)
    model.zero_grad(set_to_none=True)
    ref = full_logits(model, ids, lengths, token)
    ref.square().sum().backward()
    full_grads = grads(model)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert pruned_grads.keys() == full_grads.keys() and pruned_grads
    for name, g in full_grads.items():
        torch.testing.assert_close(pruned_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("trainable", ["lora", "all", "last_two_blocks"])
def test_pruned_forward_with_other_trainables(trainable: str) -> None:
    model = tiny(True, trainable)
    for m in model.modules():  # LoRA's B starts at 0: move it so the adapters matter
        if hasattr(m, "B"):
            torch.nn.init.normal_(m.B, std=0.02)
    module = GPTClassifier(model, token="flexible")
    ids, lengths = padded_batch(seed=2)
    out = module(ids, lengths)
    out.sum().backward()
    pruned_grads = grads(model)
    model.zero_grad(set_to_none=True)
    ref = full_logits(model, ids, lengths, "flexible")
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    scale = max(float(g.abs().max()) for g in grads(model).values())
    for name, g in grads(model).items():
        torch.testing.assert_close(pruned_grads[name], g, atol=1e-5 * scale, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- cache (module)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("token", TOKENS)
@pytest.mark.parametrize("start", [1, 2])  # last_block, last_layer (the cache covers every block)
def test_cache_lookup_equals_uncached(token: str, causal: bool, start: int) -> None:
    model = tiny(causal).eval()
    module = GPTClassifier(model, token=token)
    ids, lengths = padded_batch(seed=3, batch=9, width=12)
    token_ids = [row[:n].tolist() for row, n in zip(ids, lengths, strict=True)]
    data = TokenDataset(token_ids, [i % 2 for i in range(9)], ["text"] * 9)
    cache = TrunkCache(start, token=token, causal=causal, max_batch_tokens=30)  # several batches
    cache.build("train", model, data, 12, PAD, torch.device("cpu"))
    assert cache.nbytes == cache.estimate_bytes(data, model, 12)
    index = [4, 0, 8, 1]
    with torch.no_grad():
        for pad_to in (12, None) if causal else (12,):  # longest / batch
            width = pad_to or int(lengths[index].max())
            ref = module(ids[index, :width], lengths[index])
            features = cache.features("train", data, pad_to)
            batch = features.collate([features[i] for i in index])
            assert torch.equal(batch["lengths"], lengths[index]) and batch["index"].tolist() == index
            assert batch["start_block"] == start and batch["labels"].tolist() == [0, 0, 0, 1]
            cached = module(batch["features"], batch["lengths"], batch["start_block"])
            torch.testing.assert_close(cached, ref, atol=1e-5, rtol=0)


def test_features_are_zero_filled_to_the_token_batch_width() -> None:
    model = tiny().eval()
    data = TokenDataset([[5, 6, 7], [8], [1, 2, 3, 4, 5]], [0, 1, 0], ["a", "b", "c"])
    flexible, last = TrunkCache(1, token="flexible"), TrunkCache(1, token="last")
    for cache in (flexible, last):
        cache.build("val", model, data, 5, PAD, torch.device("cpu"))
    real = flexible.features("val", data, pad_to=None)
    assert real.texts == ["a", "b", "c"]  # what the test dashboard shows for misclassified rows
    out = real.collate([real[1], real[2]])["features"]  # the real tokens only, padded with zeros
    assert out.shape == (2, 5, 64) and out.dtype == torch.float32
    assert torch.all(out[0, 1:] == 0) and torch.all(out[1].abs().sum(-1) > 0)
    every = last.features("val", data, pad_to=None)  # every position stored, cut to the batch
    assert every.collate([every[0], every[1]])["features"].shape == (2, 3, 64)
    longest = last.features("val", data, pad_to=5)
    assert torch.all(longest.collate([longest[1]])["features"][0].abs().sum(-1) > 0)


@pytest.mark.gpu  # deselected by default (pyproject addopts); run on a GPU machine: pytest -m gpu
def test_cache_on_gpu_matches_cpu() -> None:
    model = tiny().eval()
    data = TokenDataset([[5, 6, 7], [8], [1, 2, 3, 4, 5]], [0, 1, 0], ["a", "b", "c"])
    cpu = TrunkCache(1, token="last")
    cpu.build("val", model, data, 5, PAD, torch.device("cpu"))
    gpu = TrunkCache(1, token="last")
    gpu.build("val", model.cuda(), data, 5, PAD, torch.device("cuda"))
    on_gpu, on_cpu = gpu.features("val", data, 5), cpu.features("val", data, 5)
    for i in (2, 0):
        torch.testing.assert_close(on_gpu[i][0].cpu(), on_cpu[i][0], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- whole runs
BASE = [
    "model=gpt2-tiny",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.enable_checkpointing=false",
    "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null",
    "logger=none",
    "eval_freq=3",
    "eval_iter=2",
    "optimizer.lr=1e-3",
]
_RUNS: dict[tuple[str, ...], tuple[dict, dict]] = {}
_WORK: dict[tuple[str, ...], Path] = {}


@pytest.fixture(scope="module")
def easy_source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("perf_data") / "easy.tsv"
    write_easy_tsv(path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, easy_source):
    """``run(overrides) -> (history, metrics)`` of a training run on the easy set (memoised)."""

    def _run(*overrides: str) -> tuple[dict, dict]:
        if overrides not in _RUNS:
            work = tmp_path_factory.mktemp("perf_run")
            cfg = compose_train([*BASE, f"data.source={easy_source}", *overrides], work)
            metrics = train(cfg)
            history = json.loads((work / "run" / "history.json").read_text())
            _RUNS[overrides] = (history, metrics)
            _WORK[overrides] = work
        return _RUNS[overrides]

    return _run


def assert_same_run(a: tuple[dict, dict], b: tuple[dict, dict], tol: float = 1e-5) -> None:
    (ha, ma), (hb, mb) = a, b
    for key in ("train_losses", "val_losses", "train_accs", "val_accs"):
        assert len(ha[key]) == len(hb[key]) > 0, key
        for x, y in zip(ha[key], hb[key], strict=True):
            assert abs(x - y) <= tol, (key, ha[key], hb[key])
    for split in ("train", "val", "test"):
        for name in ("accuracy", "loss", "f1"):
            x, y = ma[f"{split}_{name}"], mb[f"{split}_{name}"]
            assert abs(x - y) <= tol or (math.isnan(x) and math.isnan(y)), (split, name, x, y)


CACHE_CASES = [
    ("last_block", "last", "longest"),  # the chapter
    ("last_two_blocks", "flexible", "batch"),
    ("last_block", "masked_mean", "batch"),
    ("last_block", "mean", "longest"),  # the book's mean (row 19) reads the padding's states too
    # default suite under 4 min; these run in CI's slow pass
    pytest.param("last_two_blocks", "first", "longest", marks=pytest.mark.slow),
    pytest.param("last_block", "flexible", "longest", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("trainable", "token", "padding"), CACHE_CASES)
def test_cached_run_equals_uncached_run(run, trainable: str, token: str, padding: str) -> None:
    opts = (f"trainable={trainable}", f"token={token}", f"data.padding={padding}")
    cached = run(*opts, "cache.trunk=true")
    uncached = run(*opts, "cache.trunk=false")
    assert cached[1]["trunk_cache"] is True and uncached[1]["trunk_cache"] is False
    assert_same_run(cached, uncached)


@pytest.mark.parametrize("token", [pytest.param("flexible", marks=pytest.mark.slow), "masked_mean"])
def test_flexible_and_masked_mean_do_not_depend_on_padding(run, token: str) -> None:
    # cached runs under both paddings, and an uncached one (shared with the cache cases above)
    longest = run(
        "trainable=last_block", f"token={token}", "data.padding=longest", "cache.trunk=true"
    )
    batch = run("trainable=last_block", f"token={token}", "data.padding=batch", "cache.trunk=true")
    assert_same_run(longest, batch)
    other = "longest" if token == "flexible" else "batch"
    uncached = run(
        "trainable=last_block", f"token={token}", f"data.padding={other}", "cache.trunk=false"
    )
    assert_same_run(uncached, batch)


@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_cache_with_worker_processes(run) -> None:
    # the features are collated in worker processes as the tokens are (the same random draws)
    opts = (
        "trainable=last_block",
        "token=flexible",
        "data.padding=batch",
        "data.num_workers=2",
        "trainer.max_epochs=1",
    )
    cached = run(*opts, "cache.trunk=true")
    assert cached[1]["trunk_cache"] is True
    assert_same_run(cached, run(*opts, "cache.trunk=false"))


def test_cache_budget(run, tmp_path, easy_source) -> None:
    # auto over budget: falls back to the (equal) uncached computation
    small = run(
        "trainable=last_block", "token=last", "data.padding=longest", "cache.memory_budget_gb=1e-6",
        "trainer.max_epochs=1", "trainer.limit_train_batches=4",  # the fallback, not the learning
    )
    assert small[1]["trunk_cache"] is False
    # required but over budget: a clear error before training
    cfg = compose_train(
        [*BASE, f"data.source={easy_source}", "cache.trunk=true", "cache.memory_budget_gb=1e-6"],
        tmp_path,
    )
    with pytest.raises(
        ValueError, match=r"cache.trunk=true but caching is not possible.*memory_budget_gb"
    ):
        train(cfg)


def test_bf16_run_learns(run) -> None:
    history, metrics = run(
        "experiment=fast",
        "trainable=all",
        "optimizer.lr=2e-3",
        "optimizer.weight_decay=0.0",
        "trainer.max_epochs=4",
        "eval_freq=1000",
    )
    assert metrics["precision"] == "bf16-mixed" and metrics["padding"] == "batch"
    assert metrics["train_accuracy"] >= 0.95 and metrics["test_accuracy"] >= 0.9
    assert metrics["train_loss"] < 0.3 and history["train_accs"]


def test_fast_experiment_uses_the_cache(run) -> None:
    _, metrics = run("experiment=fast")
    assert metrics["trunk_cache"] is True and metrics["precision"] == "bf16-mixed"
    assert all(math.isfinite(metrics[f"{s}_loss"]) for s in ("train", "val", "test"))


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chapter_config_replays_the_chapters_loop(run) -> None:
    """Our default config (cached, pruned, Lightning) against the book's own loop on the same
    CSVs and weights: equal losses and accuracies at every evaluation, over several epochs
    (so the global RNG the shuffling draws from must advance exactly as the book's loop makes
    it advance), with the book's seeds: loaders, model + head, optimizer."""
    opts = ("trainable=last_block", "token=last", "data.padding=longest", "cache.trunk=true")
    history, metrics = run(*opts)
    data_dir = _WORK[opts] / "data" / "sms_spam"
    tok = get_tokenizer()
    train_ds = SpamDataset(data_dir / "train.csv", tok)
    val_ds = SpamDataset(data_dir / "validation.csv", tok, train_ds.max_length)
    loader = torch.utils.data.DataLoader
    torch.manual_seed(123)
    train_loader = loader(train_ds, batch_size=8, shuffle=True, drop_last=True)
    val_loader = loader(val_ds, batch_size=8, drop_last=False)
    torch.manual_seed(123)
    model = add_classification_head(BookGPTModel(MODEL_CONFIGS["gpt2-tiny"]), num_classes=2)
    torch.manual_seed(123)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    book = train_classifier_simple(
        model,
        train_loader,
        val_loader,
        optimizer,
        torch.device("cpu"),
        num_epochs=2,
        eval_freq=3,
        eval_iter=2,
    )
    assert len(train_ds) % 8 != 0  # the epoch ends with a partial, dropped batch
    names = ("train_losses", "val_losses", "train_accs", "val_accs")
    for name, values in zip(names, book[:4], strict=True):
        assert len(values) == len(history[name]) > 1
        for x, y in zip(values, history[name], strict=True):
            assert abs(x - y) <= 1e-5, (name, values, history[name])
    assert book[4] == metrics["examples_seen"]


# ----------------------------------------------------------------------------- compile
@pytest.mark.slow  # default suite under 4 min; runs in CI's slow pass
def test_compile_builds_and_a_compiled_block_equals_eager(tmp_path) -> None:
    cfg = compose_train(["model=gpt2-tiny", "model.compile=true"], tmp_path)
    model = build_model(cfg, 2)
    assert all(
        b._compiled_call_impl is not None for b in model.trf_blocks
    )  # what compile=true does
    # inductor needs a C++ toolchain and ~40 s cold on this CPU: trace with dynamo + AOTAutograd,
    # which is where a model usually breaks, and keep the test fast
    eager = tiny().eval()
    x = torch.randn(3, 9, 64)
    expected = eager.trf_blocks[0](x)
    block = eager.trf_blocks[0]
    block.compile(backend="aot_eager", dynamic=True)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=0)
    module = GPTClassifier(eager, token="flexible")
    ids, lengths = padded_batch(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(
            module(ids, lengths),
            full_logits(tiny().eval(), ids, lengths, "flexible"),
            atol=1e-5,
            rtol=0,
        )


# ----------------------------------------------------------------------------- benchmark
HEADLINE_KEYS = ("chapter_vs_book", "fast_vs_book", "classify_fp32_vs_hf", "classify_bf16_vs_hf",
                 "classify_bf16_agreement", "sweep_cache_speedup", "max_other_cpu_fraction")


def load_table_module():
    spec = importlib.util.spec_from_file_location(
        "benchmark_table", REPO / "scripts" / "benchmark_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # every benchmark phase, the sweep's jobs too
def test_benchmark_quick_on_tiny_model(tmp_path, sms_file) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "benchmark.py"),
            "--model",
            "gpt2-tiny",
            "--quick",
            "--epochs",
            "2",
            "--repeat",
            "2",
            "--in-process",
            "--threads",
            "1",
            "--source",
            str(sms_file),
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((out / "benchmark.json").read_text())
    table = (out / "benchmark.md").read_text()
    assert "| (a)" in table and "| (e)" in table and "Quick smoke run" in table
    assert results["quick"] is True and "quick" in results["label"]
    for key in HEADLINE_KEYS:
        assert key in results, key
    assert results["machine"]["cpu_model"] and results["machine"]["cores"] >= 1
    assert results["command"].startswith("python scripts/benchmark.py") and results["date"]
    phases = results["phases"]
    for name in ("a", "b", "c"):
        assert phases[name]["seconds"] > 0 and 0 <= phases[name]["test_accuracy"] <= 1
        assert phases[name]["peak_rss_mb"] > 50
        runs = phases[name]["runs"]
        assert len(runs) == 2  # interleaved: a, b, c, a, b, c
        walls = [r["wall_seconds"] for r in runs]
        assert phases[name]["wall_seconds"] == pytest.approx(sum(walls) / 2)  # the median
    seqs = [(phases[n]["runs"][i]["seq"], n) for n in ("a", "b", "c") for i in range(2)]
    assert [n for _, n in sorted(seqs)] == ["a", "b", "c", "a", "b", "c"]
    assert results["chapter_vs_book"] == pytest.approx(
        phases["a"]["wall_seconds"] / phases["b"]["wall_seconds"]
    )
    for name in ("d_fp32", "d_bf16", "e_fp32"):
        assert phases[name]["msgs_per_s"] > 0
    for name, r in phases.items():
        if name == "f" and r.get("reason"):
            continue
        frac = r["other_cpu_fraction"]  # /proc/stat is there on Linux
        assert frac is not None and frac >= 0 and r["loaded"] == (frac > 0.10), name
        assert r.get("mfu") is None or 0 < r["mfu"] <= 1.0, (name, r.get("mfu"))
    fracs = [r.get("other_cpu_fraction") for r in phases.values()]
    fracs += [j["other_cpu_fraction"] for j in phases.get("f", {}).get("jobs", [])]
    assert results["max_other_cpu_fraction"] == pytest.approx(
        max(x for x in fracs if x is not None)
    )
    f = phases["f"]
    if f.get("reason"):  # no cache.shared in the config: null, with the reason
        assert results["sweep_cache_speedup"] is None
    else:
        assert results["sweep_cache_speedup"] > 0 and f["results_equal"] is True
        assert len(f["jobs"]) == 4 and sum(j["shared"] for j in f["jobs"]) == 2
    for name in ("b", "c"):  # the fit loop's step against the same batches in a bare loop
        st = phases[name]["steps"]
        assert st["steps_timed"] > 0 and st["step_ms"] > 0 and st["bare_step_ms"] > 0
        assert st["step_ms"] - st["bare_step_ms"] - 50 < st["per_step_overhead_ms"] < st["step_ms"]
        assert phases[name]["excluded_seconds"] >= st["replay_seconds"] > 0  # not timed as ours
        # the user's defaults: nothing turns checkpoints, logging or the progress bar off
        assert not any(o.split("=")[0] in ("logger", "trainer.enable_checkpointing",
                       "trainer.enable_progress_bar", "callbacks.model_checkpoint")
                       for o in phases[name]["overrides"]), phases[name]["overrides"]
    assert "of framework per step" in table
    startup = phases["s"]["median_seconds"]  # fresh processes, a cold first prediction
    assert set(startup) == {"import_torch", "import_lightning", "import_train", "classify_help",
                            "classify_first_prediction_tiny"}
    assert all(v > 0 for v in startup.values()) and results["startup_seconds"] == startup
    assert all(len(w) == 1 for w in phases["s"]["runs_seconds"].values())  # --quick: once
    ceiling = results["gemm_ceiling"]
    assert ceiling["fp32"]["trunk_batch"]["rows"] == 4096  # TrunkCache's max_batch_tokens
    assert {r["rows"] for p in ceiling.values() for r in p.values()} == {
        4096, round(64 * results["context"]["mean_tokens"])
    }
    assert all(r["gflops"] > 0 and r["fraction_of_peak"] == pytest.approx(
        r["gflops"] / results["peak_gflops"][p]) for p, by in ceiling.items() for r in by.values())
    assert "GEMM ceiling" in table and "`spam-classify --help`" in table
    checks = results["checks"]
    assert checks["weights_identical"] is True and checks["deterministic_across_runs"] is True
    # our chapter config replays the chapter's loop: same losses, accuracies, data order
    assert checks["a_vs_b_history_max_abs_diff"] <= 1e-5
    assert checks["a_vs_b_accuracies_equal"] is True
    assert checks["d_vs_e_fp32_agreement"] == 1.0
    assert checks["d_bf16_vs_fp32_agreement"] >= 0.9
    assert results["peak_gflops"]["fp32"] > 0
    # the README table round trip from this JSON, on a copy of the README
    tables = load_table_module()
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    assert tables.main(["--json", str(out / "benchmark.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert tables.render_table(results) in text and "Quick smoke run" in text
    args = ["--json", str(out / "benchmark.json"), "--readme", str(readme)]
    assert tables.main([*args, "--check"]) == 0


def test_flop_log_counts_each_block_call_with_measure_flops() -> None:
    """FLOPs of what ran, by Lightning's ``measure_flops`` on meta copies of the blocks: a full
    block 24BTD^2 + 4BT^2D (q, k, v, out, FeedForward; QK^T, AV), the pruned last block
    4BTD^2 + 20BD^2 + 4BTD, and 3x (forward and backward) where gradients reach its weights."""
    bench = load_benchmark_module()
    model = tiny()  # last_block: block 0 frozen, block 1 trains
    log = bench.FlopLog().attach(model.trf_blocks)
    module = GPTClassifier(model, token="flexible")
    ids, lengths = padded_batch()
    with torch.no_grad():
        module(ids, lengths)
    module(ids, lengths).sum().backward()
    (b, t), d = ids.shape, MODEL_CONFIGS["gpt2-tiny"]["emb_dim"]
    full = 24 * b * t * d**2 + 4 * b * t**2 * d
    pruned = 4 * b * t * d**2 + 20 * b * d**2 + 4 * b * t * d
    assert sum(log.calls.values()) == 4
    assert log.total() == 2 * full + pruned + 3 * pruned


def test_random_checkpoint_has_the_hub_layout(tmp_path) -> None:
    """The sweep's and the load test's checkpoint: the Hub's names and shapes (the package's
    layout table on a meta model), loadable as pretrained weights."""
    from safetensors import safe_open

    from spam_lightning.model.weights import build_gpt

    bench = load_benchmark_module()
    path = tmp_path / "model.safetensors"
    size = bench.tools.write_random_hf_safetensors(path, "gpt2-tiny", seed=1)
    d = MODEL_CONFIGS["gpt2-tiny"]["emb_dim"]
    with safe_open(str(path), framework="pt") as fh:
        assert fh.get_slice("h.0.attn.c_attn.weight").get_shape() == [d, 3 * d]  # Conv1D, fused
    model = build_gpt("gpt2-tiny", weights="pretrained", checkpoint=path)
    params = {n: p for n, p in model.named_parameters() if n != "out_head.weight"}  # tied
    assert size == path.stat().st_size > 4 * sum(p.numel() for p in params.values())
    assert 0.01 < float(model.trf_blocks[0].att.W_query.weight.std()) < 0.03  # randn * 0.02


def test_merge_takes_earlier_phases_with_their_run_and_checks(tmp_path) -> None:
    """``--merge``: phases not run now come from the earlier file, marked with its date and
    command, with the checks of those phases only; another model or machine is refused."""
    bench = load_benchmark_module()
    ctx = {"model": "gpt2-small", "seed": 123, "epochs": 5, "num_texts": 1494, "max_length": 120,
           "batch_size": 64, "device": "cpu"}
    machine = {"cpu_model": "AMD EPYC", "cores": 2}
    old = {"date": "2026-12-02 14:31 UTC", "command": "python scripts/benchmark.py --phases a,b",
           "context": ctx, "machine": machine, "quick": False, "peak_gflops": {"fp32": 190.0},
           "phases": {"a": {"wall_seconds": 100.0}, "b": {"wall_seconds": 20.0}},
           "checks": {"a_vs_b_accuracies_equal": True, "d_vs_e_fp32_agreement": 1.0}}
    file = tmp_path / "old.json"
    file.write_text(json.dumps(old))
    now = {"c": {"wall_seconds": 10.0}}
    earlier, sources = bench.merge_phases([str(file)], {"c"}, ctx, machine, False)
    merged = now | earlier  # as main() adds them to the phases run now
    assert merged["c"] == now["c"] and merged["a"]["wall_seconds"] == 100.0
    assert merged["a"]["from"] == {"date": old["date"], "command": old["command"],
                                   "peak_gflops": old["peak_gflops"]}
    # the check of a and b comes along (both merged); the d/e one does not (no d, e there)
    assert sources == [{"file": str(file), "date": old["date"], "command": old["command"],
                        "peak_gflops": old["peak_gflops"], "phases": ["a", "b"],
                        "checks": {"a_vs_b_accuracies_equal": True}}]
    merged.pop("b")  # (summarize recomputes a vs b from histories, which this test has not)
    headline, checks = bench.summarize(ctx, merged, sources[0]["checks"])
    assert headline["fast_vs_book"] == 10.0  # a's 100 s then over c's 10 s now
    assert checks["a_vs_b_accuracies_equal"] is True
    _, sources = bench.merge_phases([str(file)], {"b"}, ctx, machine, False)
    assert sources[0]["phases"] == ["a"] and sources[0]["checks"] == {}  # b is run now
    with pytest.raises(SystemExit, match="model: 'gpt2-small' there, 'gpt2-tiny' now"):
        bench.merge_phases([str(file)], set(), {**ctx, "model": "gpt2-tiny"}, machine, False)
    with pytest.raises(SystemExit, match="machine cores: 2 there, 16 now"):
        bench.merge_phases([str(file)], set(), ctx, {**machine, "cores": 16}, False)


def test_mfu_is_never_above_one() -> None:
    """An MFU above 100 % means the peak was measured low: measure again; still above: null."""
    bench = load_benchmark_module()
    phases = {
        "x": {"flops": 4e9, "seconds": 1.0, "precision": "fp32"},
        "y": {"flops": 1e9, "seconds": 1.0, "precision": "bf16"},
    }
    low = {"fp32": 2.0, "bf16": 2.0}
    peak, notes = bench.cap_mfu(phases, low, lambda: {"fp32": 8.0, "bf16": 2.0})
    assert peak["fp32"] == 8.0 and phases["x"]["mfu"] == 0.5 and phases["y"]["mfu"] == 0.5
    assert notes  # the re-measurement is noted
    phases = {"x": {"flops": 4e9, "seconds": 1.0, "precision": "fp32"}}
    peak, notes = bench.cap_mfu(phases, low, lambda: {"fp32": 3.0, "bf16": 2.0})
    assert phases["x"]["mfu"] is None and "mfu_note" in phases["x"] and len(notes) == 2
    phases = {"x": {"flops": 1e9, "seconds": 1.0, "precision": "fp32"}}
    calls = []
    bench.cap_mfu(phases, low, lambda: calls.append(1) or {})
    assert phases["x"]["mfu"] == 0.5 and not calls  # a plausible MFU: no re-measurement


def test_other_cpu_accounting_excludes_own_work() -> None:
    """Busy work in this process is its own, not other processes'; the window's fraction is
    what ``/proc/stat`` says beyond it (some, on a shared machine; never negative)."""
    bench = load_benchmark_module()
    if bench.busy_cpu_seconds() is None:
        pytest.skip("no /proc/stat")
    watch = bench.CpuWatch()
    end = time.process_time() + 0.3  # CPU time, not wall: the machine may be shared
    while time.process_time() < end:
        pass
    cpu = watch.stop()
    assert cpu["own_cpu_s"] >= 0.29 and cpu["other_cpu_fraction"] >= 0.0
    # ours and others' together fit in the machine's cores over the window (jiffy rounding)
    assert cpu["other_cpu_s"] + cpu["own_cpu_s"] <= cpu["wall_s"] * (os.cpu_count() or 1) + 0.05
    assert cpu["loaded"] == (cpu["other_cpu_fraction"] > 0.10)


def test_readme_table_is_generated_from_json(tmp_path) -> None:
    """The README holds the markers, and the table between them is what the JSON renders."""
    tables = load_table_module()
    results = json.loads((REPO / "docs" / "benchmark.json").read_text())
    for key in HEADLINE_KEYS:
        assert key in results, key
    readme = (REPO / "README.md").read_text()
    assert tables.START in readme and tables.END in readme
    assert tables.update_readme(readme, tables.render_table(results)) == readme
    copy = tmp_path / "README.md"
    copy.write_text(readme.replace(tables.render_table(results), "stale"))
    assert tables.main(["--readme", str(copy), "--check"]) == 1
    assert tables.main(["--readme", str(copy)]) == 0 and copy.read_text() == readme


def test_book_row_names_the_code_phase_a_ran() -> None:
    """Phase (a) runs the book's code from ``llms_from_scratch`` and says so (``book_code``);
    a run from before, which carries no ``book_code``, ran ``spam_lightning.reference``."""
    tables = load_table_module()
    results = json.loads((REPO / "docs" / "benchmark.json").read_text())
    assert results["phases"]["a"]["book_code"] == "llms_from_scratch 1.0.19"
    for text in (tables.render_table(results), tables.render_markdown(results)):
        assert "the book's loop (`llms_from_scratch` 1.0.19)" in text
    del results["phases"]["a"]["book_code"]  # a benchmark.json from before
    assert "the book's loop (`spam_lightning.reference`)" in tables.render_table(results)


def test_quick_mode_is_a_smoke_run_on_the_tiny_model_in_one_process() -> None:
    """`python scripts/benchmark.py --quick` (the README's smoke run, issue 24 item 17): took 9
    minutes as gpt2-small with one interpreter per phase; now gpt2-tiny, every phase in this
    process, 300 data lines and the start-up commands once, unless asked otherwise."""
    bench = load_benchmark_module()
    quick = bench.parse_args(["--quick"])
    assert (quick.model, quick.in_process, quick.epochs, bench.QUICK_LINES) == (
        "gpt2-tiny", True, 1, 300)
    assert quick.wait_idle == 0 and quick.sweep_seeds == "1,2"
    chosen = bench.parse_args(["--quick", "--model", "gpt2-small"])
    assert chosen.model == "gpt2-small"
    full = bench.parse_args([])
    assert (full.model, full.in_process, full.epochs) == ("gpt2-small", False, 5)


def test_startup_table_says_how_many_runs_it_took_the_median_of() -> None:
    tables = load_table_module()
    s = {"median_seconds": {"import_torch": 2.0}, "other_cpu_fraction": 0.01,
         "runs_seconds": {"import_torch": [2.0]}}
    assert "(one run; other CPU" in tables._startup_lines(s)[1]
    s["runs_seconds"] = {"import_torch": [2.0, 2.1, 1.9]}
    assert "(median of 3; other CPU" in tables._startup_lines(s)[1]


@pytest.mark.slow  # the README's command as written: every phase, a few minutes on a busy CPU
def test_readme_quick_benchmark_as_written(tmp_path) -> None:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick",
                           "--out", str(tmp_path / "bench")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert results["quick"] is True and results["isolation"] == "in-process"
    assert results["context"]["model"] == "gpt2-tiny"
    assert set(results["phases"]) >= {"a", "b", "c", "d_fp32", "d_bf16", "e_fp32", "f", "s"}
    assert all(len(r) == 1 for r in results["phases"]["s"]["runs_seconds"].values())
    # a minute on an idle 2-core CPU; the bound leaves room for a machine shared 4 ways
    assert wall < 420, wall
