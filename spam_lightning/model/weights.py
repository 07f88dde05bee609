"""Build GPT-2 models: random init, or OpenAI's pretrained weights in Hugging Face format.

The book loads TensorFlow checkpoints; we read the Hub's `model.safetensors` (no pickle). Its
`Conv1D` weights are `nn.Linear`'s transposed and `c_attn` fuses query/key/value, so each tensor
is transposed and split into the book's `GPTModel`, built on the meta device: at most one copy of
the weights is ever allocated.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

from spam_lightning.model.gpt import GPTModel
from spam_lightning.model.sizes import CFG_KEYS, HUB_REPOS, MODEL_CONFIGS

# Used when a checkpoint comes without config.json: the released sizes fix n_heads by width.
HEADS_BY_EMB_DIM = {MODEL_CONFIGS[n]["emb_dim"]: MODEL_CONFIGS[n]["n_heads"] for n in HUB_REPOS}
SAFETENSORS_SUFFIXES = (".safetensors",)
# Plain tensor state dicts only, read with torch.load(weights_only=True).
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # looked for inside a folder
HUB_FILE = "model.safetensors"  # what is downloaded for a size name
# The whole availability check (DNS, connection, answer), once, without the Hub client's retries
HUB_CHECK_TIMEOUT = 1.0
WEIGHTS_FIX = (
    "Fix: train from scratch with model.weights=random, or pass a copy downloaded elsewhere with "
    "model.checkpoint=/path/to/model.safetensors, or go online once to download them into the cache."
)

# Non-parameter tensors in GPT-2 files: old causal-mask buffers and the LM head (tied to `wte`)
_IGNORED = re.compile(r"^(h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight)$")
_BLOCK = re.compile(r"^h\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unsafe, unreadable, or not the expected tensors."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither in the Hugging Face cache nor downloadable."""


def build_gpt(name: str, weights: str = "pretrained", checkpoint: str | Path | None = None,
              causal_mask: bool = True, drop_rate: float = 0.0, compile: bool = False,
              gradient_checkpointing: bool = False, **size_overrides: Any) -> GPTModel:
    """The model the `model` config group describes (`build_gpt(**cfg.model)`; `compile` and
    `gradient_checkpointing` are the caller's job). `weights="random"`: torch's default init (seed before calling); `"pretrained"`:
    `checkpoint`, else the Hub's `name`, of the sizes of `name` plus `size_overrides`."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_CONFIGS)}")
    if unknown := sorted(set(size_overrides) - set(CFG_KEYS)):
        raise TypeError(f"build_gpt got unknown model options {unknown}; allowed: {list(CFG_KEYS)}")
    cfg = {**MODEL_CONFIGS[name], **{k: v for k, v in size_overrides.items() if v is not None}}
    cfg.update(drop_rate=drop_rate, causal_mask=causal_mask)
    if problems := weights_problems(name, weights, checkpoint):
        raise ValueError(problems[0])
    if weights == "random":
        return GPTModel(cfg)
    source = checkpoint if checkpoint is not None else name
    return load_gpt2(source, causal_mask=causal_mask, drop_rate=drop_rate, config=cfg)


def weights_problems(name: str, weights: Any, checkpoint: Any) -> list[str]:
    """``model.weights`` and ``model.checkpoint`` against each other and the size ``name``."""
    if weights == "random" and checkpoint is not None:
        return [f"model.checkpoint={checkpoint} is ignored with model.weights=random; drop one of "
                "them (checkpoints need model.weights=pretrained)"]
    if weights == "pretrained" and checkpoint is None and name in MODEL_CONFIGS and name not in HUB_REPOS:
        return [f"model {name} has no pretrained weights; use model.weights=random or "
                "model.checkpoint=/path/to/model.safetensors"]
    return [] if weights in ("pretrained", "random") else [
        f"model.weights={weights!r} is unknown; allowed: pretrained, random"]


def load_gpt2(source: str | Path, *, causal_mask: bool = True, drop_rate: float = 0.0,
              config: Mapping[str, Any] | None = None) -> GPTModel:
    """GPT-2 with pretrained weights from a size name (Hub), an HF folder or a weights file.
    `config` gives the sizes to expect (default: the size name's, or the file's shapes)."""
    path = resolve_weights_file(source)
    if config is None and str(source) in MODEL_CONFIGS:
        config = MODEL_CONFIGS[str(source)]
    shapes, get = open_tensors(path)
    expected, plan, layout = _checked_plan(path, shapes, config)
    expected.update(drop_rate=drop_rate, causal_mask=causal_mask)

    # Build without storage, then allocate each parameter once (the head is tied to tok_emb)
    with torch.device("meta"):
        model = GPTModel(expected)
    for child_name, child in model.named_children():
        if child_name != "out_head":
            child.to_empty(device="cpu")
    model.out_head.weight = model.tok_emb.weight
    params = dict(model.named_parameters())
    not_finite = []
    with torch.no_grad():
        for key, entry in plan.items():
            with get(layout[key]) as tensor:
                if tensor.is_floating_point() and tensor.numel() and not all(
                    math.isfinite(float(v)) for v in torch.aminmax(tensor)
                ):  # min/max propagate NaN, see inf, and allocate nothing tensor-sized
                    not_finite.append(layout[key])
                if entry.transpose:  # Conv1D [in, out] -> Linear [out, in]
                    tensor = tensor.T
                parts = tensor.chunk(len(entry.targets), dim=0)  # c_attn -> q, k, v
                for target, part in zip(entry.targets, parts, strict=True):
                    params[target].copy_(part)
                del tensor, parts
    if not_finite:  # training on them gives a NaN loss from the first step
        raise CheckpointError(f"checkpoint {path}: {len(not_finite)} tensor(s) hold NaN or infinite "
                              f"values: {', '.join(not_finite[:5])}{' ...' if len(not_finite) > 5 else ''}; "
                              "the file is corrupt or was saved from a diverged run: use other weights")
    return model


def check_checkpoint(source: str | Path, sizes: Mapping[str, Any]) -> None:
    """Raise a CheckpointError naming every missing, unexpected or mis-shaped tensor if the
    checkpoint at ``source`` is not GPT-2 of ``sizes``; reads only the file's header."""
    path = resolve_weights_file(source)
    _checked_plan(path, open_tensors(path)[0], sizes)


