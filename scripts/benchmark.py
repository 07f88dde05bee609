#!/usr/bin/env python
"""Benchmark (issues 6, 15, 22): the chapter's training job three ways, batch inference two ways.

Every phase starts from the same random weights (seed, the book's ``GPTModel`` init, listing
6.7's head) and the SMS data: (a) the book's own code (PyPI ``llms_from_scratch``: ``ch04``'s
model, ``ch06``'s dataset, ``train_classifier_simple``, ``calc_accuracy_loader``); (b)
``experiment=chapter`` and (c) ``experiment=fast`` through ``spam_lightning.train.train``; (d)
the ``spam-classify`` engine, fp32 and bf16, against (e) ``transformers``'
``GPT2ForSequenceClassification`` on the same weights; (f) a sweep over seeds, each job with its
own trunk cache, then one shared on disk; (s) start-up times. Each phase runs in its own
interpreter (``--in-process``: not), ``--repeat N`` interleaves them, other processes' CPU use
flags a phase ``loaded``. FLOPs: Lightning's ``measure_flops`` on meta copies of the blocks that
ran; the matmul peak and GEMM ceiling: ``torch.utils.benchmark.Timer``. Results, checks and
tables: ``scripts/benchmark_table.py``. Full run:
``python scripts/benchmark.py --repeat 3 --out docs --logs benchmark-results --readme``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import inspect
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
from benchmark_table import HISTORY, cap_mfu, combine, merge_phases, summarize  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
PAD, QUICK_LINES, LOADED = 50256, 600, tables.LOADED
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ============================================================================ measuring tools
def proc_status_mb(field: str) -> float:
    """A ``/proc/self/status`` field (``VmHWM`` peak RSS, ``VmRSS`` current) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class FlopLog:
    """Block FLOPs of what really ran: a hook counts each block call by shape (cheap enough to
    stay on while timing); ``total()`` measures one call of each kind with Lightning's
    ``measure_flops`` on a meta-device copy of the block, backward included where it trains."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.blocks: dict[int, torch.nn.Module] = {}

    def attach(self, blocks: Iterable[torch.nn.Module]) -> FlopLog:
        for block in blocks:
            self.blocks[id(block)] = block
            block.register_forward_pre_hook(self._recorder(block, "forward"), with_kwargs=True)
            if hasattr(block, "forward_at"):  # our classifier's last block: one query per row
                rec, at = self._recorder(block, "forward_at"), block.forward_at
                block.forward_at = lambda x, pos, at=at, rec=rec: rec(None, (x,), {}) or at(x, pos)
        return self

    def _recorder(self, block: torch.nn.Module, kind: str) -> Callable:
        def record(_module: Any, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]  # transformers' GPT2Block
            trains = torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters())
            self.calls[(id(block), kind, tuple(x.shape), trains)] += 1

        return record

    def total(self) -> float:
        from lightning.fabric.utilities.throughput import measure_flops

        sigs = {i: (repr(b), tuple(p.requires_grad for p in b.parameters()))
                for i, b in self.blocks.items()}  # blocks alike share a measurement
        metas: dict[Any, torch.nn.Module] = {}
        each: dict[Any, int] = {}
        for bid, kind, shape, trains in self.calls:
            if (key := (sigs[bid], kind, shape, trains)) not in each:
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


def measure_peak(seconds: float, sizes: tuple[int, ...] | None, device: str) -> dict[str, float]:
    """Best GFLOP/s of square matmuls, fp32 and bf16 (MFU's denominators): the fastest of the
    Timer's blocks over several sizes, the closest a shared machine comes to its hardware."""
    sizes = sizes or ((4096, 8192) if device.startswith("cuda") else (1024, 2048, 4096))
    out = {}
    for name, dtype in DTYPES.items():
        mats = [[torch.randn(n, n, dtype=dtype, device=device) for _ in "ab"] for n in sizes]
        out[name] = max(2 * a.shape[0] ** 3 / 1e9 / min(timer("a @ b", a=a, b=b).blocked_autorange(
            min_run_time=seconds / len(sizes)).times) for a, b in mats)
    return out


def measure_gemm_ceiling(dim: int, rows: dict[str, int], seconds: float, device: str) -> dict:
    """Median GFLOP/s of one block's own matmuls (q, k, v, out, FeedForward; ``F.linear`` with
    bias) at each batch height in ``rows``, fp32 and bf16: what the BLAS gives the model's
    shapes, beside MFU (a whole pass also runs attention, GELU, LayerNorm: at best near it)."""
    shapes = [(dim, dim)] * 4 + [(dim, 4 * dim), (4 * dim, dim)]
    out: dict[str, dict[str, Any]] = {name: {} for name in DTYPES}
    for (name, dtype), (label, m) in itertools.product(DTYPES.items(), rows.items()):
        new = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: B023, E731
        t = timer("for w, b in ws: F.linear(xs[w.shape[1]], w, b)", F=torch.nn.functional,
                  xs={k: new(m, k) for k in (dim, 4 * dim)}, ws=[(new(n, k), new(n)) for k, n in shapes],
                  ).blocked_autorange(min_run_time=seconds / len(rows))
        out[name][label] = {"rows": m, "gflops": sum(2.0 * m * k * n for k, n in shapes) / t.median
                            / 1e9, "repeats": len(t.raw_times) * t.number_per_run}
    return out


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the GPT weights (the class head's bias excluded: (d)/(e) zero it)."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if k != "out_head.bias"):
        h.update(key.encode() + state[key].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ============================================================================ CPU accounting
def busy_cpu_seconds() -> float | None:
    """Non-idle CPU seconds of the whole machine since boot (``/proc/stat``: user + nice +
    system + irq + softirq + steal; guest time is inside user/nice)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    v = [int(x) for x in fields[1:9]] + [0] * 8 if fields[:1] == ["cpu"] else None
    return None if v is None else (sum(v[0:3]) + sum(v[5:8])) / os.sysconf("SC_CLK_TCK")


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
        wall, busy, own = time.perf_counter() - self.start, busy_cpu_seconds(), own_cpu_seconds()
        own -= self.own
        other = None if busy is None or self.busy is None else max(0.0, busy - self.busy - own)
        frac = None if other is None or wall <= 0 else other / wall  # jiffies: never below 0
        return {"wall_s": wall, "own_cpu_s": own, "other_cpu_s": other,
                "other_cpu_fraction": frac, "loaded": None if frac is None else frac > LOADED}


def wait_for_idle(timeout: float, window: float = 1.0) -> dict[str, Any]:
    """Wait (at most ``timeout`` s, in ``window``-s samples) until other processes use at most
    ``LOADED`` of a core; says how long it waited and what the last window saw."""
    start, frac = time.perf_counter(), None
    while time.perf_counter() - start < timeout:
        watch = CpuWatch()
        time.sleep(window)
        if (frac := watch.stop()["other_cpu_fraction"]) is None or frac <= LOADED:
            break
    return {"waited_s": time.perf_counter() - start, "other_cpu_fraction": frac}


# ============================================================================ models
def random_classifier(model_name: str, seed: int, book: bool = True) -> torch.nn.Module:
    """The weights every phase shares, in the chapter's order: seed, the book's ``GPTModel``
    (``book=False``: ours, whose init equals it), then listing 6.7: freeze, seed, new head,
    unfreeze the last block and the final norm."""
    from llms_from_scratch.ch04 import GPTModel as BookGPTModel

    from spam_lightning.model.gpt import MODEL_CONFIGS, GPTModel

    cfg = {**MODEL_CONFIGS[model_name], "drop_rate": 0.0}
    torch.manual_seed(seed)
    model = (BookGPTModel if book else GPTModel)(cfg).requires_grad_(False)
    torch.manual_seed(seed)
    model.out_head = torch.nn.Linear(cfg["emb_dim"], 2)
    model.trf_blocks[-1].requires_grad_(True)
    model.final_norm.requires_grad_(True)
    return model


def hub_tensors(ours: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our GPTModel's tensors under the Hub's names, by the package's one GPT-2 layout table."""
    from spam_lightning.model.weights import _hf_plan

    out = {}
    for key, entry in _hf_plan(cfg).items():
        parts = [ours[t] for t in entry.targets]  # c_attn: q, k, v; Conv1D: Linear transposed
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        out[key] = (tensor.T if entry.transpose else tensor).contiguous()
    return out


def write_random_hf_safetensors(path: Path, model_name: str, seed: int = 0) -> int:
    """A random GPT-2 checkpoint in the Hub's layout, shaped by our ``GPTModel`` on the meta
    device, streamed tensor by tensor (never the whole model in memory); returns its size."""
    from spam_lightning.model.gpt import MODEL_CONFIGS, GPTModel

    with torch.device("meta"):
        model = GPTModel(MODEL_CONFIGS[model_name])
    shapes = {k: t.shape for k, t in hub_tensors(model.state_dict(), model.cfg).items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for key, shape in shapes.items():
        start = header[list(header)[-1]].get("data_offsets", [0, 0])[1]
        header[key] = {"dtype": "F32", "shape": list(shape),
                       "data_offsets": [start, start + 4 * shape.numel()]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            fh.write((torch.randn(shape, generator=gen) * 0.02).numpy().tobytes())
    return path.stat().st_size


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


# ============================================================================ phases
def phase_a(ctx: dict[str, Any]) -> dict[str, Any]:
    """``gpt_class_finetune.py`` by the book's functions and seeds: loaders (shuffling from the
    global RNG), model, head, optimizer (`python train.py` follows the same order)."""
    from importlib.metadata import version

    from llms_from_scratch.ch06 import SpamDataset, calc_accuracy_loader, train_classifier_simple
    from torch.utils.data import DataLoader

    from spam_lightning.data.tokens import get_tokenizer  # tiktoken's gpt2

    data, tok = Path(ctx["data_dir"]), get_tokenizer()
    sets = [SpamDataset(data / "train.csv", tok)]
    sets += [SpamDataset(data / f"{s}.csv", tok, sets[0].max_length) for s in ("validation", "test")]
    torch.manual_seed(ctx["seed"])  # listing 6.5's loaders
    loaders = [DataLoader(ds, batch_size=8, shuffle=not i, drop_last=not i) for i, ds in enumerate(sets)]
    device, model = torch.device(ctx["device"]), random_classifier(ctx["model"], ctx["seed"])
    t0 = time.perf_counter()
    digest = weights_digest(dict(model.named_parameters()))
    excluded = time.perf_counter() - t0  # the benchmark's own hashing, not the book's work
    flops = FlopLog().attach(model.to(device).trf_blocks)
    torch.manual_seed(ctx["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    start = time.perf_counter()
    history = train_classifier_simple(model, *loaders[:2], optimizer, device,
                                      num_epochs=ctx["epochs"], eval_freq=50, eval_iter=5)
    training_seconds = time.perf_counter() - start
    accs = {f"{s}_accuracy": calc_accuracy_loader(dl, model, device)
            for s, dl in zip(("train", "val", "test"), loaders, strict=True)}
    return {"seconds": time.perf_counter() - start, "excluded_seconds": excluded,
            "training_seconds": training_seconds, "flops": flops.total(), "precision": "fp32",
            "weights": digest, **accs, "examples_seen": history[4],
            "history": dict(zip(HISTORY, history[:4], strict=True)),
            "book_code": f"llms_from_scratch {version('llms-from-scratch')}"}


class StepTimer(L.Callback):
    """Per-step wall time of the fit loop, then the same batches in a bare PyTorch loop.

    A step runs from one training batch's start to the next's; steps with an evaluation (the
    chapter's every ``eval_freq``) and an epoch's last step are left out. At the end the last
    epoch's timed batches run again on a deep copy of the model (forward in the trainer's
    precision context, loss, backward, fused AdamW step, ``zero_grad``), twice, the second
    pass timed. Overhead: the median of the per-batch differences, so the mix of lengths
    cancels. (``ThroughputMonitor`` logs windowed rates: it cannot pair a step with its replay.)
    """

    last: StepTimer | None = None

    def __init__(self) -> None:
        self.epoch: list[tuple[dict[str, torch.Tensor], float]] = []
        self.pending, self.evaluated, self.eval_freq = None, False, None
        self.bare: list[float] = []
        self.replay_seconds = 0.0
        StepTimer.last = self

    def on_train_start(self, trainer, pl_module) -> None:
        self.eval_freq = next((c.eval_freq for c in trainer.callbacks if hasattr(c, "eval_freq")), None)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch, self.pending = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.pending is not None and not self.evaluated:
            self.epoch.append((self.pending[0], now - self.pending[1]))
        self.pending = (batch, now)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the chapter's step counter, as its monitor reads it
        self.evaluated = self.eval_freq is not None and step % self.eval_freq == 0

    def on_train_end(self, trainer, pl_module) -> None:
        t0, model = time.perf_counter(), copy.deepcopy(pl_module.model).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True,
                                lr=pl_module.hparams.lr, weight_decay=pl_module.hparams.weight_decay)
        for timed, (batch, _) in itertools.product((False, True), self.epoch):  # warm-up first
            t = time.perf_counter()
            with trainer.precision_plugin.forward_context():
                logits = model(batch["input_ids"], batch["lengths"], batch["index"], "train")
            torch.nn.functional.cross_entropy(logits.float(), batch["labels"]).backward()
            opt.step()
            opt.zero_grad()
            self.bare += [time.perf_counter() - t] if timed else []
        self.replay_seconds = time.perf_counter() - t0
        print(f"StepTimer: {self.report()}", flush=True)

    def report(self) -> dict[str, Any]:
        loop, ms = [t for _, t in self.epoch], lambda xs: statistics.median(xs) * 1000
        if not loop or len(self.bare) != len(loop):
            return {"replay_seconds": self.replay_seconds}
        return {"steps_timed": len(loop), "step_ms": ms(loop), "bare_step_ms": ms(self.bare),
                "per_step_overhead_ms": ms([a - b for a, b in zip(loop, self.bare, strict=True)]),
                "replay_seconds": self.replay_seconds}


def phase_train(ctx: dict[str, Any], experiment: str | None) -> dict[str, Any]:
    """``train.train(cfg)`` as ``python train.py`` runs it, timed whole (data, model, cache, fit,
    final evaluation, bundle). ``experiment=None``: a sweep job of phase (f), whose
    ``job_overrides`` say everything (no weights digest: it loads a checkpoint)."""
    import spam_lightning.train as train_mod

    work = Path(ctx["work"]) / f"run_{experiment or 'sweep'}{ctx.get('job_tag', '')}"
    cuda = ctx["device"].startswith("cuda")
    overrides = [  # checkpoints, TensorBoard, progress bar and summary stay on: user defaults
        *([f"experiment={experiment}"] if experiment else []), f"model={ctx['model']}",
        *(["model.weights=random"] if experiment else []), f"seed={ctx['seed']}",
        f"data.source={ctx['source']}", f"paths.data_dir={Path(ctx['data_dir']).parent}",
        f"trainer.max_epochs={ctx['epochs']}", f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
        *(["trainer.devices=1"] if cuda else []),
        # (b), (c): every run builds its own trunk cache, as one `python train.py` from cold
        *(["cache.shared=false"] if experiment and "shared" in ctx["cache_keys"] else []),
        *ctx.get("job_overrides", []),
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
    return {"seconds": seconds - replay, "excluded_seconds": excluded[0] + replay, "steps": steps,
            "overrides": overrides, "training_seconds": metrics["training_seconds"],
            "flops": flops.total(), "precision": "bf16" if "bf16" in metrics["precision"] else "fp32",
            **({"weights": digests[0]} if digests else {}),
            **{k: metrics[k] for k in ("train_accuracy", "val_accuracy", "test_accuracy",
                                       "examples_seen", "trunk_cache", "token", "padding")},
            "history": {k: history[k] for k in HISTORY}}


def timed_predictions(ctx: dict[str, Any], predict: Callable, flops: FlopLog) -> dict[str, Any]:
    """One untimed warm-up batch, then every message, timed (the Timer's clock: GPU-synced)."""
    from torch.utils.benchmark.utils.timer import timer as clock

    texts = json.loads(Path(ctx["texts"]).read_text())
    predict(texts[: ctx["batch_size"]])  # allocator, kernels
    flops.calls.clear()
    start = clock()
    labels = predict(texts).argmax(-1)
    seconds = clock() - start
    return {"seconds": seconds, "msgs_per_s": len(texts) / seconds, "flops": flops.total(),
            "predictions": labels.tolist(), "spam_fraction": float(labels.float().mean())}


def phase_engine(ctx: dict[str, Any], precision: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    from spam_lightning.inference.classify import Classifier

    digest = weights_digest(load_file(Path(ctx["bundle_run"]) / "bundle" / "model.safetensors"))
    clf = Classifier(ctx["bundle_run"], ctx["device"], precision, ctx["batch_size"])
    result = timed_predictions(ctx, clf.predict_proba, FlopLog().attach(clf.model.trf_blocks))
    return {**result, "precision": "bf16" if precision == "bf16" else "fp32", "weights": digest}


def phase_hf(ctx: dict[str, Any]) -> dict[str, Any]:
    """HF's GPT-2 classifier on our bundle's weights, assigned (no copy) into a meta model."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from spam_lightning.data.tokens import encode_texts
    from spam_lightning.model.gpt import MODEL_CONFIGS

    cfg, device, size = MODEL_CONFIGS[ctx["model"]], ctx["device"], ctx["batch_size"]
    ours = load_file(Path(ctx["bundle_run"]) / "bundle" / "model.safetensors")
    if float(ours["out_head.bias"].abs().max()) != 0.0:
        raise ValueError("the bundle's head has a bias; HF's score has none")
    digest = weights_digest(ours)
    with torch.device("meta"):
        model = GPT2ForSequenceClassification(GPT2Config(
            vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"], n_embd=cfg["emb_dim"],
            n_layer=cfg["n_layers"], n_head=cfg["n_heads"], activation_function="gelu_new",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
            num_labels=2, pad_token_id=PAD))
    state = {f"transformer.{k}": v for k, v in hub_tensors(ours, cfg).items()}
    state["score.weight"] = ours.pop("out_head.weight")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    leftover = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
                if t.is_meta]
    if missing or unexpected or leftover:
        raise ValueError(f"HF state dict: missing {missing}, unexpected {unexpected}, "
                         f"left without values {leftover}")
    del ours, state
    model = model.to(device).eval()

    def predict(texts: list[str]) -> torch.Tensor:
        logits = []
        for i in range(0, len(texts), size):
            ids = encode_texts(texts[i : i + size], max_length=ctx["max_length"])
            pad = [max(map(len, ids)) - len(x) for x in ids]
            input_ids = torch.tensor([x + [PAD] * p for x, p in zip(ids, pad, strict=True)])
            mask = torch.tensor([[1] * len(x) + [0] * p for x, p in zip(ids, pad, strict=True)])
            logits.append(model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits)
        return torch.cat(logits).cpu()

    with torch.inference_mode():
        result = timed_predictions(ctx, predict, FlopLog().attach(model.transformer.h))
    return {**result, "precision": "fp32", "weights": digest,
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def phase_load(ctx: dict[str, Any]) -> dict[str, Any]:
    from spam_lightning.model.weights import build_gpt

    baseline, start = proc_status_mb("VmRSS"), time.perf_counter()
    model = build_gpt(ctx["load_model"], weights="pretrained", checkpoint=Path(ctx["load_file"]))
    return {"seconds": time.perf_counter() - start, "baseline_rss_mb": baseline,
            "params_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}


PHASES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "a": phase_a, "b": lambda ctx: phase_train(ctx, "chapter"),
    "c": lambda ctx: phase_train(ctx, "fast"), "f_job": lambda ctx: phase_train(ctx, None),
    "d_fp32": lambda ctx: phase_engine(ctx, "32"), "d_bf16": lambda ctx: phase_engine(ctx, "bf16"),
    "e_fp32": phase_hf, "load": phase_load,
}


# ============================================================================ running phases
def execute(phase: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """Run one phase here, with its RSS before (``baseline_rss_mb``) and peak (``peak_rss_mb``)."""
    if ctx.get("threads"):
        torch.set_num_threads(ctx["threads"])
    baseline = proc_status_mb("VmRSS")
    return {"baseline_rss_mb": baseline, **PHASES[phase](ctx), "peak_rss_mb": proc_status_mb("VmHWM")}


def run_phase(name: str, ctx: dict[str, Any], work: Path, log: Path | None) -> dict[str, Any]:
    """One phase in a fresh interpreter (``VmHWM`` its own), its output in ``log`` as it runs;
    ``log=None`` (``--in-process``): here, the peak reset first. Adds other processes' CPU use
    and ``process_seconds`` (the interpreter's life, imports included, less our own hashing)."""
    import gc

    print(f"--- phase {name} " + (f"(log: {log})" if log else "(in process)"), flush=True)
    if log is None:
        gc.collect()
        with contextlib.suppress(OSError):  # VmHWM := VmRSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        watch = CpuWatch()
        result = execute(name, ctx) | watch.stop()
        result |= {"process_seconds": None, "wall_seconds": result["seconds"]}
    else:
        files = [work / f"{name}.ctx.json", work / f"{name}.json"]
        files[0].write_text(json.dumps(ctx))
        watch = CpuWatch()
        with log.open("w") as fh:
            proc = subprocess.run([sys.executable, __file__, "--phase", name, "--ctx", str(files[0]),
                                   "--result", str(files[1])], stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"phase {name} failed (log: {log}):\n{log.read_text()[-4000:]}")
        result = json.loads(files[1].read_text()) | watch.stop()
        result["process_seconds"] = result["wall_s"] - result.get("excluded_seconds", 0.0)
        result["wall_seconds"] = result["process_seconds"]
    frac, proc_s = result.get("other_cpu_fraction"), result["process_seconds"]
    print(f"    {name}: {result['seconds']:.2f} s"
          + ("" if proc_s is None else f" ({proc_s:.2f} s as a process)")
          + f", peak RSS {result['peak_rss_mb']:.0f} MiB" + ("" if frac is None else
          f", other CPU {frac:.2f} core" + (" (LOADED)" if result["loaded"] else "")), flush=True)
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
    dm = SpamDataModule(source=str(source), data_dir=str(work / "data" / "sms_spam"),
                        context_length=MODEL_CONFIGS[args.model]["context_length"])
    dm.prepare_data()
    dm.setup("fit")
    splits = (dm.train_dataset, dm.val_dataset, dm.test_dataset)
    texts, lengths = [t for ds in splits for t in ds.texts], [n for ds in splits for n in ds.lengths]
    (work / "texts.json").write_text(json.dumps(texts))
    for run, name in (("bundle_run", args.model), ("tiny_bundle_run", "gpt2-tiny")):
        model = random_classifier(name, args.seed, book=False)  # a bundle holds our GPTModel
        torch.nn.init.zeros_(model.out_head.bias)  # HF's score has no bias
        save_bundle(work / run, model, class_names=["ham", "spam"], token="flexible",
                    max_length=dm.max_length, padding="longest", pad_token_id=PAD)
    return {"model": args.model, "seed": args.seed, "epochs": args.epochs, "source": str(source),
            "data_dir": str(work / "data" / "sms_spam"), "work": str(work),
            "texts": str(work / "texts.json"), "num_texts": len(texts), "max_length": dm.max_length,
            "bundle_run": str(work / "bundle_run"), "tiny_bundle_run": str(work / "tiny_bundle_run"),
            "mean_tokens": sum(lengths) / len(lengths), "batch_size": args.batch_size,
            "threads": args.threads, "device": args.device}


def sweep_phase(args: argparse.Namespace, ctx: dict[str, Any], run: Callable) -> dict[str, Any]:
    """The same job for each of ``--sweep-seeds``, each building its own trunk cache, then all
    sharing one on disk; every job loads one fixed random checkpoint (the trunk must not depend
    on the seed, as with pretrained weights). Speed-up: sum of the jobs' process times."""
    seeds = [int(x) for x in args.sweep_seeds.split(",") if x.strip()]
    experiment, keys = f"experiment={args.sweep_experiment}", ctx["cache_keys"]
    base = {"seeds": seeds, "overrides": [experiment], "speedup": None}
    if not {"shared", "dir"} <= set(keys):
        reason = f"the config has no cache.shared / cache.dir yet (cache keys: {', '.join(keys)})"
        print(f"--- phase f skipped: {reason}", flush=True)
        return {**base, "reason": reason, "seconds": None, "wall_seconds": None}
    ckpt, jobs = Path(ctx["work"]) / "sweep_weights" / "model.safetensors", []
    ckpt.parent.mkdir(exist_ok=True)
    write_random_hf_safetensors(ckpt, args.model, seed=args.seed)
    for shared, seed in itertools.product((False, True), seeds):
        tag = f"_{'shared' if shared else 'own'}_s{seed}"
        extra = [experiment, "model.weights=pretrained", f"model.checkpoint={ckpt}",
                 f"cache.shared={str(shared).lower()}",
                 *([f"cache.dir={ckpt.parents[1] / 'shared-trunk-cache'}"] if shared else [])]
        job_ctx = {**ctx, "seed": seed, "job_overrides": extra, "job_tag": tag}
        jobs.append(run("f_job", job_ctx, f"f{tag}") | {"shared": shared, "seed": seed})
    return base | tables.sweep_summary(jobs)


STARTUP_MESSAGE = "WINNER!! You have been selected to receive a $900 prize reward. Call now"


def startup_phase(ctx: dict[str, Any], repeat: int = 3) -> dict[str, Any]:
    """What a user waits for before any work (issue 12: < 1 s, < 3 s): the imports, ``--help``
    and a gpt2-tiny bundle's cold first prediction, ``repeat`` times each, interleaved."""
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
    cpu, medians = watch.stop(), {name: statistics.median(w) for name, w in walls.items()}
    for name, sec in medians.items():
        print(f"    {name}: {sec:.2f} s (runs: {', '.join(f'{w:.2f}' for w in walls[name])})")
    total = sum(map(sum, walls.values()))
    return {"seconds": total, "wall_seconds": total, "median_seconds": medians,
            "commands": {n: " ".join([Path(c[0]).name, *c[1:]]) for n, c in cmds.items()},
            "runs_seconds": walls, "other_cpu_fraction": cpu["other_cpu_fraction"],
            "loaded": cpu["loaded"]}


# ============================================================================ main
def machine_info(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": platform.processor() or platform.machine()}
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        flags = next((ln for ln in lines if ln.startswith("flags")), "")
        info |= {"cpu_model": (models or [info["cpu_model"]])[0], "amx": "amx_bf16" in flags,
                 "avx512_bf16": "avx512_bf16" in flags}
    info["cores"] = os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        info["cores_usable"] = len(os.sched_getaffinity(0))
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


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
    args = p.parse_args(argv)
    args.epochs = args.epochs or (1 if args.quick else 5)
    args.sweep_seeds = args.sweep_seeds or ("1,2" if args.quick else "1,2,3")
    args.wait_idle = (0.0 if args.quick else 60.0) if args.wait_idle is None else args.wait_idle
    return args


def main(argv: list[str] | None = None) -> int:
    import shlex

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
    if unknown := [n for n in selected if n not in (*tables.TRAIN_PHASES, *tables.INFER_PHASES, "f", "s")]:
        raise SystemExit(f"unknown phase {unknown[0]!r}")
    out = Path(args.out).resolve()
    logs = Path(args.logs).resolve() if args.logs else out
    for folder in (out, logs):
        folder.mkdir(parents=True, exist_ok=True)
    load_start, peak_seconds, peaks, seq = list(os.getloadavg()), 1.0 if args.quick else 3.0, [], itertools.count(1)

    def peak_now(when: str, seconds: float = peak_seconds, sizes: tuple | None = None) -> dict:
        idle = wait_for_idle(args.wait_idle)
        print(f"matmul peak ({when}) ... ", end="", flush=True)
        watch = CpuWatch()
        got = measure_peak(seconds, sizes, args.device)
        frac = watch.stop()["other_cpu_fraction"]
        print(f"fp32 {got['fp32']:.0f} GFLOP/s, bf16 {got['bf16']:.0f} GFLOP/s"
              + ("" if frac is None else f", other CPU {frac:.2f} core"), flush=True)
        peaks.append({"when": when, **got, "other_cpu_fraction": frac, "idle_wait_s": idle["waited_s"]})
        return {k: max(m[k] for m in peaks) for k in DTYPES}

    def run(name: str, ctx: dict[str, Any], label: str | None = None) -> dict[str, Any]:
        idle, n = wait_for_idle(args.wait_idle), next(seq)
        log = None if args.in_process else logs / f"{label or f'{name}_{n}'}.log"
        return run_phase(name, ctx, work, log) | {"seq": n, "idle_wait_s": idle["waited_s"]}

    with tempfile.TemporaryDirectory(prefix="spam-bench-") as tmp:
        work = Path(tmp)
        ctx = prepare(args, work)
        context = {k: v for k, v in ctx.items()
                   if k not in ("work", "texts", "bundle_run", "tiny_bundle_run", "data_dir")}
        machine = machine_info(args.device)  # earlier runs' phases: refused now if not comparable
        earlier, merged_from = merge_phases(args.merge, set(selected), context, machine, args.quick)
        ctx["cache_keys"] = sorted(compose([], work / "probe").cache.keys())  # cache.shared yet?
        peak_now("start")
        from spam_lightning.model.gpt import MODEL_CONFIGS
        from spam_lightning.model.trunk_cache import TrunkCache

        rows = {"trunk_batch": inspect.signature(TrunkCache).parameters["max_batch_tokens"].default,
                "inference_batch": max(1, round(args.batch_size * ctx["mean_tokens"]))}
        print("GEMM ceiling (the model's own matmul shapes) ... ", end="", flush=True)
        ceiling = measure_gemm_ceiling(MODEL_CONFIGS[args.model]["emb_dim"], rows, peak_seconds,
                                       args.device)
        print(", ".join(f"{p} {r['rows']} rows {r['gflops']:.0f}" for p, by in ceiling.items()
                        for r in by.values()) + " GFLOP/s", flush=True)
        runs: dict[str, list[dict]] = {}
        for group in (tables.TRAIN_PHASES, tables.INFER_PHASES):  # interleaved: a, b, c, a, ...
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
        best = peak_now("end")  # the machine may be busier at one end of a long run than the other
    big = (8192, 16384) if args.device.startswith("cuda") else (2048, 4096, 6144)
    peak, notes = cap_mfu(phases, best, lambda: peak_now("re-measured, larger", peak_seconds * 4, big))
    results = tables.results_json(
        args.quick, shlex.join(["python", "scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
        phases | earlier, merged_from, peak, peaks, ceiling, notes,
        context=context | {"repeat": args.repeat}, machine=machine,
        threads=args.threads or torch.get_num_threads(), torch=torch.__version__,
        isolation="in-process" if args.in_process else "one subprocess per phase",
        load_average={"start": load_start, "end": list(os.getloadavg())})
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
