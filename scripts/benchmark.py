#!/usr/bin/env python
"""Benchmark (issues 6, 15, 22): the chapter's training job three ways, batch inference two ways.

Every phase starts from the same random weights (``torch.manual_seed(seed)``, the book's
``GPTModel`` init, listing 6.7's head: the compute of the pretrained model without a download)
and the real SMS data:

- (a) the book's own code from PyPI, ``llms_from_scratch`` (``ch04.GPTModel``, ``ch06.SpamDataset``,
  ``train_classifier_simple``, ``calc_accuracy_loader``): full forward on every batch, padded to
  the longest training message, float32, then the chapter's final accuracies on the full loaders;
- (b) ``experiment=chapter`` and (c) ``experiment=fast`` through ``spam_lightning.train.train``
  (the whole call: cache build, fit, final evaluation, bundle);
- (d) the ``spam-classify`` engine on every message, batch 64, fp32 and bf16, against (e)
  ``transformers``' ``GPT2ForSequenceClassification`` holding the same weights (it pools the last
  non-pad token: our ``flexible``; its ``score`` has no bias, so the head's bias is zero for both);
- (f) a sweep over seeds, each job building its own trunk cache, then all sharing one on disk;
- (s) start-up: the imports, ``spam-classify --help`` and a cold first prediction.

Each phase runs in its own interpreter (its peak RSS ``VmHWM`` is its own); ``--repeat N`` runs
a, b, c, a, b, c, ... (likewise d, e) and reports every run and the medians. Other processes'
CPU use during a phase (``/proc/stat`` minus the phase's own) flags it ``loaded`` above 10 % of
a core. FLOPs: each transformer block call is recorded by shape and counted with Lightning's
``measure_flops`` on a meta-device copy of the block (backward included where it trains). The
matmul peak MFU is quoted against (start and end, max kept; re-measured larger if an MFU comes
out above 100 %, else null with a note) and the GEMM ceiling are timed with
``torch.utils.benchmark.Timer``. ``--out docs`` writes the committed ``benchmark.json``/``.md``,
``--readme`` regenerates README.md's table (``scripts/benchmark_table.py`` does it from a JSON).
Full run: ``python scripts/benchmark.py --repeat 3 --out docs --logs benchmark-results --readme``;
``--quick``: 600 data lines, 1 epoch, a smoke run; ``--load-test gpt2-xl``: the peak RSS of
loading a random gpt2-xl-shaped ``model.safetensors`` (vs its size).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_table as tables  # the results: medians, MFU, checks, --merge, tables
from benchmark_table import HISTORY, cap_mfu, combine, merge_phases, ratio, summarize  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
PAD = 50256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUICK_LINES = 600


# ============================================================================ measuring tools
def proc_status_mb(field: str) -> float:
    """A ``/proc/self/status`` field (``VmHWM`` peak RSS, ``VmRSS`` current) in MiB."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
        return int(next(x for x in lines if x.startswith(field + ":")).split()[1]) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class FlopLog:
    """Block FLOPs of what really ran. A hook counts each block call by its shape (cheap enough
    to stay on while timing); ``total()`` then measures one call of each kind with Lightning's
    ``measure_flops`` on a meta-device copy of the block: its forward, plus the backward where
    the call ran with gradients into trainable weights."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.blocks: dict[int, torch.nn.Module] = {}

    def attach(self, blocks: Iterable[torch.nn.Module]) -> FlopLog:
        for block in blocks:
            self.blocks[id(block)] = block
            block.register_forward_pre_hook(self._recorder(block, "forward"), with_kwargs=True)
            if hasattr(block, "forward_at"):  # our classifier's last block: one query per row
                record, at = self._recorder(block, "forward_at"), block.forward_at
                block.forward_at = lambda x, pos, at=at, rec=record: rec(None, (x,), {}) or at(x, pos)
        return self

    def _recorder(self, block: torch.nn.Module, kind: str) -> Callable:
        def record(_module: Any, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]  # transformers' GPT2Block
            trains = torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters())
            self.calls[(id(block), kind, tuple(x.shape), trains)] += 1

        return record

    def total(self) -> float:
        from lightning.fabric.utilities.throughput import measure_flops

        sigs = {bid: (repr(b), tuple(p.requires_grad for p in b.parameters()))
                for bid, b in self.blocks.items()}  # blocks alike share a measurement
        metas: dict[Any, torch.nn.Module] = {}
        each: dict[Any, int] = {}
        for (bid, kind, shape, trains), n in self.calls.items():
            key = (sigs[bid], kind, shape, trains)
            if key not in each:
                if sigs[bid] not in metas:
                    metas[sigs[bid]] = copy.deepcopy(self.blocks[bid]).to("meta")
                meta = metas[sigs[bid]]
                x = torch.empty(shape, device="meta", dtype=next(meta.parameters()).dtype)
                args = (x, torch.full(shape[:1], shape[1] - 1)) if kind == "forward_at" else (x,)
                run = getattr(type(meta), kind)  # the class's method: no hook, no wrapper
                with torch.set_grad_enabled(trains):
                    each[key] = measure_flops(meta, lambda: run(meta, *args),  # noqa: B023
                                              torch.Tensor.sum if trains else None)
        return float(sum(n * each[(sigs[k[0]], *k[1:])] for k, n in self.calls.items()))


def timer(stmt: str, **names: Any) -> Any:
    """``torch.utils.benchmark.Timer`` on this process's threads (its default is one)."""
    from torch.utils.benchmark import Timer

    return Timer(stmt, globals=names, num_threads=torch.get_num_threads())