def _checked_plan(path: Path, shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any] | None
                  ) -> tuple[dict[str, Any], dict[str, _Entry], dict[str, str]]:
    """(sizes, plan, layout) of a checkpoint holding GPT-2 of ``config`` (None: its own sizes), or a
    CheckpointError; ``layout``: Hub key -> the file's (which may be `transformer.`-prefixed)."""
    layout = {key.removeprefix("transformer."): key for key in shapes}
    found = infer_config({k: shapes[orig] for k, orig in layout.items()}, path, strict=config is None)
    expected = dict(config if config is not None else found)
    plan = hf_plan(expected)
    _check_tensors(path, plan, shapes, layout, expected, found)
    return expected, plan, layout


def resolve_weights_file(source: str | Path) -> Path:
    """Size name -> cached Hub download; folder -> its weights file; file -> itself."""
    if str(source) in HUB_REPOS:
        return _download(str(source))
    path = Path(source).expanduser()
    if path.is_dir():
        if found := next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None):
            return found
        raise CheckpointError(f"{path} contains none of {', '.join(WEIGHT_FILES)}")
    if path.is_file():
        return path
    raise ValueError(f"{str(source)!r} is neither a model name (allowed: {', '.join(HUB_REPOS)}) "
                     "nor an existing checkpoint file or folder")


