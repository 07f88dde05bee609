#!/usr/bin/env python
"""Benchmark (issue 6): the chapter's training job three ways, and batch inference two ways.

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

Each phase runs in its own subprocess so its peak RSS (``VmHWM``) is its own; the parent
measures the matmul peak (fp32 and bf16) that model FLOPs utilisation is quoted against, then
writes ``benchmark.json`` and ``benchmark.md`` to ``--out``. FLOPs are counted from the shapes
each transformer block actually sees (hooks on the blocks; backward = 2x forward for blocks that
train), so MFU says how well the hardware is used and the ratios say how much work is avoided.

``--quick`` trims everything for smoke use: the first 600 lines of the data file, 1 epoch.
``--load-test gpt2-xl`` also writes a random gpt2-xl-shaped ``model.safetensors`` to a temporary
folder and measures the peak RSS of loading it with ``spam_lightning.model.weights`` (vs file size).
"""

from __future__ import annotations

import argparse
import hashlib
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


def measure_peak(seconds: float = 2.0) -> dict[str, float]:
    """Best GFLOP/s of large square matmuls, fp32 and bf16 (the denominators of MFU).

    Several sizes, best of many repeats: on a shared machine the best run is the closest to
    what the hardware can do. ``main`` measures before and after the phases and keeps the max.
    """
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in (1024, 2048, 4096):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / 3:
                t = time.perf_counter()
                a @ b
                best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
        out[name] = best
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
    """``spam_lightning/conf/train.yaml`` composed in-process, run paths under ``work``."""
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

    device = torch.device("cpu")
    model = random_classifier(ctx["model"], ctx["seed"]).to(device)
    digest = weights_digest(model.state_dict())
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
def phase_train(ctx: dict[str, Any], experiment: str) -> dict[str, Any]:
    import spam_lightning.train as train_mod

    work = Path(ctx["work"]) / f"run_{experiment}"
    overrides = [
        f"experiment={experiment}",
        f"model={ctx['model']}",
        "model.weights=random",
        f"seed={ctx['seed']}",
        f"data.source={ctx['source']}",
        f"paths.data_dir={Path(ctx['data_dir']).parent}",
        f"trainer.max_epochs={ctx['epochs']}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.enable_checkpointing=false",
        "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null",
        "logger=none",
    ]
    cfg = compose(overrides, work)
    digest = weights_digest(train_mod.build_model(cfg, 2).state_dict())

    meter = FlopMeter()
    build_model = train_mod.build_model

    def counted_build(cfg: Any, num_classes: int) -> torch.nn.Module:
        model = build_model(cfg, num_classes)
        meter.attach_gpt(model)
        return model

    train_mod.build_model = counted_build  # count what train() really runs
    try:
        start = time.perf_counter()
        metrics = train_mod.train(cfg)
        seconds = time.perf_counter() - start
    finally:
        train_mod.build_model = build_model
    history = json.loads((work / "run" / "history.json").read_text())
    return {
        "seconds": seconds,
        "training_seconds": metrics["training_seconds"],
        "flops": meter.flops,
        "precision": "bf16" if "bf16" in metrics["precision"] else "fp32",
        "weights": digest,
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
    clf = Classifier(ctx["bundle_run"], precision=precision, batch_size=ctx["batch_size"])
    meter = FlopMeter()
    meter.attach_gpt(clf.model)
    clf.predict_proba(texts[: ctx["batch_size"]])  # warm-up (allocator, kernels), untimed
    meter.flops = 0.0
    start = time.perf_counter()
    probs = clf.predict_proba(texts)
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
    model.eval()
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
        return model(input_ids=input_ids, attention_mask=mask).logits

    with torch.inference_mode():
        run(texts[: ctx["batch_size"]])  # warm-up, untimed
        meter.flops = 0.0
        start = time.perf_counter()
        logits = torch.cat([run(b) for b in timed_batches(texts, ctx["batch_size"])])
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


# ============================================================================ orchestration
def run_phase(name: str, ctx_file: Path, result_file: Path, log_file: Path) -> dict[str, Any]:
    """Run one phase in a fresh interpreter (so ``VmHWM`` is that phase's peak); its output
    goes to ``log_file`` as it runs (the chapter's prints show the progress of long phases)."""
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
    with log_file.open("w") as log:
        proc = subprocess.run(cmd, text=True, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_file.read_text()[-4000:]
        raise RuntimeError(f"phase {name} failed (log: {log_file}):\n{tail}")
    result = json.loads(result_file.read_text())
    print(
        f"    {name}: {result['seconds']:.2f} s, peak RSS {result['peak_rss_mb']:.0f} MiB",
        flush=True,
    )
    return result


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
    result = execute(name, ctx)
    gc.collect()
    print(
        f"    {name}: {result['seconds']:.2f} s, peak RSS {result['peak_rss_mb']:.0f} MiB",
        flush=True,
    )
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
        "batch_size": args.batch_size,
        "threads": args.threads,
    }


def ratio(x: float, y: float) -> float:
    return x / y if y else float("nan")


def max_history_diff(h1: dict[str, list[float]], h2: dict[str, list[float]]) -> float:
    diffs = [0.0]
    for key in ("train_losses", "val_losses", "train_accs", "val_accs"):
        if len(h1[key]) != len(h2[key]):
            return float("inf")
        diffs += [abs(a - b) for a, b in zip(h1[key], h2[key], strict=True)]
    return max(diffs)


def agreement(p1: list[int], p2: list[int]) -> float:
    return sum(a == b for a, b in zip(p1, p2, strict=True)) / max(1, len(p1))


def summarize(ctx: dict[str, Any], peak: dict[str, float], phases: dict[str, dict]) -> dict:
    a = phases.get("a")
    for res in phases.values():
        if "flops" in res:
            gflops = res["flops"] / res["seconds"] / 1e9
            res["gflops_per_s"] = gflops
            res["mfu"] = gflops / peak[res["precision"]]
    checks: dict[str, Any] = {}
    digests = {name: res["weights"] for name, res in phases.items() if "weights" in res}
    train_digests = {digests[n] for n in TRAIN_PHASES if n in digests}
    infer_digests = {digests[n] for n in INFER_PHASES if n in digests}
    checks["weights_identical"] = len(train_digests) <= 1 and len(infer_digests) <= 1
    if a:
        for name in ("b", "c"):
            if name in phases:
                phases[name]["speedup_vs_a"] = ratio(a["seconds"], phases[name]["seconds"])
        if "b" in phases:
            b = phases["b"]
            checks["a_vs_b_history_max_abs_diff"] = max_history_diff(a["history"], b["history"])
            checks["a_vs_b_accuracies_equal"] = all(  # train too: the same shuffled batches
                abs(a[f"{s}_accuracy"] - b[f"{s}_accuracy"]) < 1e-6 for s in ("train", "val", "test")
            )
    e = phases.get("e_fp32")
    if e:
        for name in ("d_fp32", "d_bf16"):
            if name in phases:
                phases[name]["speedup_vs_e"] = ratio(phases[name]["msgs_per_s"], e["msgs_per_s"])
        if "d_fp32" in phases:
            checks["d_vs_e_fp32_agreement"] = agreement(
                phases["d_fp32"]["predictions"], e["predictions"]
            )
    if "d_fp32" in phases and "d_bf16" in phases:
        checks["d_bf16_vs_fp32_agreement"] = agreement(
            phases["d_bf16"]["predictions"], phases["d_fp32"]["predictions"]
        )
    return checks


def markdown(results: dict[str, Any]) -> str:
    ctx, phases, checks, peak = (
        results["context"],
        results["phases"],
        results["checks"],
        results["peak_gflops"],
    )
    lines = [
        f"Model {ctx['model']} (random weights, seed {ctx['seed']}), {ctx['epochs']} epoch(s), "
        f"{ctx['num_texts']} messages; {results['machine']}; torch threads {results['threads']}; "
        f"matmul peak {peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} GFLOP/s bf16.",
        "",
    ]
    if any(name in phases for name in TRAIN_PHASES):
        lines += [
            "| run | wall s | speed-up vs (a) | val acc | test acc | peak RSS MiB (at start) "
            "| GFLOP/s | MFU |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    titles = {
        "a": "(a) chapter loop, plain PyTorch",
        "b": "(b) `experiment=chapter`",
        "c": "(c) `experiment=fast`",
        "d_fp32": "(d) `Classifier` fp32",
        "d_bf16": "(d) `Classifier` bf16",
        "e_fp32": "(e) HF `GPT2ForSequenceClassification` fp32",
    }
    for name in TRAIN_PHASES:
        if name in phases:
            r = phases[name]
            lines.append(
                f"| {titles[name]} | {r['seconds']:.1f} | {r.get('speedup_vs_a', 1.0):.1f}x | "
                f"{r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | "
                f"{r['peak_rss_mb']:.0f} ({r['baseline_rss_mb']:.0f}) | "
                f"{r['gflops_per_s']:.1f} | {r['mfu'] * 100:.0f}% |"
            )
    if any(name in phases for name in INFER_PHASES):
        lines += [
            "",
            "| inference | msgs/s | vs (e) | agreement | peak RSS MiB (at start) | GFLOP/s | MFU |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    agree = {
        "d_fp32": checks.get("d_vs_e_fp32_agreement"),
        "d_bf16": checks.get("d_bf16_vs_fp32_agreement"),
        "e_fp32": 1.0,
    }
    notes = {"d_fp32": "with (e)", "d_bf16": "with (d) fp32", "e_fp32": "-"}
    for name in INFER_PHASES:
        if name in phases:
            r = phases[name]
            a = agree[name]
            a_text = f"{a * 100:.2f}% {notes[name]}" if a is not None and name != "e_fp32" else "-"
            lines.append(
                f"| {titles[name]} | {r['msgs_per_s']:.1f} | {r.get('speedup_vs_e', 1.0):.1f}x | "
                f"{a_text} | {r['peak_rss_mb']:.0f} ({r['baseline_rss_mb']:.0f}) | "
                f"{r['gflops_per_s']:.1f} | {r['mfu'] * 100:.0f}% |"
            )
    if "load" in phases:
        r = phases["load"]
        lines += [
            "",
            f"Loading a {r['model']}-shaped safetensors file of {r['file_mb']:.0f} MiB: peak RSS "
            f"{r['peak_rss_mb']:.0f} MiB ({r['peak_rss_mb'] / r['file_mb']:.2f}x the file; "
            f"{r['baseline_rss_mb']:.0f} MiB before loading), {r['seconds']:.1f} s.",
        ]
    lines += ["", "Checks: " + ", ".join(f"{k} = {v}" for k, v in checks.items())]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--out", default="benchmark-results", help="folder for benchmark.json/.md")
    p.add_argument(
        "--phases",
        default="a,b,c,d_fp32,d_bf16,e_fp32",
        help="comma-separated subset of a,b,c,d_fp32,d_bf16,e_fp32",
    )
    p.add_argument("--batch-size", type=int, default=64, help="inference batch size")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every phase")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every phase in this process (faster start; peak RSS less clean)",
    )
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
    args = parse_args(argv)
    if args.phase:
        child(args.phase, Path(args.ctx), Path(args.result))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_start = list(os.getloadavg())  # other work on the machine skews every timing
    with tempfile.TemporaryDirectory(prefix="spam-bench-") as tmp:
        work = Path(tmp)
        ctx = prepare(args, work)
        ctx_file = work / "ctx.json"
        ctx_file.write_text(json.dumps(ctx))
        print("matmul peak ... ", end="", flush=True)
        peak = measure_peak(1.0 if args.quick else 3.0)
        print(f"fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s", flush=True)
        phases: dict[str, dict] = {}
        for name in [p.strip() for p in args.phases.split(",") if p.strip()]:
            if name not in TRAIN_PHASES + INFER_PHASES:
                raise SystemExit(f"unknown phase {name!r}")
            if args.in_process:
                phases[name] = run_in_process(name, ctx)
            else:
                phases[name] = run_phase(name, ctx_file, work / f"{name}.json", out / f"{name}.log")
        if args.load_test:
            file = work / "load" / "model.safetensors"
            file.parent.mkdir()
            print(f"--- writing a random {args.load_test} checkpoint", flush=True)
            size = write_random_hf_safetensors(file, args.load_test)
            ctx_load = {**ctx, "load_file": str(file), "load_model": args.load_test}
            ctx_file.write_text(json.dumps(ctx_load))
            phases["load"] = run_phase("load", ctx_file, work / "load.json", out / "load.log")
            phases["load"] |= {"model": args.load_test, "file_mb": size / 2**20}
            file.unlink()
        if phases:  # the machine may be busier at one end of a long run than at the other
            again = measure_peak(1.0 if args.quick else 3.0)
            peak = {k: max(v, again[k]) for k, v in peak.items()}
    checks = summarize(ctx, peak, phases)
    results = {
        "context": {
            k: v for k, v in ctx.items() if k not in ("work", "texts", "bundle_run", "data_dir")
        },
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "threads": args.threads or torch.get_num_threads(),
        "isolation": "in-process" if args.in_process else "one subprocess per phase",
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
        "torch": torch.__version__,
        "peak_gflops": peak,
        "phases": {
            k: {kk: vv for kk, vv in v.items() if kk != "predictions"} for k, v in phases.items()
        },
        "checks": checks,
    }
    (out / "benchmark.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "benchmark.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