def measure_peak(
    seconds: float = 2.0, sizes: tuple[int, ...] | None = None, device: str = "cpu"
) -> dict[str, float]:
    """Best GFLOP/s of large square matmuls, fp32 and bf16 (the denominators of MFU): the fastest
    of the Timer's blocks over several sizes; on a shared machine the best run is the closest to
    what the hardware can do. ``main`` measures before and after the phases and keeps the max."""
    sizes = sizes or ((4096, 8192) if str(device).startswith("cuda") else (1024, 2048, 4096))
    out = {}
    for name, dtype in DTYPES.items():
        best = 0.0
        for n in sizes:
            a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
            m = timer("a @ b", a=a, b=b).blocked_autorange(min_run_time=seconds / len(sizes))
            best = max(best, 2 * n**3 / min(m.times) / 1e9)
        out[name] = best
    return out


def measure_gemm_ceiling(
    dim: int, rows: dict[str, int], seconds: float = 2.0, device: str = "cpu"
) -> dict[str, dict[str, Any]]:
    """Median GFLOP/s of one transformer block's own matmuls (q, k, v, out: ``dim x dim``;
    FeedForward: ``dim x 4dim`` and back, as ``F.linear`` with bias) at each batch height in
    ``rows`` (the trunk cache's and inference's tokens per batch), fp32 and bf16: what the BLAS
    gives the model's shapes, to set beside MFU (a whole pass also runs attention, GELU and
    LayerNorm, so it can at best come near it). The median: a phase is many calls, good and bad."""
    shapes = [(dim, dim)] * 4 + [(dim, 4 * dim), (4 * dim, dim)]
    out: dict[str, dict[str, Any]] = {}
    for name, dtype in DTYPES.items():
        out[name] = {}
        for label, m in rows.items():
            new = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: B023, E731
            xs = {k: new(m, k) for k in (dim, 4 * dim)}
            ws = [(new(n, k), new(n)) for k, n in shapes]
            t = timer("for w, b in ws: F.linear(xs[w.shape[1]], w, b)", F=torch.nn.functional,
                      xs=xs, ws=ws).blocked_autorange(min_run_time=seconds / len(rows))
            flops = sum(2.0 * m * k * n for k, n in shapes)
            out[name][label] = {"rows": m, "gflops": flops / t.median / 1e9,
                                "repeats": len(t.raw_times) * t.number_per_run}
    return out


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the GPT weights (the class head's bias excluded: (d)/(e) zero it)."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if k != "out_head.bias"):
        h.update(key.encode())
        h.update(state[key].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ============================================================================ models
def random_classifier(model_name: str, seed: int, book: bool = True) -> torch.nn.Module:
    """The weights every phase shares, in the chapter's order (section 6.5): seed, the book's
    ``ch04.GPTModel`` (``book=False``: ours, whose init equals it), then listing 6.7: freeze,
    seed, a new 2-class head, unfreeze the last block and the final norm."""
    from spam_lightning.model.gpt import MODEL_CONFIGS, GPTModel

    cfg = {**MODEL_CONFIGS[model_name], "drop_rate": 0.0}
    torch.manual_seed(seed)
    if book:
        from llms_from_scratch.ch04 import GPTModel as BookGPTModel

        model = BookGPTModel(cfg)
    else:
        model = GPTModel(cfg)
    model.requires_grad_(False)
    torch.manual_seed(seed)
    model.out_head = torch.nn.Linear(cfg["emb_dim"], 2)
    model.trf_blocks[-1].requires_grad_(True)
    model.final_norm.requires_grad_(True)
    return model


def hub_tensors(ours: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our GPTModel's tensors under the Hub's GPT-2 names, by the package's one layout table
    (``weights._hf_plan``: Conv1D [in, out] = our Linear transposed; ``c_attn`` = q, k, v)."""
    from spam_lightning.model.weights import _hf_plan

    out = {}
    for key, entry in _hf_plan(cfg).items():
        parts = [ours[t] for t in entry.targets]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        out[key] = (tensor.T if entry.transpose else tensor).contiguous()
    return out


def compose(overrides: list[str], work: Path) -> Any:
    """``conf/train.yaml`` composed in-process, run paths under ``work``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="spam_lightning.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir, cfg.paths.output_dir = str(work), str(work / "run")
    return cfg


# ============================================================================ (a) the book
def phase_a(ctx: dict[str, Any]) -> dict[str, Any]:
    """``gpt_class_finetune.py`` by the book's functions, with its seeds: loaders (shuffling from
    the global RNG), model, head, optimizer; `python train.py` follows the same order."""
    from importlib.metadata import version

    from llms_from_scratch.ch06 import SpamDataset, calc_accuracy_loader, train_classifier_simple
    from torch.utils.data import DataLoader

    from spam_lightning.data.tokens import get_tokenizer  # tiktoken's gpt2

    data, tok = Path(ctx["data_dir"]), get_tokenizer()
    train_ds = SpamDataset(data / "train.csv", tok)
    sets = [train_ds] + [SpamDataset(data / f"{s}.csv", tok, train_ds.max_length)
                         for s in ("validation", "test")]
    torch.manual_seed(ctx["seed"])  # listing 6.5's loaders
    loaders = [DataLoader(ds, batch_size=8, shuffle=i == 0, drop_last=i == 0)
               for i, ds in enumerate(sets)]
    device = torch.device(ctx.get("device", "cpu"))
    model = random_classifier(ctx["model"], ctx["seed"])
    t0 = time.perf_counter()
    digest = weights_digest(dict(model.named_parameters()))
    excluded = time.perf_counter() - t0  # the benchmark's own hashing, not the book's work
    model = model.to(device)
    flops = FlopLog().attach(model.trf_blocks)
    torch.manual_seed(ctx["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    start = time.perf_counter()
    history = train_classifier_simple(model, loaders[0], loaders[1], optimizer, device,
                                      num_epochs=ctx["epochs"], eval_freq=50, eval_iter=5)
    training_seconds = time.perf_counter() - start
    accs = {f"{s}_accuracy": calc_accuracy_loader(dl, model, device)
            for s, dl in zip(("train", "val", "test"), loaders, strict=True)}
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "excluded_seconds": excluded, "training_seconds": training_seconds,
            "flops": flops.total(), "precision": "fp32", "weights": digest, **accs,
            "examples_seen": history[4], "history": dict(zip(HISTORY, history[:4], strict=True)),
            "book_code": f"llms_from_scratch {version('llms-from-scratch')}"}


# ============================================================================ (b), (c) ours
class StepTimer(L.Callback):
    """Per-step wall time of the fit loop, then the same batches again in a bare PyTorch loop.

    A step is one training batch's start to the next one's (hooks, logging, progress bar and
    loader included); steps with an evaluation (the chapter's every ``eval_freq`` steps) and an
    epoch's last step (validation follows) are left out. At the end the last epoch's timed
    batches run again, in order, on a deep copy of the model (the run is untouched): forward in
    the trainer's precision context, loss, backward, fused AdamW step, ``zero_grad``, twice, the
    second pass timed. The framework's per-step overhead is the median over those batches of
    (fit-loop time - bare time): batch by batch, so the mix of lengths cancels. (Lightning's
    ``ThroughputMonitor`` logs windowed rates; it cannot pair a step with its bare replay.)
    """

    last: StepTimer | None = None

    def __init__(self) -> None:
        self.epoch: list[tuple[dict[str, torch.Tensor], float]] = []
        self._pending: tuple[dict[str, torch.Tensor], float] | None = None
        self._evaluated, self._eval_freq = False, None
        self.bare: list[float] = []
        self.replay_seconds = 0.0
        StepTimer.last = self

    def on_train_start(self, trainer, pl_module) -> None:
        monitor = next((c for c in trainer.callbacks if hasattr(c, "eval_freq")), None)
        self._eval_freq = None if monitor is None else monitor.eval_freq

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch, self._pending = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._pending is not None and not self._evaluated:
            self.epoch.append((self._pending[0], now - self._pending[1]))
        self._pending = (batch, now)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the chapter's step counter, as its monitor reads it
        self._evaluated = self._eval_freq is not None and step % self._eval_freq == 0

    def on_train_end(self, trainer, pl_module) -> None:
        t0 = time.perf_counter()
        model = copy.deepcopy(pl_module.model).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                lr=pl_module.hparams.lr, weight_decay=pl_module.hparams.weight_decay,
                                fused=True)
        for timed in (False, True):  # the first pass warms up
            for batch, _ in self.epoch:
                t = time.perf_counter()
                with trainer.precision_plugin.forward_context():
                    logits = model(batch["input_ids"], batch["lengths"], batch["index"], "train")
                torch.nn.functional.cross_entropy(logits.float(), batch["labels"]).backward()
                opt.step()
                opt.zero_grad()
                if timed:
                    self.bare.append(time.perf_counter() - t)
        del model, opt
        self.replay_seconds = time.perf_counter() - t0
        print(f"StepTimer: {self.report()}", flush=True)

    def report(self) -> dict[str, Any]:
        if not self.epoch or len(self.bare) != len(self.epoch):
            return {"replay_seconds": self.replay_seconds}
        loop = [t for _, t in self.epoch]
        return {"steps_timed": len(loop), "step_ms": statistics.median(loop) * 1000,
                "bare_step_ms": statistics.median(self.bare) * 1000,
                "per_step_overhead_ms": statistics.median(
                    (a - b) * 1000 for a, b in zip(loop, self.bare, strict=True)),
                "replay_seconds": self.replay_seconds}


def phase_train(
    ctx: dict[str, Any], experiment: str | None, extra: list[str] | None = None, tag: str = ""
) -> dict[str, Any]:
    """``train.train(cfg)`` as ``python train.py`` runs it (timed whole: data, model, cache, fit,
    final evaluation, bundle). ``experiment=None``: the sweep jobs of phase (f), whose ``extra``
    overrides say everything (no weights digest: they load a checkpoint)."""
    import spam_lightning.train as train_mod

    work = Path(ctx["work"]) / f"run_{experiment or 'sweep'}{tag}"
    cuda = str(ctx.get("device", "cpu")).startswith("cuda")
    overrides = [
        *([f"experiment={experiment}", f"model={ctx['model']}", "model.weights=random"]
          if experiment else [f"model={ctx['model']}"]),
        f"seed={ctx['seed']}", f"data.source={ctx['source']}",
        f"paths.data_dir={Path(ctx['data_dir']).parent}", f"trainer.max_epochs={ctx['epochs']}",
        f"trainer.accelerator={'gpu' if cuda else 'cpu'}", *(["trainer.devices=1"] if cuda else []),
        # checkpoints, TensorBoard, progress bar and summary stay on: the user's defaults;
        # (b), (c): every run builds its own trunk cache, as one `python train.py` from cold
        *(["cache.shared=false"] if experiment and "shared" in ctx.get("cache_keys", []) else []),
        *(extra or []),
    ]
    timed = ["+callbacks.benchmark_step_timer._target_=__main__.StepTimer"]  # not a setting
    cfg = compose(overrides + (timed if experiment else []), work)
    flops, build_model, digests, excluded = FlopLog(), train_mod.build_model, [], [0.0]

    def counted_build(cfg: Any, num_classes: int) -> torch.nn.Module:
        model = build_model(cfg, num_classes)
        if experiment and not digests:  # the weights train() starts from; hashing not timed
            t0 = time.perf_counter()
            digests.append(weights_digest(model.state_dict()))
            excluded[0] += time.perf_counter() - t0
        flops.attach(model.trf_blocks)
        return model

    train_mod.build_model = counted_build  # count what train() really runs
    try:
        start = time.perf_counter()
        metrics = train_mod.train(cfg)
        seconds = time.perf_counter() - start - excluded[0]
    finally:
        train_mod.build_model = build_model
    history = json.loads((work / "run" / "history.json").read_text())
    steps = StepTimer.last.report() if experiment and StepTimer.last else {}
    replay = steps.get("replay_seconds", 0.0)  # the bare replay is the benchmark's, not train's
    return {
        "seconds": seconds - replay, "excluded_seconds": excluded[0] + replay, "steps": steps,
        "overrides": overrides, "training_seconds": metrics["training_seconds"],
        "flops": flops.total(), "precision": "bf16" if "bf16" in metrics["precision"] else "fp32",
        **({"weights": digests[0]} if digests else {}),
        **{k: metrics[k] for k in ("train_accuracy", "val_accuracy", "test_accuracy",
                                   "examples_seen", "trunk_cache", "token", "padding")},
        "history": {k: history[k] for k in HISTORY},
    }


# ============================================================================ (d), (e) inference
def timed_predictions(ctx: dict[str, Any], predict: Callable, flops: FlopLog) -> dict[str, Any]:
    """One untimed warm-up batch, then every message, timed (synchronised on a GPU)."""
    from torch.utils.benchmark.utils.timer import timer as synced_clock

    texts = json.loads(Path(ctx["texts"]).read_text())
    predict(texts[: ctx["batch_size"]])  # allocator, kernels
    flops.calls.clear()
    start = synced_clock()
    probs = predict(texts)
    seconds = synced_clock() - start
    labels = probs.argmax(-1)
    return {"seconds": seconds, "msgs_per_s": len(texts) / seconds, "flops": flops.total(),
            "predictions": labels.tolist(), "spam_fraction": float(labels.float().mean())}


def phase_engine(ctx: dict[str, Any], precision: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    from spam_lightning.inference.classify import Classifier

    digest = weights_digest(load_file(str(Path(ctx["bundle_run"]) / "bundle" / "model.safetensors")))
    clf = Classifier(ctx["bundle_run"], device=ctx.get("device", "cpu"), precision=precision,
                     batch_size=ctx["batch_size"])
    result = timed_predictions(ctx, clf.predict_proba, FlopLog().attach(clf.model.trf_blocks))
    return {**result, "precision": "bf16" if precision == "bf16" else "fp32", "weights": digest}


def phase_hf(ctx: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from spam_lightning.data.tokens import encode_texts
    from spam_lightning.model.gpt import MODEL_CONFIGS

    cfg = MODEL_CONFIGS[ctx["model"]]
    ours = load_file(str(Path(ctx["bundle_run"]) / "bundle" / "model.safetensors"))
    if float(ours["out_head.bias"].abs().max()) != 0.0:
        raise ValueError("the bundle's head has a bias; HF's score has none")
    config = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"],
                        n_embd=cfg["emb_dim"], n_layer=cfg["n_layers"], n_head=cfg["n_heads"],
                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, layer_norm_epsilon=1e-5, num_labels=2, pad_token_id=PAD)
    digest = weights_digest(ours)
    with torch.device("meta"):  # no second copy of the weights: ours are assigned, not copied
        model = GPT2ForSequenceClassification(config)
    state = {f"transformer.{k}": v for k, v in hub_tensors(ours, cfg).items()}
    state["score.weight"] = ours.pop("out_head.weight")
    del ours
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    leftover = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
                if t.is_meta]
    if missing or unexpected or leftover:
        raise ValueError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}, "
                         f"left without values {leftover}")
    del state
    device = ctx.get("device", "cpu")
    model = model.to(device).eval()

    def predict(texts: list[str]) -> torch.Tensor:
        logits = []
        for i in range(0, len(texts), ctx["batch_size"]):
            ids = encode_texts(texts[i : i + ctx["batch_size"]], max_length=ctx["max_length"])
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([x + [PAD] * (width - len(x)) for x in ids], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
            logits.append(model(input_ids=input_ids, attention_mask=mask).logits)
        return torch.cat(logits).cpu()

    with torch.inference_mode():
        result = timed_predictions(ctx, predict, FlopLog().attach(model.transformer.h))
    return {**result, "precision": "fp32", "weights": digest,
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


# ============================================================================ loading test
def write_random_hf_safetensors(path: Path, model_name: str, seed: int = 0) -> int:
    """A random GPT-2 checkpoint in the Hub's layout, its shapes from our ``GPTModel`` on the meta
    device, streamed tensor by tensor (never the whole model in memory); returns the file size."""
    from spam_lightning.model.gpt import MODEL_CONFIGS, GPTModel

    with torch.device("meta"):
        model = GPTModel(MODEL_CONFIGS[model_name])
    shapes = {k: tuple(t.shape) for k, t in hub_tensors(model.state_dict(), model.cfg).items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        size = 4 * torch.Size(shape).numel()
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            fh.write((torch.randn(shape, generator=gen) * 0.02).numpy().tobytes())
    return path.stat().st_size


def phase_load(ctx: dict[str, Any]) -> dict[str, Any]:
    from spam_lightning.model.weights import build_gpt

    baseline, start = proc_status_mb("VmRSS"), time.perf_counter()
    model = build_gpt(ctx["load_model"], weights="pretrained", checkpoint=Path(ctx["load_file"]))
    return {"seconds": time.perf_counter() - start, "baseline_rss_mb": baseline,
            "params_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}


# ============================================================================ CPU accounting
LOADED = 0.10  # other processes' CPU, in cores: above this a phase is flagged ``loaded``
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_cpu_seconds() -> float | None:
    """Non-idle CPU seconds of the whole machine since boot, from ``/proc/stat``: user + nice +
    system + irq + softirq + steal (guest time is already inside user/nice)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if fields[:1] != ["cpu"]:
        return None
    v = [int(x) for x in fields[1:9]] + [0] * 8
    return (sum(v[0:3]) + sum(v[5:8])) / CLK_TCK


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    import resource

    return sum(getattr(resource.getrusage(who), f) for f in ("ru_utime", "ru_stime")
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


class CpuWatch:
    """Other processes' CPU use over a window, in cores: the machine's non-idle time minus this
    process's and its reaped children's (a phase's subprocess is reaped before ``stop``)."""

    def __init__(self) -> None:
        self.busy, self.own, self.start = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()

    def stop(self) -> dict[str, Any]:
        wall, busy = time.perf_counter() - self.start, busy_cpu_seconds()
        own = own_cpu_seconds() - self.own
        if busy is None or self.busy is None or wall <= 0:
            return {"wall_s": wall, "own_cpu_s": own, "other_cpu_s": None,
                    "other_cpu_fraction": None, "loaded": None}
        other = max(0.0, busy - self.busy - own)  # jiffy rounding can dip below zero
        return {"wall_s": wall, "own_cpu_s": own, "other_cpu_s": other,
                "other_cpu_fraction": other / wall, "loaded": other / wall > LOADED}


def wait_for_idle(timeout: float, window: float = 1.0) -> dict[str, Any]:
    """Wait (at most ``timeout`` s, in ``window``-second samples) until other processes use at
    most ``LOADED`` of a core; says how long it waited and what the last window saw."""
    start, frac = time.perf_counter(), None
    while time.perf_counter() - start < timeout:
        watch = CpuWatch()
        time.sleep(window)
        frac = watch.stop()["other_cpu_fraction"]
        if frac is None or frac <= LOADED:
            break
    return {"waited_s": time.perf_counter() - start, "other_cpu_fraction": frac}


# ============================================================================ running phases
PHASES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "a": phase_a,
    "b": lambda ctx: phase_train(ctx, "chapter"),
    "c": lambda ctx: phase_train(ctx, "fast"),
    "f_job": lambda ctx: phase_train(ctx, None, extra=ctx["job_overrides"], tag=ctx["job_tag"]),
    "d_fp32": lambda ctx: phase_engine(ctx, "32"),
    "d_bf16": lambda ctx: phase_engine(ctx, "bf16"),
    "e_fp32": phase_hf,
    "load": phase_load,
}


def execute(phase: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """Run one phase here, with its RSS before (``baseline_rss_mb``) and peak (``peak_rss_mb``)."""
    if ctx.get("threads"):
        torch.set_num_threads(ctx["threads"])
    baseline = proc_status_mb("VmRSS")
    result = PHASES[phase](ctx)
    return {"baseline_rss_mb": baseline, **result, "peak_rss_mb": proc_status_mb("VmHWM")}


def run_phase(name: str, ctx: dict[str, Any], work: Path, log: Path | None) -> dict[str, Any]:
    """One phase in a fresh interpreter (``VmHWM`` its own), its output in ``log`` as it runs;
    ``log=None`` (``--in-process``): here, the peak reset first but with what earlier phases
    left. Adds the other processes' CPU use and ``process_seconds`` (the interpreter's whole
    life, imports included, less the benchmark's own hashing and replay)."""
    import gc

    print(f"--- phase {name} " + (f"(log: {log})" if log else "(in process)"), flush=True)
    if log is None:
        gc.collect()
        try:  # reset VmHWM to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        watch = CpuWatch()
        result = execute(name, ctx) | watch.stop()
        result |= {"process_seconds": None, "wall_seconds": result["seconds"]}
    else:
        ctx_file, result_file = work / f"{name}.ctx.json", work / f"{name}.json"
        ctx_file.write_text(json.dumps(ctx))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--ctx",
               str(ctx_file), "--result", str(result_file)]
        watch = CpuWatch()
        with log.open("w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
        cpu = watch.stop()
        if proc.returncode != 0:
            raise RuntimeError(f"phase {name} failed (log: {log}):\n{log.read_text()[-4000:]}")
        result = json.loads(result_file.read_text()) | cpu
        result["process_seconds"] = cpu["wall_s"] - result.get("excluded_seconds", 0.0)
        result["wall_seconds"] = result["process_seconds"]
    frac, proc_s = result.get("other_cpu_fraction"), result["process_seconds"]
    print(f"    {name}: {result['seconds']:.2f} s"
          + (f" ({proc_s:.2f} s as a process)" if proc_s is not None else "")
          + f", peak RSS {result['peak_rss_mb']:.0f} MiB"
          + ("" if frac is None else f", other CPU {frac:.2f} core"
             + (" (LOADED)" if result.get("loaded") else "")), flush=True)
    return result


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Data splits, the message list for (d)/(e) and the inference bundles, made once."""
    from spam_lightning.data import SpamDataModule
    from spam_lightning.data.source import BUNDLED_PATH
    from spam_lightning.inference.bundle import save_bundle
    from spam_lightning.model.gpt import MODEL_CONFIGS

    source = Path(args.source or BUNDLED_PATH).expanduser().resolve()
    if args.quick:  # the first QUICK_LINES lines (about 80 spam: 160 balanced rows)
        with source.open("rb") as fh:
            (work / "SMSSpamCollection").write_bytes(b"".join(itertools.islice(fh, QUICK_LINES)))
        source = work / "SMSSpamCollection"
    data_dir = work / "data" / "sms_spam"
    dm = SpamDataModule(source=str(source), data_dir=str(data_dir),
                        context_length=MODEL_CONFIGS[args.model]["context_length"])
    dm.prepare_data()
    dm.setup("fit")
    splits = (dm.train_dataset, dm.val_dataset, dm.test_dataset)
    texts = [t for ds in splits for t in ds.texts]
    lengths = [n for ds in splits for n in ds.lengths]
    (work / "texts.json").write_text(json.dumps(texts))
    for run, name in ((work / "bundle_run", args.model), (work / "tiny_bundle_run", "gpt2-tiny")):
        model = random_classifier(name, args.seed, book=False)  # the bundle holds our GPTModel
        with torch.no_grad():
            model.out_head.bias.zero_()  # HF's score has no bias
        save_bundle(run, model, class_names=["ham", "spam"], token="flexible",
                    max_length=dm.max_length, padding="longest", pad_token_id=PAD)
    return {"model": args.model, "seed": args.seed,
            "epochs": 1 if args.quick and args.epochs is None else (args.epochs or 5),
            "source": str(source), "data_dir": str(data_dir), "work": str(work),
            "texts": str(work / "texts.json"), "num_texts": len(texts),
            "max_length": dm.max_length, "bundle_run": str(work / "bundle_run"),
            "tiny_bundle_run": str(work / "tiny_bundle_run"),
            "mean_tokens": sum(lengths) / len(lengths), "batch_size": args.batch_size,
            "threads": args.threads, "device": args.device}


# ============================================================================ (f) sweep, (s)
def sweep_phase(args: argparse.Namespace, ctx: dict[str, Any], run: Callable) -> dict[str, Any]:
    """The same job for each of ``--sweep-seeds``: each building its own trunk cache, then all
    sharing one on disk. Every job loads one fixed random checkpoint (the trunk must not
    depend on the seed, as with pretrained weights). Speed-up: sum of the jobs' process times."""
    seeds = [int(x) for x in args.sweep_seeds.split(",") if x.strip()]
    experiment, keys = f"experiment={args.sweep_experiment}", set(ctx["cache_keys"])
    base = {"seeds": seeds, "overrides": [experiment], "speedup": None}
    if not {"shared", "dir"} <= keys:
        reason = f"the config has no cache.shared / cache.dir yet (cache keys: {', '.join(sorted(keys))})"
        print(f"--- phase f skipped: {reason}", flush=True)
        return {**base, "reason": reason, "seconds": None, "wall_seconds": None}
    work = Path(ctx["work"])
    ckpt = work / "sweep_weights" / "model.safetensors"
    ckpt.parent.mkdir(exist_ok=True)
    write_random_hf_safetensors(ckpt, args.model, seed=args.seed)
    jobs = []
    for shared, seed in itertools.product((False, True), seeds):
        tag = f"_{'shared' if shared else 'own'}_s{seed}"
        extra = [experiment, "model.weights=pretrained", f"model.checkpoint={ckpt}",
                 f"cache.shared={str(shared).lower()}",
                 *([f"cache.dir={work / 'shared-trunk-cache'}"] if shared else [])]
        jobs.append(run("f_job", {**ctx, "seed": seed, "job_overrides": extra, "job_tag": tag},
                        f"f{tag}") | {"shared": shared, "seed": seed})
    own, shared_jobs = jobs[: len(seeds)], jobs[len(seeds) :]
    equal = all(tables.max_history_diff(x["history"], y["history"]) <= 1e-6 and
                all(abs(x[f"{s}_accuracy"] - y[f"{s}_accuracy"]) < 1e-9 for s in ("val", "test"))
                for x, y in zip(own, shared_jobs, strict=True))
    unshared_s, shared_s = (sum(j["wall_seconds"] for j in js) for js in (own, shared_jobs))
    keep = ("seq", "seed", "shared", "seconds", "process_seconds", "wall_seconds",
            "training_seconds", "test_accuracy", "trunk_cache", "other_cpu_fraction", "loaded",
            "peak_rss_mb")
    fracs = [j["other_cpu_fraction"] for j in jobs if j.get("other_cpu_fraction") is not None]
    return {**base, "unshared_seconds": unshared_s, "shared_seconds": shared_s,
            "speedup": ratio(unshared_s, shared_s), "results_equal": equal,
            "seconds": unshared_s + shared_s, "wall_seconds": unshared_s + shared_s,
            "other_cpu_fraction": max(fracs) if fracs else None,
            "loaded": any(j.get("loaded") for j in jobs),
            "jobs": [{k: j.get(k) for k in keep} for j in jobs]}


STARTUP_MESSAGE = "WINNER!! You have been selected to receive a $900 prize reward. Call now"


def startup_phase(ctx: dict[str, Any], repeat: int = 3) -> dict[str, Any]:
    """What a user waits for before any work (issue 12 asks < 1 s and < 3 s): the imports,
    ``spam-classify --help`` and a gpt2-tiny bundle's first prediction, each ``repeat`` times
    in a fresh process (interleaved); median wall."""
    py = sys.executable
    script = Path(py).with_name("spam-classify")  # the console script, as a user types it
    classify = [str(script)] if script.is_file() else [py, "-m", "spam_lightning.inference.classify"]
    cmds = {"import_torch": [py, "-c", "import torch"],
            "import_lightning": [py, "-c", "import lightning"],
            "import_train": [py, "-c", "import spam_lightning.train"],
            "classify_help": [*classify, "--help"],
            "classify_first_prediction_tiny": [*classify, ctx["tiny_bundle_run"], STARTUP_MESSAGE]}
    walls: dict[str, list[float]] = {name: [] for name in cmds}
    print("--- phase s (start-up)", flush=True)
    watch = CpuWatch()
    for _, (name, cmd) in itertools.product(range(repeat), cmds.items()):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ctx["work"])
        walls[name].append(time.perf_counter() - t)
        if proc.returncode != 0:
            raise RuntimeError(f"start-up command {name} failed: {proc.stderr[-2000:]}")
    cpu = watch.stop()
    medians = {name: statistics.median(w) for name, w in walls.items()}
    for name, sec in medians.items():
        print(f"    {name}: {sec:.2f} s (runs: {', '.join(f'{w:.2f}' for w in walls[name])})")
    total = sum(map(sum, walls.values()))
    return {"seconds": total, "wall_seconds": total, "median_seconds": medians,
            "commands": {n: " ".join([Path(c[0]).name, *c[1:]]) for n, c in cmds.items()},
            "runs_seconds": walls, "other_cpu_fraction": cpu["other_cpu_fraction"],
            "loaded": cpu["loaded"]}


# ============================================================================ --merge, machine
def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_model": platform.processor() or platform.machine()}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        flags = next((ln for ln in lines if ln.startswith("flags")), "")
        info |= {"cpu_model": models[0] if models else info["cpu_model"],
                 "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags}
    except OSError:
        pass
    info["cores"] = os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        info["cores_usable"] = len(os.sched_getaffinity(0))
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ============================================================================ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--model", default="gpt2-small", help="gpt2-small (default), gpt2-tiny, ...")
    add("--epochs", type=int, default=None, help="training epochs (default 5; 1 with --quick)")
    add("--quick", action="store_true", help="600 data lines and 1 epoch: a smoke run")
    add("--source", default=None, help="the SMSSpamCollection file (default: the bundled copy)")
    add("--out", default="benchmark-results",
        help="folder for benchmark.json/.md (the committed ones: --out docs)")
    add("--logs", default=None, help="folder for the phases' logs (default: --out)")
    add("--phases", default="a,b,c,d_fp32,d_bf16,e_fp32,f,s",
        help="comma-separated subset of a,b,c,d_fp32,d_bf16,e_fp32,f,s (s: start-up times)")
    add("--merge", action="append", default=[], metavar="JSON",
        help="take the phases not run now from this earlier benchmark.json (each keeps its date "
             "and command); may be given more than once")
    add("--repeat", type=int, default=1,
        help="run (a),(b),(c) (and (d),(e)) N times, interleaved; medians reported")
    add("--sweep-experiment", default="chapter", help="phase (f)'s experiment")
    add("--sweep-seeds", default=None,
        help="phase (f)'s seeds, one job each (default 1,2,3; 1,2 with --quick)")
    add("--wait-idle", type=float, default=None, metavar="S",
        help="before the peak and each phase, wait up to S s for other processes to use < 10%% "
             "of a core (default 60; 0 with --quick)")
    add("--device", default="cpu", help="cpu (default) or cuda: where phases run")
    add("--batch-size", type=int, default=64, help="inference batch size")
    add("--threads", type=int, default=None, help="torch.set_num_threads in every phase")
    add("--seed", type=int, default=123)
    add("--in-process", action="store_true",
        help="run every phase in this process (faster start; peak RSS less clean)")
    add("--readme", nargs="?", const=str(REPO / "README.md"), default=None, metavar="README",
        help="then regenerate README.md's benchmark table")
    add("--load-test", default=None, metavar="MODEL",
        help="also measure loading a random MODEL-shaped safetensors (e.g. gpt2-xl)")
    for hidden in ("--phase", "--ctx", "--result"):  # a phase's own interpreter
        add(hidden, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import shlex

    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.phase:  # one phase, in the interpreter run_phase started
        sys.stdout.reconfigure(line_buffering=True)  # the book's prints show progress in the log
        result = execute(args.phase, json.loads(Path(args.ctx).read_text()))
        Path(args.result).write_text(json.dumps(result))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    selected = [p.strip() for p in args.phases.split(",") if p.strip()]
    for name in selected:
        if name not in (*tables.TRAIN_PHASES, *tables.INFER_PHASES, "f", "s"):
            raise SystemExit(f"unknown phase {name!r}")
    wait_idle = args.wait_idle if args.wait_idle is not None else (0.0 if args.quick else 60.0)
    args.sweep_seeds = args.sweep_seeds or ("1,2" if args.quick else "1,2,3")
    out = Path(args.out).resolve()
    logs = Path(args.logs).resolve() if args.logs else out
    for folder in (out, logs):
        folder.mkdir(parents=True, exist_ok=True)
    load_start, peak_seconds = list(os.getloadavg()), 1.0 if args.quick else 3.0
    peaks: list[dict[str, Any]] = []
    seq = itertools.count(1)

    def peak_now(when: str, seconds: float, sizes: tuple[int, ...] | None = None) -> dict:
        idle = wait_for_idle(wait_idle)
        print(f"matmul peak ({when}) ... ", end="", flush=True)
        watch = CpuWatch()
        got = measure_peak(seconds, sizes, args.device)
        frac = watch.stop()["other_cpu_fraction"]
        print(f"fp32 {got['fp32']:.0f} GFLOP/s, bf16 {got['bf16']:.0f} GFLOP/s"
              + ("" if frac is None else f", other CPU {frac:.2f} core"), flush=True)
        peaks.append({"when": when, **got, "other_cpu_fraction": frac,
                      "idle_wait_s": idle["waited_s"]})
        return {k: max(m[k] for m in peaks) for k in DTYPES}

    def run(name: str, ctx: dict[str, Any], label: str | None = None) -> dict[str, Any]:
        idle, n = wait_for_idle(wait_idle), next(seq)
        log = None if args.in_process else logs / f"{label or f'{name}_{n}'}.log"
        return run_phase(name, ctx, work, log) | {"seq": n, "idle_wait_s": idle["waited_s"]}

    with tempfile.TemporaryDirectory(prefix="spam-bench-") as tmp:
        work = Path(tmp)
        ctx = prepare(args, work)
        context = {k: v for k, v in ctx.items()
                   if k not in ("work", "texts", "bundle_run", "tiny_bundle_run", "data_dir")}
        machine = machine_info(args.device)
        # the earlier runs' phases (refused up front if not comparable)
        earlier, merged_from = merge_phases(args.merge, set(selected), context, machine,
                                                   args.quick)
        ctx["cache_keys"] = sorted(compose([], work / "probe").cache.keys())  # cache.shared yet?
        peak_now("start", peak_seconds)
        from spam_lightning.model.gpt import MODEL_CONFIGS
        from spam_lightning.model.trunk_cache import TrunkCache

        import inspect

        rows = {"trunk_batch": inspect.signature(TrunkCache).parameters["max_batch_tokens"].default,
                "inference_batch": max(1, round(args.batch_size * ctx["mean_tokens"]))}
        print("GEMM ceiling (the model's own matmul shapes) ... ", end="", flush=True)
        ceiling = measure_gemm_ceiling(MODEL_CONFIGS[args.model]["emb_dim"], rows, peak_seconds,
                                       args.device)
        print(", ".join(f"{p} {r['rows']} rows {r['gflops']:.0f}" for p, by in ceiling.items()
                        for r in by.values()) + " GFLOP/s", flush=True)
        runs: dict[str, list[dict]] = {}
        for group in (tables.TRAIN_PHASES, tables.INFER_PHASES):  # interleaved: a, b, c, a, b, c, ...
            for _, name in itertools.product(range(args.repeat), group):
                if name in selected:
                    runs.setdefault(name, []).append(run(name, ctx))
        phases = {name: combine(rs) for name, rs in runs.items()}
        if "f" in selected:
            phases["f"] = sweep_phase(args, ctx, run)
        if "s" in selected:
            phases["s"] = startup_phase(ctx) | {"seq": next(seq)}
        if args.load_test:
            file = work / "load" / "model.safetensors"
            file.parent.mkdir()
            print(f"--- writing a random {args.load_test} checkpoint", flush=True)
            size = write_random_hf_safetensors(file, args.load_test)
            load_ctx = {**ctx, "load_file": str(file), "load_model": args.load_test}
            phases["load"] = run_phase("load", load_ctx, work, logs / "load.log") | {
                "model": args.load_test, "file_mb": size / 2**20}
            file.unlink()
        if phases:  # the machine may be busier at one end of a long run than at the other
            peak_now("end", peak_seconds)
    big = (8192, 16384) if str(args.device).startswith("cuda") else (2048, 4096, 6144)
    peak, notes = cap_mfu(phases, peak_now("start") if not peaks else
                                 {k: max(m[k] for m in peaks) for k in DTYPES},
                                 lambda: peak_now("re-measured, larger", peak_seconds * 4, big))
    for prec, by_rows in ceiling.items():
        for r in by_rows.values():
            r["fraction_of_peak"] = r["gflops"] / peak[prec]
    phases |= earlier
    headline, checks = summarize(ctx, phases, {k: v for m in merged_from
                                                      for k, v in m["checks"].items()})
    worst = headline["max_other_cpu_fraction"]
    if worst is not None and worst > LOADED:
        notes.append(f"loaded: other processes used up to {worst:.2f} of a core during "
                     f"{', '.join(headline['loaded_phases']) or 'some phases'}; "
                     "those times are inflated")
    if phases.get("f", {}).get("reason"):
        notes.append(f"sweep_cache_speedup is null: {phases['f']['reason']}")
    results = {
        "label": "quick smoke run, not the result" if args.quick else "benchmark",
        "quick": args.quick, "command": shlex.join(["python", "scripts/benchmark.py", *raw_argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **headline,
        "context": context | {"repeat": args.repeat}, "machine": machine,
        "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
        "isolation": "in-process" if args.in_process else "one subprocess per phase",
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
        "peak_gflops": peak, "peak_measurements": peaks, "gemm_ceiling": ceiling,
        "startup_seconds": phases.get("s", {}).get("median_seconds"),
        "merged_from": merged_from, "checks": checks, "notes": notes,
        "phases": {k: {kk: vv for kk, vv in v.items() if kk != "predictions"}
                   for k, v in phases.items()},
    }
    (out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "benchmark.md").write_text(tables.render_markdown(results))
    print(tables.render_table(results))
    if args.readme:
        readme = Path(args.readme)
        readme.write_text(tables.update_readme(readme.read_text(), tables.render_table(results)))
        print(f"{readme}: benchmark table regenerated", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