def hub_settings() -> tuple[str, str, bool]:
    """(cache folder, endpoint, offline) as huggingface_hub reads them from the environment,
    read now, not when huggingface_hub was imported."""
    from huggingface_hub import constants

    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache and os.environ.get("HF_HOME"):
        cache = os.path.join(os.environ["HF_HOME"], "hub")
    cache = os.path.expandvars(os.path.expanduser(cache)) if cache else constants.HF_HUB_CACHE
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    offline = any(os.environ.get(n, "").strip().upper() in ("1", "ON", "YES", "TRUE")
                  for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return cache, endpoint, offline


def cached_weights(name: str) -> Path | None:
    """The Hub file of size ``name`` in the Hugging Face cache, or None; no network."""
    from huggingface_hub import try_to_load_from_cache

    cache, _, _ = hub_settings()
    found = try_to_load_from_cache(HUB_REPOS[name], HUB_FILE, cache_dir=cache)
    return Path(found) if isinstance(found, str) else None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect (to the file's storage) is the answer itself


def _probe(url: str, timeout: float) -> str | None:
    """None if the Hub serves ``url``, else why not: one HEAD request (urllib), no retries, a hard
    deadline of ``timeout`` seconds whatever DNS or the network do."""
    answer: dict[str, str | None] = {}

    def head() -> None:
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "spam-lightning"})
        try:
            with urllib.request.build_opener(_NoRedirect).open(request, timeout=timeout):
                answer["reason"] = None
        except urllib.error.HTTPError as err:
            answer["reason"] = (None if err.code < 400  # a redirect to the file's storage
                                else "it has no such file (HTTP 404)" if err.code == 404
                                else f"it answered HTTP {err.code}")
        except (OSError, ValueError) as err:  # URLError, timeouts, refused connections, bad URL
            cause = getattr(err, "reason", err)
            if not isinstance(cause, TimeoutError):
                answer["reason"] = f"it is unreachable ({type(cause).__name__}: {cause})"

    thread = threading.Thread(target=head, name="hub-check", daemon=True)
    thread.start()
    thread.join(timeout)  # the deadline, whatever DNS or a stalled connection do
    return answer.get("reason", f"it did not answer within {timeout:g} s")


def check_weights_available(name: str, timeout: float = HUB_CHECK_TIMEOUT) -> str:
    """Where the weights of ``name`` will come from: ``"cache"`` (no network) or ``"hub"`` (one
    quick request, unless HF_HUB_OFFLINE); else a WeightsUnavailableError naming the fixes."""
    if name not in HUB_REPOS:
        raise ValueError(f"{name} has no pretrained weights; allowed: {', '.join(HUB_REPOS)}")
    if cached_weights(name) is not None:
        return "cache"
    cache, endpoint, offline = hub_settings()
    repo = HUB_REPOS[name]
    if offline:
        reason = "HF_HUB_OFFLINE is set: only the cache may be used"
    else:
        reason = _probe(f"{endpoint}/{repo}/resolve/main/{HUB_FILE}", timeout)
        if reason is None:
            return "hub"
        reason = f"the Hub ({endpoint}) cannot serve them: {reason}"
    raise _unavailable(name, cache, reason)


def _unavailable(name: str, cache: str, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"model.weights=pretrained needs the weights of {name} ({HUB_REPOS[name]}/{HUB_FILE}): "
        f"they are not in the Hugging Face cache ({cache}) and {reason}. {WEIGHTS_FIX}"
    )


def _download(name: str) -> Path:
    """The cached `model.safetensors` (no network), else a download via huggingface_hub."""
    from huggingface_hub import hf_hub_download

    if (cached := cached_weights(name)) is not None:
        return cached
    cache, endpoint, _ = hub_settings()
    repo = HUB_REPOS[name]
    try:
        return Path(hf_hub_download(repo, HUB_FILE, cache_dir=cache, endpoint=endpoint))
    except OSError as err:  # offline mode, not cached, connection and HTTP errors
        raise _unavailable(name, cache, f"downloading failed ({type(err).__name__}: {err})") from err


