#!/usr/bin/env python
"""Benchmark (issues 6, 15): the chapter's training job three ways, batch inference two ways.

All phases use the same random-initialised weights (``torch.manual_seed(seed)`` then the book's
``GPTModel``: the compute of the pretrained model without a download) and the real SMS data:

- (a) the chapter's ``train_classifier_simple`` with its ``calc_loss_batch`` /
  ``calc_loss_loader`` / ``calc_accuracy_loader`` / ``evaluate_model`` from
  ``spam_lightning.reference`` (full forward on every batch, everything padded to 120 tokens,
  float32), then the chapter's final accuracies on the full loaders;
- (b) our ``experiment=chapter`` and (c) our ``experiment=fast`` through
  ``spam_lightning.train.train`` (the whole call: cache build, fit, final evaluation, bundle);
- (d) the ``spam-classify`` engine (``Classifier``) on the 1,494 messages, batch 64, float32
  and bf16, against (e) ``transformers``' ``GPT2ForSequenceClassification`` holding the same
  weights (its ``score`` has no bias, so the head's bias is zero for both), which pools the last
  non-pad token, i.e. our ``flexible`` token.

- (f) a sweep: the same job for several seeds, each building its own trunk cache
  (``cache.shared=false``) and then sharing one on disk (``cache.shared=true``); every job
  loads one fixed random checkpoint, as a sweep over pretrained weights would.

Each phase runs in its own subprocess so its peak RSS (``VmHWM``) is its own; ``--repeat N``
runs (a), (b), (c) interleaved (a, b, c, a, b, c, ...; likewise (d), (e)) so drift of the
machine shows, and reports every run and the median. For every phase the parent records the
CPU time other processes used meanwhile (machine-wide non-idle time from ``/proc/stat`` minus
the phase's own, children included) and flags a phase as ``loaded`` when that exceeds 10 % of
one core. The matmul peak (fp32 and bf16) that model FLOPs utilisation is quoted against is
measured at the start (after waiting up to ``--wait-idle`` seconds for an idle machine) and at
the end, the max kept; an MFU above 100 % means the peak was measured low, so it is measured
again with larger matmuls, and an MFU still above 100 % is reported as null with a note.
``benchmark.json`` and ``benchmark.md`` go to ``--out`` (the committed copies: ``--out docs``),
the phases' logs too unless ``--logs``; ``--readme`` then regenerates README.md's table from the
results (``scripts/benchmark_table.py`` does the same from a saved JSON). The full run:
``python scripts/benchmark.py --repeat 3 --out docs --logs benchmark-results --readme``.
FLOPs are counted from the shapes
each transformer block actually sees (hooks on the blocks; backward = 2x forward for blocks that
train), so MFU says how well the hardware is used and the ratios say how much work is avoided.

``--quick`` trims everything for smoke use: the first 600 lines of the data file, 1 epoch;
its output is labelled a quick smoke run. ``--device cuda`` runs the phases on a GPU.
``--load-test gpt2-xl`` also writes a random gpt2-xl-shaped ``model.safetensors`` to a temporary
folder and measures the peak RSS of loading it with ``spam_lightning.model.weights`` (vs file size).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from spam_lightning.reference import (
    SpamDataset,
    add_classification_head,
    calc_accuracy_loader,
    create_dataloaders,
    train_classifier_simple,
)

REPO = Path(__file__).resolve().parents[1]
PAD = 50256
TRAIN_PHASES = ("a", "b", "c")
INFER_PHASES = ("d_fp32", "d_bf16", "e_fp32")
QUICK_LINES = 600


# ============================================================================ memory, FLOPs
def proc_status_mb(field: str) -> float:
    """A ``/proc/self/status`` field (``VmHWM`` peak RSS, ``VmRSS`` current) in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def block_flops(batch: int, tokens: int, dim: int, queries: int | None = None) -> float:
    """Matmul FLOPs of one transformer block's forward.

    Full block on ``tokens`` positions: 24*B*T*D^2 (q, k, v, out: 4 D^2; FeedForward: 8 D^2) plus
    4*B*T^2*D for QK^T and AV. Pruned (``forward_at``, one query per row): k and v on every
    position (4*B*T*D^2), q/out/FeedForward on one (20*B*D^2), attention 4*B*T*D.
    """
    if queries is None:
        return 24.0 * batch * tokens * dim**2 + 4.0 * batch * tokens**2 * dim
    return 4.0 * batch * tokens * dim**2 + 20.0 * batch * dim**2 + 4.0 * batch * tokens * dim


