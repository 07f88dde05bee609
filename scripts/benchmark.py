#!/usr/bin/env python
"""Benchmark (issues 6, 15, 22): the chapter's training job three ways, batch inference two ways.

Same random weights and SMS data everywhere: (a) the book's own code (PyPI ``llms_from_scratch``),
(b) ``experiment=chapter`` and (c) ``experiment=fast`` through ``spam_lightning.train.train``, (d)
the ``spam-classify`` engine (fp32, bf16) against (e) HF's ``GPT2ForSequenceClassification``, (f)
a seed sweep with own vs shared trunk caches, (s) start-up times; one interpreter per phase. FLOPs:
Lightning's ``measure_flops``; matmul peak, GEMM ceiling: ``torch.utils.benchmark.Timer``; the
results: ``scripts/benchmark_table.py``. Full run:
``python scripts/benchmark.py --repeat 3 --out docs --logs benchmark-results --readme``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_table as tables  # the results: medians, MFU, checks, --merge, tables
import benchmark_tools as tools  # the measuring tools: FLOPs, timers, memory, CPU, machine
from benchmark_table import HISTORY, cap_mfu, combine, merge_phases, summarize  # noqa: F401
from benchmark_tools import CpuWatch, FlopLog, busy_cpu_seconds, weights_digest  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
PAD, QUICK_LINES = 50256, 300
Ctx = dict[str, Any]


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
    for part in (model.trf_blocks[-1], model.final_norm):
        part.requires_grad_(True)
    return model


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


def phase_a(ctx: Ctx) -> dict[str, Any]:
    """``gpt_class_finetune.py`` by the book's functions and seeds: loaders (shuffling from the
    global RNG), model, head, optimizer (`python train.py` follows the same order)."""
    from importlib.metadata import version

    from llms_from_scratch.ch06 import SpamDataset, calc_accuracy_loader, train_classifier_simple
    from torch.utils.data import DataLoader

    from spam_lightning.data.tokens import get_tokenizer  # tiktoken's gpt2

    data, tok = Path(ctx["data_dir"]), get_tokenizer()
    sets = [SpamDataset(data / "train.csv", tok)]
    for split in ("validation", "test"):
        sets.append(SpamDataset(data / f"{split}.csv", tok, sets[0].max_length))
    torch.manual_seed(ctx["seed"])  # listing 6.5's loaders
    loaders = [DataLoader(d, batch_size=8, shuffle=not i, drop_last=not i)
               for i, d in enumerate(sets)]
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


class Probe(L.Callback):
    """What (b) and (c) measure inside ``train()``: the weights fit starts from (a digest), the
    block FLOPs of everything after (trunk cache included), each fit-loop step (batch start to
    the next; evaluation steps and an epoch's last left out), then the last epoch's batches
    again in a bare PyTorch loop on a copy of the model (warm-up pass, timed pass); overhead:
    the median per-batch difference. (``ThroughputMonitor`` logs windowed rates: it cannot pair
    a step with its replay.) ``excluded_seconds``: its own hashing and replay."""

    last: Probe | None = None

    def __init__(self) -> None:
        self.epoch, self.bare, self.replay_seconds, self.excluded_seconds = [], [], 0.0, 0.0
        self.pending, self.evaluated, self.eval_freq = None, False, None
        self.digest, self.flops, Probe.last = None, FlopLog(), self

    def setup(self, trainer, pl_module, stage) -> None:
        if self.digest is None:  # fit's setup, before the trunk cache and the first step
            t0 = time.perf_counter()
            self.digest = weights_digest(pl_module.model.state_dict())
            self.flops.attach(pl_module.model.trf_blocks)
            self.excluded_seconds += time.perf_counter() - t0

    def on_train_start(self, trainer, pl_module) -> None:
        self.eval_freq = next((c.eval_freq for c in trainer.callbacks
                               if hasattr(c, "eval_freq")), None)

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
        hp = pl_module.hparams
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True,
                                lr=hp.lr, weight_decay=hp.weight_decay)
        for timed, (batch, _) in itertools.product((False, True), self.epoch):  # warm-up first
            t = time.perf_counter()
            with trainer.precision_plugin.forward_context():
                x = batch["features"] if "features" in batch else batch["input_ids"]  # cached trunk
                logits = model(x, batch["lengths"], batch.get("start_block"))
            torch.nn.functional.cross_entropy(logits.float(), batch["labels"]).backward()
            opt.step()
            opt.zero_grad()
            self.bare += [time.perf_counter() - t] if timed else []
        self.replay_seconds = time.perf_counter() - t0
        self.excluded_seconds += self.replay_seconds
        print(f"Probe: {self.report()}", flush=True)

    def report(self) -> dict[str, Any]:
        loop, ms = [t for _, t in self.epoch], lambda xs: statistics.median(xs) * 1000
        if not loop or len(self.bare) != len(loop):
            return {"replay_seconds": self.replay_seconds}
        return {"steps_timed": len(loop), "step_ms": ms(loop), "bare_step_ms": ms(self.bare),
                "per_step_overhead_ms": ms([a - b for a, b in zip(loop, self.bare, strict=True)]),
                "replay_seconds": self.replay_seconds}


def phase_train(ctx: Ctx, experiment: str | None) -> dict[str, Any]:
    """``train.train(cfg)`` as ``python train.py`` runs it, timed whole (data, model, cache, fit,
    final evaluation, bundle). ``experiment=None``: a sweep job of phase (f), whose
    ``job_overrides`` say everything."""
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
        *ctx.get("job_overrides", [])]
    probe = ["+callbacks.benchmark_probe._target_=__main__.Probe"]  # not a setting
    shutil.rmtree(work / "run", ignore_errors=True)  # a repeat is a new run (a run's folder is only resumed)
    Probe.last = None
    start, written = time.perf_counter(), tools.bytes_written()
    metrics = train_mod.train(compose(overrides + (probe if experiment else []), work))
    seconds, written = time.perf_counter() - start, tools.bytes_written() - written
    history = json.loads((work / "run" / "history.json").read_text())
    got = Probe.last or Probe()  # sweep jobs (f): no probe; no digest, they load a checkpoint
    return {"seconds": seconds - got.excluded_seconds, "excluded_seconds": got.excluded_seconds,
            "steps": got.report() if Probe.last else {}, "overrides": overrides,
            "training_seconds": metrics["training_seconds"], "flops": got.flops.total(),
            "bytes_written": written, "run_folder_bytes": tools.folder_bytes(work / "run"),
            "precision": "bf16" if "bf16" in metrics["precision"] else "fp32",
            **({"weights": got.digest} if got.digest else {}),
            **{k: metrics[k] for k in ("train_accuracy", "val_accuracy", "test_accuracy",
                                       "examples_seen", "trunk_cache", "token", "padding")},
            "history": {k: history[k] for k in HISTORY}}


def timed_predictions(ctx: Ctx, predict: Callable, flops: FlopLog, **fields: Any) -> dict[str, Any]:
    """One untimed warm-up batch, then every message, timed (the Timer's clock: GPU-synced)."""
    texts = json.loads(Path(ctx["texts"]).read_text())
    predict(texts[: ctx["batch_size"]])  # allocator, kernels
    flops.calls.clear()
    start = benchmark.utils.timer.timer()
    labels = predict(texts).argmax(-1)
    seconds = benchmark.utils.timer.timer() - start
    return {"seconds": seconds, "msgs_per_s": len(texts) / seconds, "flops": flops.total(),
            "predictions": labels.tolist(),
            "spam_fraction": float(labels.float().mean()), **fields}


def phase_engine(ctx: Ctx, precision: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    from spam_lightning.inference.classify import Classifier

    digest = weights_digest(load_file(Path(ctx["bundle_run"]) / "bundle" / "model.safetensors"))
    clf = Classifier(ctx["bundle_run"], device=ctx["device"], precision=precision,
                     batch_size=ctx["batch_size"])
    return timed_predictions(ctx, clf.predict_proba, FlopLog().attach(clf.model.trf_blocks),
                             precision="bf16" if precision == "bf16" else "fp32", weights=digest)


def phase_hf(ctx: Ctx) -> dict[str, Any]:
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
    with torch.device("meta"):  # GELU (tanh) and LayerNorm eps 1e-5: GPT2Config's defaults
        model = GPT2ForSequenceClassification(GPT2Config(
            vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"], n_embd=cfg["emb_dim"],
            n_layer=cfg["n_layers"], n_head=cfg["n_heads"], resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, num_labels=2, pad_token_id=PAD))
    state = {f"transformer.{k}": v for k, v in tools.hub_tensors(ours, cfg).items()}
    missing, unexpected = model.load_state_dict(state | {"score.weight": ours["out_head.weight"]},
                                                strict=False, assign=True)
    missing += [n for n, t in model.named_buffers() if t.is_meta]
    if missing or unexpected:
        raise ValueError(f"HF state dict: missing {missing}, unexpected {unexpected}")
    del ours, state
    model = model.to(device).eval()

    def predict(texts: list[str]) -> torch.Tensor:
        logits = []
        for i in range(0, len(texts), size):
            ids = encode_texts(texts[i : i + size], max_length=ctx["max_length"])
            rows = [(x, max(map(len, ids)) - len(x)) for x in ids]
            input_ids = torch.tensor([x + [PAD] * p for x, p in rows], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * p for x, p in rows], device=device)
            logits.append(model(input_ids=input_ids, attention_mask=mask).logits)
        return torch.cat(logits).cpu()

    with torch.inference_mode():
        return timed_predictions(ctx, predict, FlopLog().attach(model.transformer.h),
                                 precision="fp32", weights=digest, attn_implementation=getattr(
                                     model.config, "_attn_implementation", None))


def phase_load(ctx: Ctx) -> dict[str, Any]:
    from spam_lightning.model.weights import build_gpt

    baseline, start = tools.proc_status_mb("VmRSS"), time.perf_counter()
    model = build_gpt(ctx["load_model"], weights="pretrained", checkpoint=Path(ctx["load_file"]))
    return {"seconds": time.perf_counter() - start, "baseline_rss_mb": baseline,
            "params_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}


PHASES: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "a": phase_a, "b": lambda ctx: phase_train(ctx, "chapter"),
    "c": lambda ctx: phase_train(ctx, "fast"), "f_job": lambda ctx: phase_train(ctx, None),
    "d_fp32": lambda ctx: phase_engine(ctx, "32"), "d_bf16": lambda ctx: phase_engine(ctx, "bf16"),
    "e_fp32": phase_hf, "load": phase_load}


def execute(phase: str, ctx: Ctx) -> dict[str, Any]:
    """Run one phase here, with its RSS before (``baseline_rss_mb``) and peak (``peak_rss_mb``)."""
    if ctx.get("threads"):
        torch.set_num_threads(ctx["threads"])
    baseline = tools.proc_status_mb("VmRSS")
    return {"baseline_rss_mb": baseline, **PHASES[phase](ctx),
            "peak_rss_mb": tools.proc_status_mb("VmHWM")}


def run_phase(name: str, ctx: Ctx, work: Path, log: Path | None) -> dict[str, Any]:
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
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--phase", name,
                                   "--ctx", str(files[0]), "--result", str(files[1])],
                                  stdout=fh, stderr=subprocess.STDOUT)
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