def open_tensors(path: Path) -> tuple[dict[str, tuple[int, ...]], Callable[[str], Any]]:
    """(shapes, get) of a weights file, read without running any code from it (safetensors, or a
    weights-only `torch.load`). ``get(key)`` is a context holding one tensor through its own
    short-lived memory map (one map held open would add the whole file to RSS)."""
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        state = torch_load_safely(
            path, "a plain tensor state dict", "Weights are read only from safetensors or with "
            "torch.load(weights_only=True), because a pickle can run arbitrary code; convert the "
            "file to .safetensors.")
        if not isinstance(state, Mapping) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise CheckpointError(f"{path} does not hold a flat {{name: tensor}} state dict")
        return {k: tuple(v.shape) for k, v in state.items()}, lambda key: nullcontext(state[key])
    if suffix not in SAFETENSORS_SUFFIXES:
        raise CheckpointError(f"refusing to load {path}: unsupported file type {suffix or '(none)'}; "
                              f"use {', '.join(SAFETENSORS_SUFFIXES)} (preferred) or a tensor-only "
                              f"state dict ({', '.join(TORCH_SUFFIXES)})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:  # validates the header
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as err:  # SafetensorError, OSError: truncated or not safetensors
        raise CheckpointError(f"cannot read {path} as safetensors: {err}") from err

    @contextmanager
    def get(key: str) -> Iterator[torch.Tensor]:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield handle.get_tensor(key)

    return shapes, get


def torch_load_safely(path: Path, what: str, why: str, mmap: bool = True, noun: str = "") -> Any:
    """`torch.load(weights_only=True)`: a crafted pickle fails before any of its code can run.
    The CheckpointError names the file, ``what`` it should have been and ``why`` this loader."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True,
                          mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:  # UnpicklingError for forbidden globals, anything for junk
        found = re.search(r"WeightsUnpickler error: (.+?)(?:\. Please|\n|$)", str(err))
        reason = found.group(1) if found else f"{type(err).__name__}: {str(err)[:200]}"
        raise CheckpointError(f"refusing to load {noun}{path}: it is not {what} ({reason}). {why}") from err


def infer_config(shapes: Mapping[str, tuple[int, ...]], path: Path, strict: bool = True) -> dict[str, Any]:
    """Sizes of a GPT-2 checkpoint from its tensor shapes (Hub keys); config.json fills gaps.
    `strict=False`: sizes that cannot be inferred stay None (the caller reports missing tensors)."""
    try:
        meta = json.loads((path.parent / "config.json").read_text())
    except (OSError, ValueError):  # no config.json, or not JSON
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    blocks = [int(m.group(1)) for key in shapes if (m := _BLOCK.match(key))]
    wte, wpe = shapes.get("wte.weight", ()), shapes.get("wpe.weight", ())
    sizes = {
        "vocab_size": wte[0] if len(wte) == 2 else meta.get("vocab_size"),
        "context_length": wpe[0] if len(wpe) == 2 else meta.get("n_positions"),
        "emb_dim": wte[1] if len(wte) == 2 else meta.get("n_embd"),
        "n_layers": max(blocks) + 1 if blocks else meta.get("n_layer"),
        "n_heads": meta.get("n_head"),
    }
    if sizes["n_heads"] is None:
        sizes["n_heads"] = HEADS_BY_EMB_DIM.get(sizes["emb_dim"])  # type: ignore[arg-type]
    unknown = [k for k, v in sizes.items() if not isinstance(v, int)]
    if strict and unknown:
        if unknown == ["n_heads"]:
            raise CheckpointError(f"cannot infer n_heads of {path} (emb_dim={sizes['emb_dim']} is not a "
                                  "released GPT-2 width); put the Hugging Face config.json (with "
                                  "n_head) next to it")
        raise CheckpointError(f"cannot infer {unknown} of {path}: it lacks wte.weight / wpe.weight / "
                              "h.N.* tensors and has no config.json; is this a GPT-2 checkpoint?")
    return {**sizes, "drop_rate": 0.0, "qkv_bias": True}


class _Entry(NamedTuple):
    shape: tuple[int, ...]  # shape in the file
    targets: tuple[str, ...]  # GPTModel parameters it fills, in order along dim 0
    transpose: bool = False


# The one GPT-2 layout table: a Hub tensor -> the GPTModel parameters it fills (along dim 0).
# Per block: "h.{i}." -> "trf_blocks.{i}.". Conv1D weights are [in, out]: transposed to nn.Linear's.
_QKV = ("att.W_query", "att.W_key", "att.W_value")
HF_LAYOUT = {"wte.weight": ("tok_emb.weight",), "wpe.weight": ("pos_emb.weight",),
             "ln_f.weight": ("final_norm.scale",), "ln_f.bias": ("final_norm.shift",)}
HF_BLOCK_LAYOUT = {
    "ln_1.weight": ("norm1.scale",), "ln_1.bias": ("norm1.shift",),
    "attn.c_attn.weight": tuple(f"{q}.weight" for q in _QKV),
    "attn.c_attn.bias": tuple(f"{q}.bias" for q in _QKV),
    "attn.c_proj.weight": ("att.out_proj.weight",), "attn.c_proj.bias": ("att.out_proj.bias",),
    "ln_2.weight": ("norm2.scale",), "ln_2.bias": ("norm2.shift",),
    "mlp.c_fc.weight": ("ff.layers.0.weight",), "mlp.c_fc.bias": ("ff.layers.0.bias",),
    "mlp.c_proj.weight": ("ff.layers.2.weight",), "mlp.c_proj.bias": ("ff.layers.2.bias",),
}
CONV1D = {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}


def model_shapes(cfg: Mapping[str, Any], num_classes: int | None = None) -> dict[str, tuple[int, ...]]:
    """The state dict shapes of a meta-device ``GPTModel(cfg)`` (with a ``num_classes`` head):
    what every file's header is compared with."""
    with torch.device("meta"):
        model = GPTModel({"drop_rate": 0.0, **cfg})
        if num_classes is not None:
            model.out_head = torch.nn.Linear(cfg["emb_dim"], num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def hf_plan(cfg: Mapping[str, Any]) -> dict[str, _Entry]:
    """Every tensor a GPT-2 checkpoint of size `cfg` must hold, keyed by its Hub name."""
    ours = model_shapes(cfg)
    layout = dict(HF_LAYOUT)
    for i in range(cfg["n_layers"]):
        layout |= {f"h.{i}.{k}": tuple(f"trf_blocks.{i}.{t}" for t in v) for k, v in HF_BLOCK_LAYOUT.items()}
    plan = {}
    for key, targets in layout.items():
        if targets[0] in ours:  # (no attention biases without qkv_bias)
            shape = (sum(ours[t][0] for t in targets), *ours[targets[0]][1:])
            conv1d = key.split(".", 2)[-1] in CONV1D
            plan[key] = _Entry(shape[::-1] if conv1d else shape, targets, conv1d)
    return plan


def _describe(cfg: Mapping[str, Any]) -> str:
    keys = ("emb_dim", "n_layers", "n_heads", "context_length", "vocab_size")
    return ", ".join(f"{k}={cfg[k]}" for k in keys)


def mismatch_lines(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                   most: int | None = None) -> list[str]:
    """``missing``, ``unexpected`` and ``wrong shape`` lines naming tensors (at most ``most`` of
    each), or [] when names and shapes agree."""
    groups = {
        "missing": [k for k in expected if k not in found],
        "unexpected": [k for k in found if k not in expected],
        "wrong shape": [
            f"{k} expected {list(expected[k])} found {list(found[k])}"
            for k in expected if k in found and tuple(found[k]) != tuple(expected[k])
        ],
    }
    lines = []
    for title, names in groups.items():
        if names:
            more = f", ... ({len(names) - most} more)" if most and len(names) > most else ""
            lines.append(f"{title} ({len(names)}): {', '.join(names[:most])}{more}")
    return lines


def _check_tensors(path: Path, plan: Mapping[str, _Entry], shapes: Mapping[str, tuple[int, ...]],
                   layout: Mapping[str, str], expected: Mapping[str, Any], found: Mapping[str, Any]) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    want = {layout.get(k, k): entry.shape for k, entry in plan.items()}  # the file's names
    have = {k: shapes[k] for k in sorted(shapes) if not _IGNORED.match(k.removeprefix("transformer."))}
    problems = mismatch_lines(want, have)
    if not problems:
        return
    lines = [f"checkpoint {path} does not match GPT-2 ({_describe(expected)}):"]
    lines += [f"  {line}" for line in problems]
    sizes = ("emb_dim", "n_layers", "context_length", "vocab_size")
    if all(isinstance(found[k], int) for k in sizes) and any(found[k] != expected[k] for k in sizes):
        lines.append(f"  the checkpoint looks like: {_describe(found)}")
    raise CheckpointError("\n".join(lines))