class FlopMeter:
    """Counts executed block FLOPs via forward pre-hooks (and a wrapper on ``forward_at``).

    A call with gradients enabled on a block with trainable parameters counts 3x its forward
    (forward + backward for inputs and weights); frozen blocks and no-grad calls count 1x.
    """

    def __init__(self) -> None:
        self.flops = 0.0

    def _factor(self, module: torch.nn.Module) -> float:
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
        return 3.0 if trains else 1.0

    def attach_gpt(self, model: torch.nn.Module) -> None:
        """Our GPTModel: ``trf_blocks`` of TransformerBlock."""
        for block in model.trf_blocks:
            block.register_forward_pre_hook(self._full_hook)
            if hasattr(block, "forward_at"):
                block.forward_at = self._wrap_at(block, block.forward_at)

    def attach_hf(self, model: torch.nn.Module) -> None:
        """transformers' GPT2 (``transformer.h`` of GPT2Block)."""
        for block in model.transformer.h:
            block.register_forward_pre_hook(self._hf_hook, with_kwargs=True)

    def _full_hook(self, module: torch.nn.Module, args: tuple) -> None:
        b, t, d = args[0].shape
        self.flops += block_flops(b, t, d) * self._factor(module)

    def _hf_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        b, t, d = x.shape
        self.flops += block_flops(b, t, d)

    def _wrap_at(self, block: torch.nn.Module, fn: Callable) -> Callable:
        def counted(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            self.flops += block_flops(b, t, d, queries=1) * self._factor(block)
            return fn(x, positions)

        return counted


def measure_peak(
    seconds: float = 2.0, sizes: tuple[int, ...] | None = None, device: str = "cpu"
) -> dict[str, float]:
    """Best GFLOP/s of large square matmuls, fp32 and bf16 (the denominators of MFU).

    Several sizes, best of many repeats: on a shared machine the best run is the closest to
    what the hardware can do. ``main`` measures before and after the phases and keeps the max.
    """
    cuda = str(device).startswith("cuda")
    if sizes is None:
        sizes = (4096, 8192) if cuda else (1024, 2048, 4096)
    reps = 10 if cuda else 1  # a GPU matmul is too short to time one by one

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in sizes:
            a = torch.randn(n, n, dtype=dtype, device=device)
            b = torch.randn(n, n, dtype=dtype, device=device)
            a @ b
            sync()
            start = time.perf_counter()
            while True:  # at least one timed round per size
                t = time.perf_counter()
                for _ in range(reps):
                    a @ b
                sync()
                best = max(best, reps * 2 * n**3 / (time.perf_counter() - t) / 1e9)
                if time.perf_counter() - start >= seconds / len(sizes):
                    break
            del a, b
        out[name] = best
    return out


def measure_gemm_ceiling(
    dim: int, rows: dict[str, int], seconds: float = 2.0, device: str = "cpu"
) -> dict[str, dict[str, Any]]:
    """Median GFLOP/s of one transformer block's own matmuls (q, k, v and out: ``dim x dim``;
    FeedForward: ``dim x 4dim`` and back, as ``F.linear`` with bias) at each batch height in
    ``rows`` (e.g. the trunk cache's and inference's tokens per batch), fp32 and bf16.

    What the BLAS gives the model's shapes, repeated over ``seconds``: to set beside MFU, since
    a whole pass also runs attention, GELU and LayerNorm and can at best come near it.
    The median, not the best: a phase's time is many such calls, good and bad.
    """
    import statistics

    cuda = str(device).startswith("cuda")
    shapes = [(dim, dim)] * 4 + [(dim, 4 * dim), (4 * dim, dim)]
    out: dict[str, dict[str, Any]] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        per_rows = {}
        for label, m in rows.items():
            xs = {k: torch.randn(m, k, dtype=dtype, device=device) for k in (dim, 4 * dim)}
            ws = [(torch.randn(n, k, dtype=dtype, device=device),
                   torch.randn(n, dtype=dtype, device=device)) for k, n in shapes]

            def block(xs: dict[int, torch.Tensor], ws: list[tuple[torch.Tensor, ...]]) -> None:
                for w, b in ws:
                    torch.nn.functional.linear(xs[w.shape[1]], w, b)
                if cuda:
                    torch.cuda.synchronize()

            block(xs, ws)
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < 3 or time.perf_counter() - start < seconds / len(rows):
                t = time.perf_counter()
                block(xs, ws)
                times.append(time.perf_counter() - t)
            flops = sum(2.0 * m * k * n for k, n in shapes)
            per_rows[label] = {"rows": m, "gflops": flops / statistics.median(times) / 1e9,
                               "repeats": len(times)}
        out[name] = per_rows
    return out


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the GPT weights (the class head's bias excluded: (d)/(e) zero it)."""
    h = hashlib.sha256()
    for key in sorted(state):
        if key == "out_head.bias":
            continue
        h.update(key.encode())
        h.update(state[key].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ============================================================================ model helpers
def random_classifier(model_name: str, seed: int) -> torch.nn.Module:
    """The weights every phase shares: what ``train.build_model`` builds for ``model.weights=random``.

    In the chapter's order (section 6.5): seed, build, then ``add_classification_head`` (freeze,
    seed, new head, unfreeze the last block and the final norm).
    """
    from spam_lightning.model.gpt import MODEL_CONFIGS, GPTModel

    torch.manual_seed(seed)
    model = GPTModel({**MODEL_CONFIGS[model_name], "drop_rate": 0.0})
    return add_classification_head(model, num_classes=2, seed=seed)


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
        cfg.paths.root_dir = str(work)
        cfg.paths.output_dir = str(work / "run")
    return cfg


# ============================================================================ (a) the chapter
def phase_a(ctx: dict[str, Any]) -> dict[str, Any]:
    from spam_lightning.data.tokens import get_tokenizer  # tiktoken's gpt2, from the package

    data_dir = Path(ctx["data_dir"])
    tokenizer = get_tokenizer()
    train_dataset = SpamDataset(data_dir / "train.csv", tokenizer, max_length=None)
    val_dataset = SpamDataset(data_dir / "validation.csv", tokenizer, train_dataset.max_length)
    test_dataset = SpamDataset(data_dir / "test.csv", tokenizer, train_dataset.max_length)
    # the book's order of seeds: loaders (shuffling from the global RNG, no generator), model,
    # head, then once more before the optimizer; `python train.py` follows the same order
    torch.manual_seed(ctx["seed"])
    train_loader, val_loader, test_loader = create_dataloaders(
        train_dataset, val_dataset, test_dataset, batch_size=8
    )

    device = torch.device(ctx.get("device", "cpu"))
    model = random_classifier(ctx["model"], ctx["seed"])
    t0 = time.perf_counter()
    digest = weights_digest(model.state_dict())
    excluded = time.perf_counter() - t0  # the benchmark's own hashing, not the book's work
    model = model.to(device)
    meter = FlopMeter()
    meter.attach_gpt(model)
    torch.manual_seed(ctx["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)

    start = time.perf_counter()
    history = train_classifier_simple(
        model,
        train_loader,
        val_loader,
        optimizer,
        device,
        num_epochs=ctx["epochs"],
        eval_freq=50,
        eval_iter=5,
    )
    training_seconds = time.perf_counter() - start
    train_accuracy = calc_accuracy_loader(train_loader, model, device)
    val_accuracy = calc_accuracy_loader(val_loader, model, device)
    test_accuracy = calc_accuracy_loader(test_loader, model, device)
    seconds = time.perf_counter() - start
    train_losses, val_losses, train_accs, val_accs, examples_seen = history
    return {
        "seconds": seconds,
        "excluded_seconds": excluded,
        "training_seconds": training_seconds,
        "flops": meter.flops,
        "precision": "fp32",
        "weights": digest,
        "train_accuracy": train_accuracy,
        "val_accuracy": val_accuracy,
        "test_accuracy": test_accuracy,
        "examples_seen": examples_seen,
        "history": {
            "train_losses": train_losses,
            "val_losses": val_losses,
            "train_accs": train_accs,
            "val_accs": val_accs,
        },
    }


# ============================================================================ (b), (c) ours
class StepTimer(L.Callback):
    """Per-step wall time of the fit loop, then the same batches again in a bare PyTorch loop.

    A step is one training batch's start to the next one's (hooks, logging, progress bar and
    loader included); steps with an evaluation (the chapter's every ``eval_freq`` steps) and an
    epoch's last step (validation follows) are left out. At the end of training the last
    epoch's timed batches run again, in order, on a deep copy of the model (the run's weights and
    results are untouched): forward in the trainer's precision context, loss, backward, fused
    AdamW step, ``zero_grad``, twice, the second pass timed. The framework's per-step overhead is
    the median over those batches of (fit-loop time - bare time): batch by batch, so the mix of
    lengths cancels.
    """

    last: StepTimer | None = None

    def __init__(self) -> None:
        self.epoch: list[tuple[dict[str, torch.Tensor], float]] = []
        self._pending: tuple[dict[str, torch.Tensor], float] | None = None
        self._evaluated = False
        self.bare: list[float] = []
        self.replay_seconds = 0.0
        self._eval_freq: int | None = None
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
        import copy

        t0 = time.perf_counter()
        model = copy.deepcopy(pl_module.model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=pl_module.hparams.lr,
                                weight_decay=pl_module.hparams.weight_decay, fused=True)
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        for timed in (False, True):  # the first pass warms up
            for batch, _ in self.epoch:
                t = time.perf_counter()
                with trainer.precision_plugin.forward_context():
                    cached = "features" in batch  # the frozen trunk's states (trunk_cache.py)
                    logits = model(batch["features"], batch["lengths"], batch["start_block"]) if cached \
                        else model(batch["input_ids"], batch["lengths"])
                loss_fn(logits.float(), batch["labels"]).backward()
                opt.step()
                opt.zero_grad()
                if timed:
                    self.bare.append(time.perf_counter() - t)
        del model, opt
        self.replay_seconds = time.perf_counter() - t0
        print(f"StepTimer: {self.report()}", flush=True)

    def report(self) -> dict[str, Any]:
        import statistics

        if not self.epoch or len(self.bare) != len(self.epoch):
            return {"replay_seconds": self.replay_seconds}
        loop = [t for _, t in self.epoch]
        return {
            "steps_timed": len(loop),
            "step_ms": statistics.median(loop) * 1000,
            "bare_step_ms": statistics.median(self.bare) * 1000,
            "per_step_overhead_ms": statistics.median(
                (a - b) * 1000 for a, b in zip(loop, self.bare, strict=True)
            ),
            "replay_seconds": self.replay_seconds,
        }


def phase_train(
    ctx: dict[str, Any], experiment: str | None, extra: list[str] | None = None, tag: str = ""
) -> dict[str, Any]:
    """``train.train(cfg)`` as ``python train.py`` would run it (timed whole: data, model, cache,
    fit, final evaluation, bundle). ``experiment=None``: the sweep jobs of phase (f), whose
    ``extra`` overrides say everything (no weights digest: they load a checkpoint)."""
    import spam_lightning.train as train_mod

    name = experiment or "sweep"
    work = Path(ctx["work"]) / f"run_{name}{tag}"
    cuda = str(ctx.get("device", "cpu")).startswith("cuda")
    overrides = [
        *([f"experiment={experiment}"] if experiment else []),
        f"model={ctx['model']}",
        *(["model.weights=random"] if experiment else []),
        f"seed={ctx['seed']}",
        f"data.source={ctx['source']}",
        f"paths.data_dir={Path(ctx['data_dir']).parent}",
        f"trainer.max_epochs={ctx['epochs']}",
        f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
        *(["trainer.devices=1"] if cuda else []),
        # checkpoints, TensorBoard, progress bar and summary stay on: the user's defaults
        # (b), (c): every run builds its own trunk cache, as one `python train.py` from cold
        *(["cache.shared=false"] if experiment and "shared" in ctx.get("cache_keys", []) else []),
        *(extra or []),
    ]
    timed = ["+callbacks.benchmark_step_timer._target_=__main__.StepTimer"]  # not a setting
    cfg = compose(overrides + (timed if experiment else []), work)
    meter = FlopMeter()
    build_model = train_mod.build_model
    digests: list[str] = []
    excluded = [0.0]

    def counted_build(cfg: Any, num_classes: int) -> torch.nn.Module:
        model = build_model(cfg, num_classes)
        if experiment and not digests:  # the weights train() starts from; hashing not timed
            t0 = time.perf_counter()
            digests.append(weights_digest(model.state_dict()))
            excluded[0] += time.perf_counter() - t0
        meter.attach_gpt(model)
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
    seconds -= steps.get("replay_seconds", 0.0)  # the bare replay is the benchmark's, not train's
    return {
        "seconds": seconds,
        "excluded_seconds": excluded[0] + steps.get("replay_seconds", 0.0),
        "steps": steps,
        "overrides": overrides,
        "training_seconds": metrics["training_seconds"],
        "flops": meter.flops,
        "precision": "bf16" if "bf16" in metrics["precision"] else "fp32",
        **({"weights": digests[0]} if digests else {}),
        "train_accuracy": metrics["train_accuracy"],
        "val_accuracy": metrics["val_accuracy"],
        "test_accuracy": metrics["test_accuracy"],
        "examples_seen": metrics["examples_seen"],
        "trunk_cache": metrics["trunk_cache"],
        "token": metrics["token"],
        "padding": metrics["padding"],
        "history": {
            k: history[k] for k in ("train_losses", "val_losses", "train_accs", "val_accs")
        },
    }


# ============================================================================ (d), (e) inference
def load_texts(ctx: dict[str, Any]) -> list[str]:
    return json.loads(Path(ctx["texts"]).read_text())


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed_batches(texts: list[str], batch_size: int) -> Iterator[list[str]]:
    for start in range(0, len(texts), batch_size):
        yield texts[start : start + batch_size]


def phase_engine(ctx: dict[str, Any], precision: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    from spam_lightning.inference.classify import Classifier

    texts = load_texts(ctx)
    digest = weights_digest(
        load_file(str(Path(ctx["bundle_run"]) / "bundle" / "model.safetensors"))
    )
    device = ctx.get("device", "cpu")
    clf = Classifier(
        ctx["bundle_run"], device=device, precision=precision, batch_size=ctx["batch_size"]
    )
    meter = FlopMeter()
    meter.attach_gpt(clf.model)
    clf.predict_proba(texts[: ctx["batch_size"]])  # warm-up (allocator, kernels), untimed
    meter.flops = 0.0
    sync(device)
    start = time.perf_counter()
    probs = clf.predict_proba(texts)
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "msgs_per_s": len(texts) / seconds,
        "flops": meter.flops,
        "precision": "bf16" if precision == "bf16" else "fp32",
        "weights": digest,
        "predictions": probs.argmax(-1).tolist(),
        "spam_fraction": float(probs.argmax(-1).float().mean()),
    }


def hf_state_dict(ours: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Our GPTModel's state dict in ``GPT2ForSequenceClassification``'s layout.

    Linear [out, in] -> Conv1D [in, out] (transpose); W_query/W_key/W_value -> one ``c_attn``;
    ``out_head`` -> ``score`` (no bias in HF: ours must be zero).
    """
    t = "transformer."
    sd = {
        t + "wte.weight": ours["tok_emb.weight"],
        t + "wpe.weight": ours["pos_emb.weight"],
        t + "ln_f.weight": ours["final_norm.scale"],
        t + "ln_f.bias": ours["final_norm.shift"],
        "score.weight": ours["out_head.weight"],
    }
    for i in range(n_layers):
        o, h = f"trf_blocks.{i}.", f"{t}h.{i}."
        qkv = ("W_query", "W_key", "W_value")
        sd |= {
            h + "ln_1.weight": ours[o + "norm1.scale"],
            h + "ln_1.bias": ours[o + "norm1.shift"],
            h + "ln_2.weight": ours[o + "norm2.scale"],
            h + "ln_2.bias": ours[o + "norm2.shift"],
            h + "attn.c_attn.weight": torch.cat([ours[f"{o}att.{q}.weight"] for q in qkv]).T,
            h + "attn.c_attn.bias": torch.cat([ours[f"{o}att.{q}.bias"] for q in qkv]),
            h + "attn.c_proj.weight": ours[o + "att.out_proj.weight"].T,
            h + "attn.c_proj.bias": ours[o + "att.out_proj.bias"],
            h + "mlp.c_fc.weight": ours[o + "ff.layers.0.weight"].T,
            h + "mlp.c_fc.bias": ours[o + "ff.layers.0.bias"],
            h + "mlp.c_proj.weight": ours[o + "ff.layers.2.weight"].T,
            h + "mlp.c_proj.bias": ours[o + "ff.layers.2.bias"],
        }
    return {k: v.contiguous() for k, v in sd.items()}


def phase_hf(ctx: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from spam_lightning.data.tokens import encode_texts
    from spam_lightning.model.gpt import MODEL_CONFIGS

    texts = load_texts(ctx)
    cfg = MODEL_CONFIGS[ctx["model"]]
    ours = load_file(str(Path(ctx["bundle_run"]) / "bundle" / "model.safetensors"))
    if float(ours["out_head.bias"].abs().max()) != 0.0:
        raise ValueError("the bundle's head has a bias; HF's score has none")
    config = GPT2Config(
        vocab_size=cfg["vocab_size"],
        n_positions=cfg["context_length"],
        n_embd=cfg["emb_dim"],
        n_layer=cfg["n_layers"],
        n_head=cfg["n_heads"],
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        num_labels=2,
        pad_token_id=PAD,
    )
    digest = weights_digest(ours)
    with torch.device("meta"):  # no second copy of the weights: ours are assigned, not copied
        model = GPT2ForSequenceClassification(config)
    state = hf_state_dict(ours, cfg["n_layers"])
    del ours
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    del state
    leftover = [
        n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta
    ]
    if leftover:
        raise ValueError(f"HF tensors left without values: {leftover}")
    device = ctx.get("device", "cpu")
    model = model.to(device).eval()
    meter = FlopMeter()
    meter.attach_hf(model)
    max_length = ctx["max_length"]

    def run(batch_texts: list[str]) -> torch.Tensor:
        ids = encode_texts(batch_texts, max_length=max_length)
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, row in enumerate(ids):
            input_ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        return model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits

    with torch.inference_mode():
        run(texts[: ctx["batch_size"]])  # warm-up, untimed
        meter.flops = 0.0
        sync(device)
        start = time.perf_counter()
        logits = torch.cat([run(b) for b in timed_batches(texts, ctx["batch_size"])]).cpu()
        sync(device)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "msgs_per_s": len(texts) / seconds,
        "flops": meter.flops,
        "precision": "fp32",
        "weights": digest,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "predictions": logits.argmax(-1).tolist(),
        "spam_fraction": float(logits.argmax(-1).float().mean()),
    }


# ============================================================================ loading test
def write_random_hf_safetensors(path: Path, model_name: str, seed: int = 0) -> int:
    """A random GPT-2 checkpoint in the Hub's layout, streamed tensor by tensor (never the whole
    model in memory); returns the file size."""
    from spam_lightning.model.gpt import MODEL_CONFIGS

    cfg = MODEL_CONFIGS[model_name]
    e, v, c = cfg["emb_dim"], cfg["vocab_size"], cfg["context_length"]
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (v, e), "wpe.weight": (c, e)}
    for i in range(cfg["n_layers"]):
        p = f"h.{i}."
        shapes |= {
            p + "ln_1.weight": (e,),
            p + "ln_1.bias": (e,),
            p + "attn.c_attn.weight": (e, 3 * e),
            p + "attn.c_attn.bias": (3 * e,),
            p + "attn.c_proj.weight": (e, e),
            p + "attn.c_proj.bias": (e,),
            p + "ln_2.weight": (e,),
            p + "ln_2.bias": (e,),
            p + "mlp.c_fc.weight": (e, 4 * e),
            p + "mlp.c_fc.bias": (4 * e,),
            p + "mlp.c_proj.weight": (4 * e, e),
            p + "mlp.c_proj.bias": (e,),
        }
    shapes |= {"ln_f.weight": (e,), "ln_f.bias": (e,)}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        size = 4 * int(torch.tensor(shape).prod())
        header[key] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for shape in shapes.values():
            fh.write((torch.randn(shape, generator=gen) * 0.02).numpy().tobytes())
    return path.stat().st_size


def phase_load(ctx: dict[str, Any]) -> dict[str, Any]:
    from spam_lightning.model.weights import build_gpt

    path = Path(ctx["load_file"])
    baseline = proc_status_mb("VmRSS")
    start = time.perf_counter()
    model = build_gpt(ctx["load_model"], weights="pretrained", checkpoint=path)
    seconds = time.perf_counter() - start
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"seconds": seconds, "baseline_rss_mb": baseline, "params_mb": params}


# ============================================================================ CPU accounting
LOADED = 0.10  # other processes' CPU, in cores: above this a phase is flagged ``loaded``
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_cpu_seconds() -> float | None:
    """Non-idle CPU seconds of the whole machine since boot (all cores), from ``/proc/stat``:
    user + nice + system + irq + softirq + steal (guest time is already inside user/nice)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:9]] + [0] * 8
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class CpuWatch:
    """Other processes' CPU use over a window: the machine's non-idle time minus this process's
    and its reaped children's (a phase's subprocess is reaped before ``stop``), per wall second,
    i.e. in cores."""

    def __init__(self) -> None:
        self.busy = busy_cpu_seconds()
        self.own = own_cpu_seconds()
        self.start = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.start
        busy = busy_cpu_seconds()
        own = own_cpu_seconds() - self.own
        if busy is None or self.busy is None or wall <= 0:
            return {"wall_s": wall, "own_cpu_s": own, "other_cpu_s": None,
                    "other_cpu_fraction": None, "loaded": None}
        other = max(0.0, busy - self.busy - own)  # jiffy rounding can dip below zero
        return {
            "wall_s": wall,
            "own_cpu_s": own,
            "other_cpu_s": other,
            "other_cpu_fraction": other / wall,
            "loaded": other / wall > LOADED,
        }


def wait_for_idle(timeout: float, window: float = 1.0) -> dict[str, Any]:
    """Sample ``window``-second windows until other processes use at most ``LOADED`` of a core,
    for at most ``timeout`` seconds; says how long it waited and what the last window saw."""
    start = time.perf_counter()
    if timeout <= 0:
        return {"waited_s": 0.0, "other_cpu_fraction": None}
    while True:
        watch = CpuWatch()
        time.sleep(window)
        frac = watch.stop()["other_cpu_fraction"]
        waited = time.perf_counter() - start
        if frac is None or frac <= LOADED or waited >= timeout:
            return {"waited_s": waited, "other_cpu_fraction": frac}


# ============================================================================ orchestration
def run_phase(name: str, ctx_file: Path, result_file: Path, log_file: Path) -> dict[str, Any]:
    """Run one phase in a fresh interpreter (so ``VmHWM`` is that phase's peak); its output
    goes to ``log_file`` as it runs (the chapter's prints show the progress of long phases).
    Adds ``process_seconds`` (the interpreter's whole life, imports included, less the
    benchmark's own hashing) and the other processes' CPU use meanwhile."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--phase",
        name,
        "--ctx",
        str(ctx_file),
        "--result",
        str(result_file),
    ]
    print(f"--- phase {name} (log: {log_file})", flush=True)
    watch = CpuWatch()
    with log_file.open("w") as log:
        proc = subprocess.run(cmd, text=True, stdout=log, stderr=subprocess.STDOUT)
    cpu = watch.stop()
    if proc.returncode != 0:
        tail = log_file.read_text()[-4000:]
        raise RuntimeError(f"phase {name} failed (log: {log_file}):\n{tail}")
    result = json.loads(result_file.read_text())
    result |= cpu
    result["process_seconds"] = cpu["wall_s"] - result.get("excluded_seconds", 0.0)
    result["wall_seconds"] = result["process_seconds"]
    report(name, result)
    return result


def report(name: str, result: dict[str, Any]) -> None:
    frac = result.get("other_cpu_fraction")
    load = "" if frac is None else f", other CPU {frac:.2f} core" + (
        " (LOADED)" if result.get("loaded") else ""
    )
    process = result.get("process_seconds")
    print(
        f"    {name}: {result['seconds']:.2f} s"
        + (f" ({process:.2f} s as a process)" if process is not None else "")
        + f", peak RSS {result['peak_rss_mb']:.0f} MiB{load}",
        flush=True,
    )


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: ``clear_refs`` value 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def execute(phase: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """Run one phase here; adds its RSS before (``baseline_rss_mb``) and peak (``peak_rss_mb``)."""
    if ctx.get("threads"):
        torch.set_num_threads(ctx["threads"])
    baseline = proc_status_mb("VmRSS")
    if phase == "a":
        result = phase_a(ctx)
    elif phase in ("b", "c"):
        result = phase_train(ctx, "chapter" if phase == "b" else "fast")
    elif phase == "f_job":
        result = phase_train(ctx, None, extra=ctx["job_overrides"], tag=ctx["job_tag"])
    elif phase in ("d_fp32", "d_bf16"):
        result = phase_engine(ctx, "32" if phase == "d_fp32" else "bf16")
    elif phase == "e_fp32":
        result = phase_hf(ctx)
    elif phase == "load":
        result = phase_load(ctx)
    else:
        raise ValueError(f"unknown phase {phase!r}")
    result.setdefault("baseline_rss_mb", baseline)
    result["peak_rss_mb"] = proc_status_mb("VmHWM")
    return result


def child(phase: str, ctx_file: Path, result_file: Path) -> None:
    result = execute(phase, json.loads(ctx_file.read_text()))
    result_file.write_text(json.dumps(result))


def run_in_process(name: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """``--in-process``: no interpreter start per phase (fast smoke runs); peaks are reset
    between phases but include whatever earlier phases left imported or allocated."""
    import gc

    gc.collect()
    reset_peak_rss()
    print(f"--- phase {name} (in process)", flush=True)
    watch = CpuWatch()
    result = execute(name, ctx)
    result |= watch.stop()
    result["process_seconds"] = None
    result["wall_seconds"] = result["seconds"]
    gc.collect()
    report(name, result)
    return result


def quick_source(source: Path, dest: Path) -> Path:
    """The first ``QUICK_LINES`` lines of the SMS file (about 80 spam: 160 balanced rows)."""
    with source.open("rb") as fh:
        dest.write_bytes(b"".join(itertools.islice(fh, QUICK_LINES)))
    return dest


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Data splits, the message list for (d)/(e) and the inference bundle, made once."""
    from spam_lightning.data import SpamDataModule
    from spam_lightning.data.source import BUNDLED_PATH
    from spam_lightning.inference.bundle import save_bundle

    source = Path(args.source or BUNDLED_PATH).expanduser().resolve()
    if args.quick:
        source = quick_source(source, work / "SMSSpamCollection")
    data_dir = work / "data" / "sms_spam"
    from spam_lightning.model.gpt import MODEL_CONFIGS

    dm = SpamDataModule(
        source=str(source),
        data_dir=str(data_dir),
        context_length=MODEL_CONFIGS[args.model]["context_length"],
    )
    dm.prepare_data()
    dm.setup("fit")
    texts = [t for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset) for t in ds.texts]
    (work / "texts.json").write_text(json.dumps(texts))
    model = random_classifier(args.model, args.seed)
    with torch.no_grad():
        model.out_head.bias.zero_()  # HF's score has no bias
    bundle_run = work / "bundle_run"
    save_bundle(
        bundle_run,
        model,
        class_names=["ham", "spam"],
        token="flexible",
        max_length=dm.max_length,
        padding="longest",
        pad_token_id=PAD,
    )
    tiny_run = work / "tiny_bundle_run"  # start-up phase (s): a first prediction, cold
    save_bundle(tiny_run, random_classifier("gpt2-tiny", args.seed), class_names=["ham", "spam"],
                token="flexible", max_length=dm.max_length, padding="longest", pad_token_id=PAD)
    lengths = [n for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset) for n in ds.lengths]
    return {
        "model": args.model,
        "seed": args.seed,
        "epochs": 1 if args.quick and args.epochs is None else (args.epochs or 5),
        "source": str(source),
        "data_dir": str(data_dir),
        "work": str(work),
        "texts": str(work / "texts.json"),
        "num_texts": len(texts),
        "max_length": dm.max_length,
        "bundle_run": str(bundle_run),
        "tiny_bundle_run": str(tiny_run),
        "mean_tokens": sum(lengths) / len(lengths),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": args.device,
    }


def ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def max_history_diff(h1: dict[str, list[float]], h2: dict[str, list[float]]) -> float:
    diffs = [0.0]
    for key in ("train_losses", "val_losses", "train_accs", "val_accs"):
        if len(h1[key]) != len(h2[key]):
            return float("inf")
        diffs += [abs(a - b) for a, b in zip(h1[key], h2[key], strict=True)]
    return max(diffs)


def agreement(p1: list[int], p2: list[int]) -> float:
    return sum(a == b for a, b in zip(p1, p2, strict=True)) / max(1, len(p1))


RUN_KEYS = ("seq", "seconds", "process_seconds", "wall_seconds", "msgs_per_s", "training_seconds",
            "other_cpu_s", "other_cpu_fraction", "loaded", "idle_wait_s", "peak_rss_mb")


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one phase: the medians of the times, every run listed under ``runs``,
    the other fields from the run nearest the median; other CPU: the worst run's."""
    import statistics

    med = statistics.median(r["wall_seconds"] for r in runs)
    rep = min(runs, key=lambda r: abs(r["wall_seconds"] - med))
    out = dict(rep)
    out["wall_seconds"] = med
    out["seconds"] = statistics.median(r["seconds"] for r in runs)
    if all(r.get("process_seconds") is not None for r in runs):
        out["process_seconds"] = statistics.median(r["process_seconds"] for r in runs)
    if "msgs_per_s" in rep:
        out["msgs_per_s"] = statistics.median(r["msgs_per_s"] for r in runs)
    fracs = [r["other_cpu_fraction"] for r in runs if r.get("other_cpu_fraction") is not None]
    out["other_cpu_fraction"] = max(fracs) if fracs else None
    out["loaded"] = any(r.get("loaded") for r in runs)
    out["runs"] = [{k: r.get(k) for k in RUN_KEYS if k in r} for r in runs]
    out["deterministic_across_runs"] = all(
        r.get("history") == rep.get("history") and r.get("predictions") == rep.get("predictions")
        for r in runs
    )
    return out


def set_mfu(phases: dict[str, dict], peak: dict[str, float]) -> float:
    """``gflops_per_s`` and ``mfu`` of every phase that counts FLOPs; returns the largest MFU."""
    worst = 0.0
    for res in phases.values():
        if res.get("flops") and res.get("seconds"):
            res["gflops_per_s"] = res["flops"] / res["seconds"] / 1e9
            res["mfu"] = res["gflops_per_s"] / peak[res["precision"]]
            worst = max(worst, res["mfu"])
    return worst


def cap_mfu(
    phases: dict[str, dict], peak: dict[str, float], remeasure: Callable[[], dict[str, float]]
) -> tuple[dict[str, float], list[str]]:
    """MFU never above 100 %: a phase above it means the peak was measured low (a busy
    machine), so measure it again with larger, longer matmuls; still above: MFU null + note."""
    notes: list[str] = []
    if set_mfu(phases, peak) <= 1.0:
        return peak, notes
    over = sorted(n for n, r in phases.items() if (r.get("mfu") or 0) > 1.0)
    print(f"MFU above 100 % for {over}: measuring the matmul peak again", flush=True)
    again = remeasure()
    peak = {k: max(v, again[k]) for k, v in peak.items()}
    notes.append(f"MFU above 100 % for {', '.join(over)} against the first peak; peak re-measured "
                 "with larger matmuls")
    set_mfu(phases, peak)
    for name, res in phases.items():
        if (res.get("mfu") or 0) > 1.0:
            prec = res["precision"]
            notes.append(f"{name}: {res['gflops_per_s']:.0f} GFLOP/s exceeds the measured "
                         f"{prec} peak ({peak[prec]:.0f}); MFU not reported")
            res["mfu"] = None
            res["mfu_note"] = "above the measured peak: the peak measurement is wrong"
    return peak, notes


# the phases each pairwise check compares (a check of merged phases comes with them)
CHECK_PHASES = {
    "a_vs_b_history_max_abs_diff": {"a", "b"}, "a_vs_b_accuracies_equal": {"a", "b"},
    "d_vs_e_fp32_agreement": {"d_fp32", "e_fp32"}, "d_bf16_vs_e_agreement": {"d_bf16", "e_fp32"},
    "d_bf16_vs_fp32_agreement": {"d_bf16", "d_fp32"}, "f_shared_equals_unshared": {"f"},
}


def summarize(
    ctx: dict[str, Any], phases: dict[str, dict], prior_checks: dict[str, Any] | None = None
) -> tuple[dict, dict]:
    """(headline ratios, checks). Ratios use each phase's median ``wall_seconds`` (the whole
    subprocess when phases run in their own interpreters) and median msgs/s. ``prior_checks``:
    the pairwise checks of phases merged from one earlier run (their predictions are not kept)."""
    a = phases.get("a")
    checks: dict[str, Any] = dict(prior_checks or {})
    digests = {name: res["weights"] for name, res in phases.items() if "weights" in res}
    train_digests = {digests[n] for n in TRAIN_PHASES if n in digests}
    infer_digests = {digests[n] for n in INFER_PHASES if n in digests}
    checks["weights_identical"] = len(train_digests) <= 1 and len(infer_digests) <= 1
    checks["deterministic_across_runs"] = all(
        r.get("deterministic_across_runs", True) for r in phases.values()
    )
    if a:
        for name in ("b", "c"):
            if name in phases:
                phases[name]["speedup_vs_a"] = ratio(
                    a["wall_seconds"], phases[name]["wall_seconds"]
                )
        if "b" in phases:
            b = phases["b"]
            checks["a_vs_b_history_max_abs_diff"] = max_history_diff(a["history"], b["history"])
            checks["a_vs_b_accuracies_equal"] = all(  # train too: the same shuffled batches
                abs(a[f"{s}_accuracy"] - b[f"{s}_accuracy"]) < 1e-6
                for s in ("train", "val", "test")
            )
    e = phases.get("e_fp32")
    if e:
        for name in ("d_fp32", "d_bf16"):
            if name in phases:
                phases[name]["speedup_vs_e"] = ratio(phases[name]["msgs_per_s"], e["msgs_per_s"])
    preds = {n: r["predictions"] for n, r in phases.items() if "predictions" in r}  # run now
    for key, (x, y) in (("d_vs_e_fp32_agreement", ("d_fp32", "e_fp32")),
                        ("d_bf16_vs_e_agreement", ("d_bf16", "e_fp32")),
                        ("d_bf16_vs_fp32_agreement", ("d_bf16", "d_fp32"))):
        if x in preds and y in preds:
            checks[key] = agreement(preds[x], preds[y])
    f = phases.get("f")
    if f and f.get("results_equal") is not None:
        checks["f_shared_equals_unshared"] = f["results_equal"]
    fracs = [r.get("other_cpu_fraction") for r in phases.values()]
    fracs += [j.get("other_cpu_fraction") for j in (f or {}).get("jobs", [])]
    fracs = [x for x in fracs if x is not None]
    headline = {
        "chapter_vs_book": phases.get("b", {}).get("speedup_vs_a"),
        "fast_vs_book": phases.get("c", {}).get("speedup_vs_a"),
        "classify_fp32_vs_hf": phases.get("d_fp32", {}).get("speedup_vs_e"),
        "classify_bf16_vs_hf": phases.get("d_bf16", {}).get("speedup_vs_e"),
        "classify_fp32_agreement": checks.get("d_vs_e_fp32_agreement"),
        # with HF's fp32 predictions (= ours in fp32 when d_vs_e_fp32_agreement is 1)
        "classify_bf16_agreement": checks.get(
            "d_bf16_vs_e_agreement", checks.get("d_bf16_vs_fp32_agreement")
        ),
        "sweep_cache_speedup": (f or {}).get("speedup"),
        "max_other_cpu_fraction": max(fracs) if fracs else None,
        "loaded_phases": sorted(n for n, r in phases.items() if r.get("loaded")),
    }
    return headline, checks


# ============================================================================ (f) sweep
def cache_keys(work: Path) -> set[str]:
    """The keys under ``cache:`` in the composed train config (is ``cache.shared`` there yet?)."""
    cfg = compose([], work / "probe")
    return set(cfg.cache.keys())


def sweep_phase(
    args: argparse.Namespace, ctx: dict[str, Any], work: Path, logs: Path
) -> dict[str, Any]:
    """The same job for each of ``--sweep-seeds``: each building its own trunk cache, then all
    sharing one on disk. Every job loads one fixed random checkpoint (the trunk must not
    depend on the seed, as with pretrained weights). Speed-up: sum of the jobs' process times."""
    seeds = [int(x) for x in args.sweep_seeds.split(",") if x.strip()]
    experiment = f"experiment={args.sweep_experiment}"
    keys = set(ctx.get("cache_keys") or cache_keys(work))
    base = {"seeds": seeds, "overrides": [experiment], "speedup": None}
    if not {"shared", "dir"} <= keys:
        reason = (f"the config has no cache.shared / cache.dir yet (cache keys: "
                  f"{', '.join(sorted(keys))})")
        print(f"--- phase f skipped: {reason}", flush=True)
        return {**base, "reason": reason, "seconds": None, "wall_seconds": None}
    ckpt = work / "sweep_weights" / "model.safetensors"
    ckpt.parent.mkdir(exist_ok=True)
    write_random_hf_safetensors(ckpt, args.model, seed=args.seed)
    cache_dir = work / "shared-trunk-cache"
    jobs: list[dict[str, Any]] = []
    for shared in (False, True):
        for seed in seeds:
            tag = f"_{'shared' if shared else 'own'}_s{seed}"
            extra = [experiment, "model.weights=pretrained", f"model.checkpoint={ckpt}",
                     f"cache.shared={str(shared).lower()}",
                     *([f"cache.dir={cache_dir}"] if shared else [])]
            job_ctx = {**ctx, "seed": seed, "job_overrides": extra, "job_tag": tag}
            name = f"f{tag}"
            if args.in_process:
                res = run_in_process("f_job", job_ctx)
            else:
                job_file = work / f"{name}.ctx.json"
                job_file.write_text(json.dumps(job_ctx))
                res = run_phase("f_job", job_file, work / f"{name}.json", logs / f"{name}.log")
            res |= {"shared": shared, "seed": seed}
            jobs.append(res)
    own = [j for j in jobs if not j["shared"]]
    shared_jobs = [j for j in jobs if j["shared"]]
    equal = all(
        max_history_diff(x["history"], y["history"]) <= 1e-6
        and all(abs(x[f"{s}_accuracy"] - y[f"{s}_accuracy"]) < 1e-9 for s in ("val", "test"))
        for x, y in zip(own, shared_jobs, strict=True)
    )
    unshared_s = sum(j["wall_seconds"] for j in own)
    shared_s = sum(j["wall_seconds"] for j in shared_jobs)
    keep = ("seed", "shared", "seconds", "process_seconds", "wall_seconds", "training_seconds",
            "test_accuracy", "trunk_cache", "other_cpu_fraction", "loaded", "peak_rss_mb")
    fracs = [j["other_cpu_fraction"] for j in jobs if j.get("other_cpu_fraction") is not None]
    return {
        **base,
        "unshared_seconds": unshared_s,
        "shared_seconds": shared_s,
        "speedup": ratio(unshared_s, shared_s),
        "results_equal": equal,
        "seconds": unshared_s + shared_s,
        "wall_seconds": unshared_s + shared_s,
        "other_cpu_fraction": max(fracs) if fracs else None,
        "loaded": any(j.get("loaded") for j in jobs),
        "jobs": [{k: j.get(k) for k in keep} for j in jobs],
    }


# ============================================================================ (s) start-up
STARTUP_MESSAGE = "WINNER!! You have been selected to receive a $900 prize reward. Call now"


def startup_commands(ctx: dict[str, Any]) -> dict[str, list[str]]:
    """What a user waits for before any work: the imports, ``spam-classify --help``, and the
    first prediction of a gpt2-tiny bundle from a cold process (issue 12 asks < 1 s and < 3 s)."""
    py = sys.executable
    script = Path(py).with_name("spam-classify")  # the console script, as a user types it
    classify = [str(script)] if script.is_file() else [py, "-m", "spam_lightning.inference.classify"]
    return {
        "import_torch": [py, "-c", "import torch"],
        "import_lightning": [py, "-c", "import lightning"],
        "import_train": [py, "-c", "import spam_lightning.train"],
        "classify_help": [*classify, "--help"],
        "classify_first_prediction_tiny": [*classify, ctx["tiny_bundle_run"], STARTUP_MESSAGE],
    }


def startup_phase(ctx: dict[str, Any], repeat: int = 3) -> dict[str, Any]:
    """Each start-up command ``repeat`` times in a fresh process (interleaved); median wall."""
    import statistics

    cmds = startup_commands(ctx)
    walls: dict[str, list[float]] = {name: [] for name in cmds}
    watch = CpuWatch()
    print("--- phase s (start-up)", flush=True)
    for _ in range(repeat):
        for name, cmd in cmds.items():
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ctx["work"])
            walls[name].append(time.perf_counter() - t)
            if proc.returncode != 0:
                raise RuntimeError(f"start-up command {name} failed: {proc.stderr[-2000:]}")
    cpu = watch.stop()
    medians = {name: statistics.median(w) for name, w in walls.items()}
    for name, sec in medians.items():
        print(f"    {name}: {sec:.2f} s (runs: {', '.join(f'{w:.2f}' for w in walls[name])})")
    total = sum(sum(w) for w in walls.values())
    return {
        "seconds": total,
        "wall_seconds": total,
        "commands": {name: " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))
                     for name, cmd in cmds.items()},
        "median_seconds": medians,
        "runs_seconds": walls,
        "other_cpu_fraction": cpu["other_cpu_fraction"],
        "loaded": cpu["loaded"],
    }