def prepare(args: argparse.Namespace, work: Path) -> Ctx:
    """Data splits, the message list for (d)/(e) and the inference bundles, made once."""
    from spam_lightning.data import SpamDataModule
    from spam_lightning.data.source import BUNDLED_PATH
    from spam_lightning.inference.bundle import save_bundle
    from spam_lightning.model.gpt import MODEL_CONFIGS

    source = Path(args.source or BUNDLED_PATH).expanduser().resolve()
    if args.quick:  # the first QUICK_LINES lines (44 spam: 88 balanced rows)
        with source.open("rb") as fh:
            (work / "SMSSpamCollection").write_bytes(b"".join(itertools.islice(fh, QUICK_LINES)))
        source = work / "SMSSpamCollection"
    data_dir, texts = work / "data" / "sms_spam", work / "texts.json"
    dm = SpamDataModule(source=str(source), data_dir=str(data_dir),
                        context_length=MODEL_CONFIGS[args.model]["context_length"])
    dm.prepare_data()
    dm.setup("fit")
    splits = (dm.train_dataset, dm.val_dataset, dm.test_dataset)
    texts.write_text(json.dumps([t for ds in splits for t in ds.texts]))
    lengths = [n for ds in splits for n in ds.lengths]
    for run, name in (("bundle_run", args.model), ("tiny_bundle_run", "gpt2-tiny")):
        model = random_classifier(name, args.seed, book=False)  # a bundle holds our GPTModel
        torch.nn.init.zeros_(model.out_head.bias)  # HF's score has no bias
        save_bundle(work / run, model, class_names=["ham", "spam"], token="flexible",
                    max_length=dm.max_length, padding="longest", pad_token_id=PAD)
    return {"model": args.model, "seed": args.seed, "epochs": args.epochs, "source": str(source),
            "data_dir": str(data_dir), "work": str(work), "texts": str(texts),
            "num_texts": len(lengths), "max_length": dm.max_length,
            "bundle_run": str(work / "bundle_run"),
            "tiny_bundle_run": str(work / "tiny_bundle_run"),
            "mean_tokens": sum(lengths) / len(lengths), "batch_size": args.batch_size,
            "threads": args.threads, "device": args.device}


def sweep_phase(args: argparse.Namespace, ctx: Ctx, run: Callable) -> dict[str, Any]:
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
    tools.write_random_hf_safetensors(ckpt, args.model, seed=args.seed)
    for shared, seed in itertools.product((False, True), seeds):
        tag = f"_{'shared' if shared else 'own'}_s{seed}"
        extra = [experiment, "model.weights=pretrained", f"model.checkpoint={ckpt}",
                 f"cache.shared={str(shared).lower()}",
                 *([f"cache.dir={ckpt.parents[1] / 'shared-trunk-cache'}"] if shared else [])]
        job_ctx = {**ctx, "seed": seed, "job_overrides": extra, "job_tag": tag}
        jobs.append(run("f_job", job_ctx, f"f{tag}") | {"shared": shared, "seed": seed})
    return base | tables.sweep_summary(jobs)


STARTUP_MESSAGE = "WINNER!! You have been selected to receive a $900 prize reward. Call now"


def startup_phase(ctx: Ctx, repeat: int = 3) -> dict[str, Any]:
    """What a user waits for before any work (issue 12: < 1 s, < 3 s): the imports, ``--help``
    and a gpt2-tiny bundle's cold first prediction, ``repeat`` times each, interleaved."""
    py = sys.executable
    script = Path(py).with_name("spam-classify")  # the console script, as a user types it
    classify = [str(script)] if script.is_file() else [
        py, "-m", "spam_lightning.inference.classify"]
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