# what must be the same for phases of two runs to stand in one table
MERGE_CONTEXT = ("model", "seed", "epochs", "num_texts", "max_length", "batch_size", "device")
MERGE_MACHINE = ("cpu_model", "cores")


def merge_phases(
    files: list[str], run_now: set[str], ctx: dict[str, Any], machine: dict[str, Any],
    quick: bool,
) -> tuple[dict[str, dict], list[dict[str, Any]]]:
    """Phases of earlier ``benchmark.json`` files (``--merge``) for the phases not run now, each
    marked with the run it came from (its date, command and matmul peak); later files win.
    A file of another model, data, epoch count or machine is refused (SystemExit)."""
    merged: dict[str, dict] = {}
    sources: list[dict[str, Any]] = []
    for file in files:
        old = json.loads(Path(file).read_text())
        differ = [f"{k}: {old.get('context', {}).get(k)!r} there, {ctx.get(k)!r} now"
                  for k in MERGE_CONTEXT if old.get("context", {}).get(k) != ctx.get(k)]
        differ += [f"machine {k}: {old.get('machine', {}).get(k)!r} there, {machine.get(k)!r} now"
                   for k in MERGE_MACHINE if old.get("machine", {}).get(k) != machine.get(k)]
        if bool(old.get("quick")) != quick:
            differ.append(f"quick: {old.get('quick')} there, {quick} now")
        if differ:
            raise SystemExit(f"--merge {file}: another setting, not comparable: {'; '.join(differ)}")
        taken = []
        for name, res in old.get("phases", {}).items():
            if name in run_now:
                continue
            origin = res.get("from") or {"date": old.get("date"), "command": old.get("command"),
                                         "peak_gflops": old.get("peak_gflops")}
            merged[name] = {**res, "from": origin}
            taken.append(name)
        checks = {k: v for k, v in (old.get("checks") or {}).items()
                  if k in CHECK_PHASES and CHECK_PHASES[k] <= set(taken)}
        for group in sources:  # a later file's phase replaces an earlier file's
            group["phases"] = [n for n in group["phases"] if n not in taken]
        sources = [g for g in sources if g["phases"]]
        for name in taken:  # grouped by the run each phase was measured in
            origin = merged[name]["from"]
            group = next((g for g in sources if (g["date"], g["command"]) ==
                          (origin["date"], origin["command"])), None)
            if group is None:
                group = {"file": str(file), **origin, "phases": [], "checks": {}}
                sources.append(group)
            group["phases"].append(name)
            group["checks"] |= {k: v for k, v in checks.items() if name in CHECK_PHASES[k]}
    return merged, sources