OPTIONS = {  # flag: (argparse keywords, help)
    "--model": ({}, "gpt2-small (default; gpt2-tiny with --quick), gpt2-tiny, ..."),
    "--epochs": ({"type": int}, "training epochs (default 5; 1 with --quick)"),
    "--quick": ({"action": "store_true"},
                "a smoke run of every phase in about a minute: gpt2-tiny (unless --model), 300 "
                "data lines, 1 epoch, every phase in this process (--in-process), start-up "
                "commands once; its figures are not results"),
    "--source": ({}, "the SMSSpamCollection file (default: the copy bundled in the package)"),
    "--out": ({"default": "benchmark-results"},
              "folder for benchmark.json/.md (the committed ones: --out docs)"),
    "--logs": ({}, "folder for the phases' logs (default: --out)"),
    "--phases": ({"default": "a,b,c,d_fp32,d_bf16,e_fp32,f,s"},
                 "comma-separated subset of a,b,c,d_fp32,d_bf16,e_fp32,f,s (s: start-up times)"),
    "--merge": ({"action": "append", "default": [], "metavar": "JSON"},
                "take the phases not run now from this earlier benchmark.json (each keeps its "
                "date and command); may be given more than once"),
    "--repeat": ({"type": int, "default": 1},
                 "run (a),(b),(c) (and (d),(e)) N times, interleaved; medians reported"),
    "--sweep-experiment": ({"default": "chapter"}, "phase (f)'s experiment"),
    "--sweep-seeds": ({}, "phase (f)'s seeds, one job each (default 1,2,3; 1,2 with --quick)"),
    "--wait-idle": ({"type": float, "metavar": "S"},
                    "before the peak and each phase, wait up to S s for other processes to use "
                    "< 10%% of a core (default 60; 0 with --quick)"),
    "--device": ({"default": "cpu"}, "cpu (default) or cuda: where phases run"),
    "--batch-size": ({"type": int, "default": 64}, "inference batch size"),
    "--threads": ({"type": int}, "torch.set_num_threads in every phase"),
    "--seed": ({"type": int, "default": 123}, None),
    "--in-process": ({"action": "store_true"},
                     "run every phase in this process (faster start; peak RSS less clean)"),
    "--readme": ({"nargs": "?", "const": str(REPO / "README.md"), "metavar": "README"},
                 "then regenerate README.md's benchmark table"),
    "--load-test": ({"metavar": "MODEL"},
                    "also measure loading a random MODEL-shaped safetensors (e.g. gpt2-xl)"),
    **{hidden: ({}, argparse.SUPPRESS) for hidden in ("--phase", "--ctx", "--result")},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, (kwargs, text) in OPTIONS.items():
        p.add_argument(flag, help=text, **kwargs)
    args = p.parse_args(argv)
    args.epochs = args.epochs or (1 if args.quick else 5)
    args.model = args.model or ("gpt2-tiny" if args.quick else "gpt2-small")
    args.in_process = args.in_process or args.quick  # one interpreter: imports paid once
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
    if bad := set(selected) - {*tables.TRAIN_PHASES, *tables.INFER_PHASES, "f", "s"}:
        raise SystemExit(f"unknown phase {sorted(bad)[0]!r}")
    out = Path(args.out).resolve()
    logs = Path(args.logs).resolve() if args.logs else out
    for folder in (out, logs):
        folder.mkdir(parents=True, exist_ok=True)
    load_start, peak_s = os.getloadavg(), 1.0 if args.quick else 3.0
    peaks, seq = [], itertools.count(1)

    def peak_now(when: str, seconds: float = peak_s, sizes: tuple | None = None) -> dict:
        idle = tools.wait_for_idle(args.wait_idle)
        print(f"matmul peak ({when}) ... ", end="", flush=True)
        watch = CpuWatch()
        got = tools.measure_peak(seconds, sizes, args.device)
        frac = watch.stop()["other_cpu_fraction"]
        print(f"fp32 {got['fp32']:.0f} GFLOP/s, bf16 {got['bf16']:.0f} GFLOP/s"
              + ("" if frac is None else f", other CPU {frac:.2f} core"), flush=True)
        peaks.append({"when": when, **got, "other_cpu_fraction": frac,
                      "idle_wait_s": idle["waited_s"]})
        return {k: max(m[k] for m in peaks) for k in tools.DTYPES}

    def run(name: str, ctx: Ctx, label: str | None = None) -> dict[str, Any]:
        idle, n = tools.wait_for_idle(args.wait_idle), next(seq)
        log = None if args.in_process else logs / f"{label or f'{name}_{n}'}.log"
        return run_phase(name, ctx, work, log) | {"seq": n, "idle_wait_s": idle["waited_s"]}

    with tempfile.TemporaryDirectory(prefix="spam-bench-") as tmp:
        work = Path(tmp)
        ctx = prepare(args, work)
        context = {k: v for k, v in ctx.items()
                   if k not in ("work", "texts", "bundle_run", "tiny_bundle_run", "data_dir")}
        machine = tools.machine_info(args.device)  # earlier runs' phases: refused if another
        earlier, merged_from = merge_phases(args.merge, set(selected), context, machine, args.quick)
        ctx["cache_keys"] = sorted(compose([], work / "probe").cache.keys())  # cache.shared yet?
        peak_now("start")
        from spam_lightning.model.gpt import MODEL_CONFIGS
        from spam_lightning.model.trunk_cache import TrunkCache

        rows = {"trunk_batch": inspect.signature(TrunkCache).parameters["max_batch_tokens"].default,
                "inference_batch": max(1, round(args.batch_size * ctx["mean_tokens"]))}
        print("GEMM ceiling (the model's own matmul shapes) ... ", end="", flush=True)
        ceiling = tools.measure_gemm_ceiling(MODEL_CONFIGS[args.model]["emb_dim"], rows, peak_s,
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
            phases["s"] = startup_phase(ctx, repeat=1 if args.quick else 3) | {"seq": next(seq)}
        if args.load_test:
            file = work / "load" / "model.safetensors"
            file.parent.mkdir()
            print(f"--- writing a random {args.load_test} checkpoint", flush=True)
            size = tools.write_random_hf_safetensors(file, args.load_test)
            load_ctx = {**ctx, "load_file": str(file), "load_model": args.load_test}
            phases["load"] = run_phase("load", load_ctx, work, logs / "load.log") | {
                "model": args.load_test, "file_mb": size / 2**20}
        best = peak_now("end")  # the machine may be busier at one end of a long run than the other
    big = (8192, 16384) if args.device.startswith("cuda") else (2048, 4096, 6144)
    peak, notes = cap_mfu(phases, best, lambda: peak_now("re-measured, larger", peak_s * 4, big))
    command = shlex.join(["python", "scripts/benchmark.py",
                          *(sys.argv[1:] if argv is None else argv)])
    results = tables.results_json(
        args.quick, command, phases | earlier, merged_from, peak, peaks, ceiling, notes,
        context=context | {"repeat": args.repeat}, machine=machine,
        threads=args.threads or torch.get_num_threads(), torch=torch.__version__,
        isolation="in-process" if args.in_process else "one subprocess per phase",
        load_average={"start": list(load_start), "end": list(os.getloadavg())})
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