# ============================================================================ report
def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.startswith("model name")]
        info["cpu_model"] = models[0] if models else platform.processor() or platform.machine()
        flags = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
        info["amx"] = "amx_bf16" in flags
        info["avx512_bf16"] = "avx512_bf16" in flags
    except OSError:
        info["cpu_model"] = platform.processor() or platform.machine()
    info["cores"] = os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        info["cores_usable"] = len(os.sched_getaffinity(0))
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


TITLES = {
    "a": "(a) the book's loop (`spam_lightning.reference`)",
    "b": "(b) `experiment=chapter`",
    "c": "(c) `experiment=fast`",
    "d_fp32": "(d) `Classifier` fp32",
    "d_bf16": "(d) `Classifier` bf16",
    "e_fp32": "(e) HF `GPT2ForSequenceClassification` fp32",
    "f": "(f) sweep, own vs shared trunk cache",
    "s": "(s) start-up commands, 3 runs each",
    "load": "loading test",
}


def markdown(results: dict[str, Any]) -> str:
    """``docs/benchmark.md``: how it was measured, the README's table, every run in order."""
    table = load_table_module().render_table(results)
    phases, checks = results["phases"], results["checks"]
    lines = [
        "# Benchmark (issues 6, 15)",
        "",
        "Generated by `scripts/benchmark.py` with `docs/benchmark.json`; do not edit by hand.",
        "",
        "Each phase runs in its own interpreter (unless `--in-process`) on the same random-"
        "initialised weights and the SMS data: (a) the book's loop as the book wrote it "
        "(`spam_lightning.reference`: its seeds, global-RNG shuffling, evaluation every 50 "
        "steps on 5 batches, then accuracy on the full train/validation/test loaders), "
        "(b) `python train.py` (the chapter config) and (c) `experiment=fast` through "
        "`spam_lightning.train.train`, (d) the `spam-classify` engine and (e) `transformers`' "
        "`GPT2ForSequenceClassification` on the same weights, (f) a sweep over seeds with and "
        "without the shared on-disk trunk cache. Wall times are the whole subprocess (start-up "
        "and imports included, the benchmark's own weight hashing excluded); ratios are of "
        "medians. Other CPU is machine-wide non-idle CPU time (`/proc/stat`) minus the phase's "
        "own (children included), per wall second: a phase above 0.10 of a core is **loaded** "
        "and its time is not to be trusted. MFU is useful FLOPs/s (counted from the shapes each "
        "block sees; backward = 2x forward) over the matmul peak of the same precision, "
        "measured at the start and the end of the run, the max kept.",
        "",
        table,
        "",
        "## Every run, in the order run",
        "",
        "| run of | # | phase | in-phase s | process s | other CPU (cores) | loaded | peak RSS MiB |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    rows = []
    for name, r in phases.items():
        # a phase merged from an earlier benchmark.json (--merge): its runs are of that run
        when = r["from"]["date"] if r.get("from") else results.get("date")
        if name == "f":
            for j in r.get("jobs", []):
                rows.append((when, j.get("seq", 0), f"(f) seed {j['seed']}, "
                             f"{'shared' if j['shared'] else 'own'} cache", j))
            continue
        for run in r.get("runs", [r]):
            rows.append((when, run.get("seq", 0), TITLES.get(name, name), run))
    for when, seq, title, run in sorted(rows, key=lambda x: (x[0] or "", x[1] or 0)):
        frac = run.get("other_cpu_fraction")
        proc = run.get("process_seconds")
        lines.append(
            f"| {when} | {seq} | {title} | {run.get('seconds') or 0:.2f} | "
            f"{'-' if proc is None else f'{proc:.2f}'} | "
            f"{'-' if frac is None else f'{frac:.3f}'} | "
            f"{'**yes**' if run.get('loaded') else 'no'} | {run.get('peak_rss_mb') or 0:.0f} |"
        )
    peak = results["peak_measurements"]
    lines += [
        "",
        "Matmul peak measurements (GFLOP/s): "
        + "; ".join(
            f"{m['when']}: fp32 {m['fp32']:.0f}, bf16 {m['bf16']:.0f} (other CPU "
            + ("-" if m.get("other_cpu_fraction") is None else f"{m['other_cpu_fraction']:.2f}")
            + ")"
            for m in peak
        ),
        "",
        "Checks: " + ", ".join(f"{k} = {v}" for k, v in checks.items()),
    ]
    return "\n".join(lines) + "\n"


def load_table_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "benchmark_table", Path(__file__).resolve().with_name("benchmark_table.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-small", help="gpt2-small (default), gpt2-tiny, ...")
    p.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default 5; 1 with --quick)"
    )
    p.add_argument("--quick", action="store_true", help="600 data lines and 1 epoch: a smoke run")
    p.add_argument(
        "--source",
        default=None,
        help="the SMSSpamCollection file (default: the copy bundled in the package)",
    )
    p.add_argument("--out", default="benchmark-results",
                   help="folder for benchmark.json/.md (the committed ones: --out docs)")
    p.add_argument("--logs", default=None, help="folder for the phases' logs (default: --out)")
    p.add_argument(
        "--phases",
        default="a,b,c,d_fp32,d_bf16,e_fp32,f,s",
        help="comma-separated subset of a,b,c,d_fp32,d_bf16,e_fp32,f,s (s: start-up times)",
    )
    p.add_argument("--merge", action="append", default=[], metavar="JSON",
                   help="take the phases not run now from this earlier benchmark.json (each "
                        "keeps its date and command); may be given more than once")
    p.add_argument("--repeat", type=int, default=1,
                   help="run (a),(b),(c) (and (d),(e)) N times, interleaved; medians reported")
    p.add_argument("--sweep-experiment", default="chapter", help="phase (f)'s experiment")
    p.add_argument("--sweep-seeds", default=None,
                   help="phase (f)'s seeds, one job each (default 1,2,3; 1,2 with --quick)")
    p.add_argument("--wait-idle", type=float, default=None, metavar="S",
                   help="before the peak and each phase, wait up to S s for other processes to "
                        "use < 10%% of a core (default 60; 0 with --quick)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where phases run")
    p.add_argument("--batch-size", type=int, default=64, help="inference batch size")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every phase")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every phase in this process (faster start; peak RSS less clean)",
    )
    p.add_argument("--readme", nargs="?", const=str(REPO / "README.md"), default=None,
                   metavar="README", help="then regenerate README.md's benchmark table")
    p.add_argument(
        "--load-test",
        default=None,
        metavar="MODEL",
        help="also measure loading a random MODEL-shaped safetensors (e.g. gpt2-xl)",
    )
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--ctx", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import shlex

    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.phase:
        child(args.phase, Path(args.ctx), Path(args.result))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    wait_idle = args.wait_idle if args.wait_idle is not None else (0.0 if args.quick else 60.0)
    selected = [p.strip() for p in args.phases.split(",") if p.strip()]
    for name in selected:
        if name not in TRAIN_PHASES + INFER_PHASES + ("f", "s"):
            raise SystemExit(f"unknown phase {name!r}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(args.logs).resolve() if args.logs else out
    if args.sweep_seeds is None:
        args.sweep_seeds = "1,2" if args.quick else "1,2,3"
    logs.mkdir(parents=True, exist_ok=True)
    load_start = list(os.getloadavg())
    peak_seconds = 1.0 if args.quick else 3.0
    peaks: list[dict[str, Any]] = []

    def peak_now(when: str, seconds: float, sizes: tuple[int, ...] | None = None) -> None:
        idle = wait_for_idle(wait_idle)
        watch = CpuWatch()
        print(f"matmul peak ({when}) ... ", end="", flush=True)
        got = measure_peak(seconds, sizes, args.device)
        cpu = watch.stop()
        frac = cpu["other_cpu_fraction"]
        print(f"fp32 {got['fp32']:.0f} GFLOP/s, bf16 {got['bf16']:.0f} GFLOP/s"
              + ("" if frac is None else f", other CPU {frac:.2f} core"), flush=True)
        peaks.append({"when": when, **got, "other_cpu_fraction": cpu["other_cpu_fraction"],
                      "idle_wait_s": idle["waited_s"]})

    def best_peak() -> dict[str, float]:
        return {k: max(m[k] for m in peaks) for k in ("fp32", "bf16")}

    seq = [0]
    with tempfile.TemporaryDirectory(prefix="spam-bench-") as tmp:
        work = Path(tmp)
        ctx = prepare(args, work)
        context = {k: v for k, v in ctx.items()
                   if k not in ("work", "texts", "bundle_run", "tiny_bundle_run", "data_dir")}
        machine = machine_info(args.device)
        # the earlier runs' phases not run now (refused up front if not comparable)
        earlier, merged_from = merge_phases(args.merge, set(selected), context, machine,
                                            args.quick)
        ctx["cache_keys"] = sorted(cache_keys(work))
        ctx_file = work / "ctx.json"
        ctx_file.write_text(json.dumps(ctx))
        peak_now("start", peak_seconds)
        from spam_lightning.model.gpt import MODEL_CONFIGS
        from spam_lightning.model.trunk_cache import TrunkCache

        trunk_rows = inspect.signature(TrunkCache).parameters["max_batch_tokens"].default
        rows = {"trunk_batch": trunk_rows,
                "inference_batch": max(1, round(args.batch_size * ctx["mean_tokens"]))}
        print("GEMM ceiling (the model's own matmul shapes) ... ", end="", flush=True)
        ceiling = measure_gemm_ceiling(MODEL_CONFIGS[args.model]["emb_dim"], rows,
                                       peak_seconds, args.device)
        print(", ".join(f"{p} {r['rows']} rows {r['gflops']:.0f}" for p, by in ceiling.items()
                        for r in by.values()) + " GFLOP/s", flush=True)

        def one(name: str) -> dict[str, Any]:
            idle = wait_for_idle(wait_idle)
            seq[0] += 1
            if args.in_process:
                res = run_in_process(name, ctx)
            else:
                log = logs / f"{name}_{seq[0]}.log"
                res = run_phase(name, ctx_file, work / f"{name}.json", log)
            res["seq"], res["idle_wait_s"] = seq[0], idle["waited_s"]
            return res

        runs: dict[str, list[dict]] = {}
        for group in (TRAIN_PHASES, INFER_PHASES):  # interleaved: a, b, c, a, b, c, ...
            names = [n for n in group if n in selected]
            for _ in range(args.repeat):
                for name in names:
                    runs.setdefault(name, []).append(one(name))
        phases: dict[str, dict] = {name: combine(rs) for name, rs in runs.items()}
        if "f" in selected:
            phases["f"] = sweep_phase(args, ctx, work, logs)
            for job in phases["f"].get("jobs", []):
                seq[0] += 1
                job["seq"] = seq[0]
        if "s" in selected:
            phases["s"] = startup_phase(ctx)
            seq[0] += 1
            phases["s"]["seq"] = seq[0]
        if args.load_test:
            file = work / "load" / "model.safetensors"
            file.parent.mkdir()
            print(f"--- writing a random {args.load_test} checkpoint", flush=True)
            size = write_random_hf_safetensors(file, args.load_test)
            ctx_load = {**ctx, "load_file": str(file), "load_model": args.load_test}
            ctx_file.write_text(json.dumps(ctx_load))
            phases["load"] = run_phase("load", ctx_file, work / "load.json", logs / "load.log")
            phases["load"] |= {"model": args.load_test, "file_mb": size / 2**20}
            file.unlink()
        if phases:  # the machine may be busier at one end of a long run than at the other
            peak_now("end", peak_seconds)
    sizes_big = (8192, 16384) if str(args.device).startswith("cuda") else (2048, 4096, 6144)

    def remeasure() -> dict[str, float]:
        peak_now("re-measured, larger", peak_seconds * 4, sizes_big)
        return best_peak()

    peak, notes = cap_mfu(phases, best_peak(), remeasure)
    for prec, by_rows in ceiling.items():
        for r in by_rows.values():
            r["fraction_of_peak"] = r["gflops"] / peak[prec]
    phases |= earlier
    prior = {k: v for m in merged_from for k, v in m["checks"].items()}
    headline, checks = summarize(ctx, phases, prior)
    worst = headline["max_other_cpu_fraction"]
    if worst is not None and worst > LOADED:
        notes.append(f"loaded: other processes used up to {worst:.2f} "
                     f"of a core during {', '.join(headline['loaded_phases']) or 'some phases'}; "
                     "those times are inflated")
    if phases.get("f", {}).get("reason"):
        notes.append(f"sweep_cache_speedup is null: {phases['f']['reason']}")
    results = {
        "label": "quick smoke run, not the result" if args.quick else "benchmark",
        "quick": args.quick,
        "command": shlex.join(["python", "scripts/benchmark.py", *raw_argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **headline,
        "context": context | {"repeat": args.repeat},
        "machine": machine,
        "threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "isolation": "in-process" if args.in_process else "one subprocess per phase",
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
        "peak_gflops": peak,
        "peak_measurements": peaks,
        "gemm_ceiling": ceiling,
        "startup_seconds": phases.get("s", {}).get("median_seconds"),
        "merged_from": merged_from,
        "checks": checks,
        "notes": notes,
        "phases": {
            k: {kk: vv for kk, vv in v.items() if kk != "predictions"} for k, v in phases.items()
        },
    }
    (out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "benchmark.md").write_text(markdown(results))
    print(load_table_module().render_table(results))
    if args.readme:
        readme = Path(args.readme)
        tables = load_table_module()
        readme.write_text(tables.update_readme(readme.read_text(), tables.render_table(results)))
        print(f"{readme}: benchmark table regenerated", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
