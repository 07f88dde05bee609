"""The inference bundle: a run folder's ``bundle/``, weights as safetensors (never a pickle) plus
``bundle.json``, which names the model family (``kind``) that loads it; no Hydra config or pretrained
checkpoint needed. Here: every family's folder and ``bundle.json``, and GPT-2's weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors.torch import load_file
from torch import nn

from spam_lightning.io_utils import write_json, write_safetensors
from spam_lightning.model.base import describe, digest, frozen_keys
from spam_lightning.model.classifier import ClassifierStateError, load_classifier_state
from spam_lightning.model.gpt import GPTModel
from spam_lightning.model.sizes import CFG_KEYS
from spam_lightning.model.weights import mismatch_lines, model_shapes
from spam_lightning.rules import is_int

BUNDLE_FORMAT = "spam-lightning-bundle/1"
BUNDLE_DIR = "bundle"
WEIGHTS = "model.safetensors"
CONFIG = "bundle.json"
# what the safetensors header may hold: the weights are cast to the model's dtype on load
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
REQUIRED_KEYS = ("model", "num_classes", "class_names", "token", "max_length", "padding", "pad_token_id")


class BundleError(RuntimeError):
    """A run folder without a usable inference bundle."""


def save_bundle(
    run_dir: str | Path, model: GPTModel, *, class_names: list[str], token: str, max_length: int,
    padding: str, pad_token_id: int, extra: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None, out: Path | None = None, kind: str = "gpt2",
    model_config: dict[str, Any] | None = None, tokenizer: str = "gpt2",
) -> Path:
    """Write ``run_dir/bundle/{model.safetensors,bundle.json}`` atomically. With ``base`` (the
    frozen base's identity and ``make_classifier`` options) only the tensors that trained are
    kept, LoRA adapters unmerged, and ``bundle.json`` names the base and its digest; without it,
    or when nothing was frozen (``trainable=all``), every tensor, LoRA merged: self-contained."""
    from spam_lightning.model.lora import LinearWithLoRA, merge_lora

    out = out or fresh_bundle_dir(run_dir)
    full = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    frozen = frozen_keys(model)
    if base is not None and frozen and all(full[k].dtype == torch.float32 for k in frozen):
        state = {k: v for k, v in full.items() if k not in frozen}
        base = {**base, "sha256": digest(full, frozen)}
    else:
        base = None
        if any(isinstance(m, LinearWithLoRA) for m in model.modules()):
            model = merge_lora(copy.deepcopy(model))
            full = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        state = full
    write_safetensors(out / WEIGHTS, state, {"format": "pt"})
    if model_config is None:  # GPT-2's keys (another family passes its model's own)
        model_config = {k: model.cfg[k] for k in CFG_KEYS}
        model_config["causal_mask"] = bool(model.cfg.get("causal_mask", True))
    return write_bundle_config(
        out, kind, class_names, model=model_config, token=token, max_length=int(max_length),
        padding=padding, pad_token_id=int(pad_token_id), tokenizer=tokenizer,
        # token=mean is the book's mean, padding included; bundles without this key are older,
        # from when token=mean averaged the real tokens only (read as masked_mean: model/gpt2.py)
        mean_includes_padding=True, **({"base": base} if base else {}), **(extra or {}),
    )


def find_bundle(path: str | Path) -> Path:
    """The bundle folder for a run folder (or the bundle folder itself), or a clear error."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"Run folder not found: {path}. Pass the folder of a finished training run.")
    for candidate in (path / BUNDLE_DIR, path):
        if (candidate / CONFIG).is_file():
            if not (candidate / WEIGHTS).is_file():
                raise BundleError(f"Incomplete bundle in {candidate}: {WEIGHTS} is missing.")
            return candidate
    raise BundleError(f"No inference bundle in {path}: expected {path / BUNDLE_DIR / CONFIG} and "
                      f"{path / BUNDLE_DIR / WEIGHTS}. The run may have failed or still be running; a "
                      "finished `python train.py` run writes them at the end.")


def _show(value: Any) -> str:
    """A short repr for messages: a corrupted field may hold megabytes."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    try:
        config = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise BundleError(f"{path} is not valid JSON ({err}); re-create the bundle.") from err
    except OSError as err:
        raise BundleError(f"{path}: cannot read it ({err.strerror or err}).") from err
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise BundleError(f"{path}: unknown format {_show(found)}, expected {BUNDLE_FORMAT!r}.")
    return config


def validate_config(config: dict[str, Any], where: str | Path = CONFIG) -> None:
    """Types and allowed values of a ``bundle.json``; the first problem as one ``BundleError`` line
    naming the field and the fix. Sizes are checked against the weights by ``check_weights``."""
    from spam_lightning.data.tokens import PADDING_MODES
    from spam_lightning.model.pooling import POOLINGS

    def fail(field: str, problem: str) -> NoReturn:
        raise BundleError(f"{where}: {field} {problem}")

    if missing := [k for k in REQUIRED_KEYS if k not in config]:
        raise BundleError(f"{where} lacks {missing}; re-create the bundle with a training run.")
    if not isinstance(model := config["model"], dict):
        fail("model", f"is {_show(model)}; it must be an object with {list(CFG_KEYS)}.")
    if missing := [k for k in CFG_KEYS if k not in model]:
        fail("model", f"lacks {missing}; re-create the bundle with a training run.")
    for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
        if not is_int(model[key]) or model[key] < 1:
            fail(f"model.{key}", f"is {_show(model[key])}; it must be an integer >= 1.")
    if model["emb_dim"] % model["n_heads"]:
        fail("model.n_heads", f"is {model['n_heads']}, which does not divide model.emb_dim="
             f"{model['emb_dim']}; use the n_heads the model was trained with.")
    rate = model["drop_rate"]
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < 1:
        fail("model.drop_rate", f"is {_show(rate)}; it must be a number in [0, 1) (0 for inference).")
    for key in ("qkv_bias", "causal_mask"):
        if key in model and not isinstance(model[key], bool):
            fail(f"model.{key}", f"is {_show(model[key])}; it must be true or false.")
    check_classes(config, where)
    if config["token"] not in [*POOLINGS]:  # a list: an unhashable value is refused too
        fail("token", f"is {_show(config['token'])}; allowed: {', '.join(POOLINGS)}.")
    if config["padding"] not in PADDING_MODES:
        fail("padding", f"is {_show(config['padding'])}; allowed: {', '.join(PADDING_MODES)}.")
    if not is_int(config["max_length"]) or config["max_length"] < 1:
        fail("max_length", f"is {_show(config['max_length'])}; it must be an integer >= 1 "
             "(the training run's data.max_length).")
    pad = config["pad_token_id"]
    if not is_int(pad) or not 0 <= pad < model["vocab_size"]:
        fail("pad_token_id", f"is {_show(pad)}; it must be a token id in 0..{model['vocab_size'] - 1} "
             "(GPT-2's is 50256).")
    if not isinstance(flag := config.get("mean_includes_padding", True), bool):
        fail("mean_includes_padding", f"is {_show(flag)}; it must be true or false.")
    if "base" in config:
        from spam_lightning.model.classifier import TRAINABLE
        from spam_lightning.model.sizes import MODEL_CONFIGS

        base = config["base"]
        if not (isinstance(base, dict) and base.get("source") in ("hub", "file", "random")
                and base.get("name") in MODEL_CONFIGS and isinstance(base.get("sha256"), str)
                and isinstance(base.get("classifier"), dict)
                and base["classifier"].get("trainable") in [*TRAINABLE]):
            fail("base", f"is {_show(base)}; it must name the frozen base (source hub, file or random, "
                 "name, sha256, classifier). Re-create the bundle with a training run.")
    if config.get("tokenizer", "gpt2") != "gpt2":
        fail("tokenizer", f"is {_show(config['tokenizer'])}; only 'gpt2' is supported.")


def check_classes(config: dict[str, Any], where: str | Path = CONFIG) -> None:
    """``num_classes`` and ``class_names`` (a bundle of any kind): types and duplicates. Their
    agreement with the head is checked against the weights (``check_weights``, the encoder's
    ``num_labels``, the baseline's arrays)."""
    count, names = config.get("num_classes"), config.get("class_names")
    if not is_int(count) or count < 1:
        raise BundleError(f"{where}: num_classes is {_show(count)}; it must be an integer >= 1.")
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise BundleError(f"{where}: class_names is {_show(names)}; it must be a list of non-empty strings.")
    if dup := next((n for n in names if names.count(n) > 1), None):
        raise BundleError(f"{where}: class_names names {_show(dup)} twice; each class needs its own name.")


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors header; no tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            slices = {key: fh.get_slice(key) for key in fh.keys()}
            header = {k: (str(p.get_dtype()), tuple(int(n) for n in p.get_shape())) for k, p in slices.items()}
    except Exception as err:  # SafetensorError (bad header, truncated), OSError
        raise _unreadable(path, err) from err
    return header


def _unreadable(path: Path, err: Exception) -> BundleError:
    return BundleError(f"{path} is not a readable safetensors file ({err}). Bundles hold weights only as "
                       "safetensors, never pickles; re-create it with a training run.")


def check_weights(
    config: dict[str, Any], header: dict[str, tuple[str, tuple[int, ...]]], config_path: Path,
    weights_path: Path,
) -> None:
    """A validated ``bundle.json`` against the weights' header (dtypes and shapes), before any
    model is built: each mismatch is one line naming the field."""
    for key, (dtype, _) in header.items():
        if dtype not in FLOAT_DTYPES:
            raise BundleError(f"{weights_path}: tensor {key} has dtype {dtype}; bundle weights are floating "
                              f"point ({', '.join(FLOAT_DTYPES)}). Re-create the bundle with a training run.")
    model = config["model"]

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in header or len(header[key][1]) != ndim:
            found = "is missing" if key not in header else f"has shape {list(header[key][1])}"
            raise BundleError(f"{weights_path}: tensor {key} {found}; this is not a bundle of a GPT-2 "
                              "classifier. Re-create it with a training run.")
        return header[key][1]

    def compare(field: str, claimed: Any, actual: Any, evidence: str) -> None:
        if claimed != actual:
            raise BundleError(f"{config_path}: {field} is {_show(claimed)} but {weights_path.name} has {actual} "
                              f"({evidence}); set {field} to {actual} or re-create the bundle.")

    tok, pos, head = shape("tok_emb.weight", 2), shape("pos_emb.weight", 2), shape("out_head.weight", 2)
    blocks = {k.split(".")[1] for k in header if k.startswith("trf_blocks.")}
    for field, actual, evidence in (("emb_dim", tok[1], f"tok_emb.weight is {list(tok)}"),
                                    ("vocab_size", tok[0], f"tok_emb.weight is {list(tok)}"),
                                    ("context_length", pos[0], f"pos_emb.weight is {list(pos)}"),
                                    ("n_layers", len(blocks), "transformer blocks")):
        compare(f"model.{field}", model[field], actual, evidence)
    has_bias = "trf_blocks.0.att.W_query.bias" in header
    if model["qkv_bias"] != has_bias:
        raise BundleError(f"{config_path}: model.qkv_bias is {str(model['qkv_bias']).lower()} but "
                          f"{weights_path.name} has {'' if has_bias else 'no '}attention biases (trf_blocks.0."
                          f"att.W_query.bias); set it to {str(has_bias).lower()} or re-create the bundle.")
    if len(names := config["class_names"]) != head[0]:
        raise BundleError(f"{config_path}: class_names has {len(names)} names but the class head of "
                          f"{weights_path.name} has {head[0]} rows (out_head.weight is {list(head)}); give "
                          f"exactly {head[0]} names or re-create the bundle.")
    compare("num_classes", config["num_classes"], head[0], f"out_head.weight is {list(head)}")
    found = {k: s for k, (_, s) in header.items()}
    problems = mismatch_lines(model_shapes(model, config["num_classes"]), found, most=1)
    if problems:
        raise BundleError(f"{weights_path} does not match {config_path.name}: tensors {'; '.join(problems)}. "
                          "Re-create the bundle with a training run.")


def load_bundle(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPTModel, dict]:
    """``(model, bundle.json)`` of a GPT-2 bundle."""
    folder = find_bundle(path)
    return load_gpt2(folder, _read_config(folder), map_location)


def load_gpt2(folder: Path, config: dict[str, Any], map_location: str | torch.device = "cpu") -> tuple[GPTModel, dict]:
    """``bundle.json`` is checked, and against the safetensors header (dtypes, shapes), before any
    model is built or tensor read: a corrupted config costs nothing. A bundle that names its
    ``base`` rebuilds it, checks its digest and loads the trained tensors on top."""
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    validate_config(config, config_path)
    header = read_header(weights_path)
    if "base" in config:
        check_delta(config, header, config_path, weights_path)
    else:
        check_weights(config, header, config_path, weights_path)
    state = read_state(weights_path, map_location)
    if "base" in config:
        return on_base(config, state, config_path).to(map_location).eval(), config
    model = GPTModel(config["model"])
    model.out_head = nn.Linear(config["model"]["emb_dim"], config["num_classes"])
    try:
        load_classifier_state(model, state)
    except ClassifierStateError as err:  # check_weights has compared every shape: a safety net
        first = str(err).replace("\n", " ")
        raise BundleError(f"{weights_path} does not match {config_path}: {first}") from err
    model.eval()
    return model, config


def read_state(weights_path: Path,
               map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The bundle's tensors (safetensors only: never unpickled), every one finite."""
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except Exception as err:  # SafetensorError (truncated data), OSError
        raise _unreadable(weights_path, err) from err
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise BundleError(f"{weights_path}: {len(bad)} tensor(s) hold NaN or infinite values (first: {bad[0]}); "
                          "the training run diverged. Retrain (e.g. with a lower optimizer.lr).")
    return state


def check_delta(config: dict[str, Any], header: dict, config_path: Path, weights_path: Path,
                base_classifier: Any = None) -> None:
    """The trained tensors against the classifier ``bundle.json`` describes (a meta model);
    ``base_classifier(config, weights)``: the family's (default: GPT-2's)."""
    if base_classifier is None:
        from spam_lightning.model.gpt2 import base_classifier

    with torch.device("meta"):
        model = base_classifier(config, weights="random")
    frozen = set(frozen_keys(model))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in frozen}
    for key, (dtype, _) in header.items():
        if dtype not in FLOAT_DTYPES:
            raise BundleError(f"{weights_path}: tensor {key} has dtype {dtype}; bundle weights are floating "
                              f"point ({', '.join(FLOAT_DTYPES)}). Re-create the bundle with a training run.")
    if problems := mismatch_lines(expected, {k: s for k, (_, s) in header.items()}, most=1):
        raise BundleError(f"{weights_path} does not match {config_path.name}: tensors {'; '.join(problems)}. "
                          "Re-create the bundle with a training run.")


def on_base(config: dict[str, Any], state: dict[str, torch.Tensor], config_path: Path,
            base_classifier: Any = None) -> GPTModel:
    """The base rebuilt from its identity (Hub cache, local file or seeded random init), its
    digest checked, the trained tensors loaded on top, LoRA merged."""
    if base_classifier is None:
        from spam_lightning.model.gpt2 import base_classifier
    from spam_lightning.model.lora import merge_lora
    from spam_lightning.model.weights import WeightsUnavailableError

    base = config["base"]
    fix = ("; or export a self-contained bundle on the machine that trained it: "
           f"spam-export {config_path.parent.parent} OUT")
    try:
        model = base_classifier(config)
    except (WeightsUnavailableError, OSError, ValueError) as err:
        raise BundleError(f"{config_path}: this bundle keeps only the trained tensors and needs its base, "
                          f"{describe(base)}, which cannot be loaded: {err}{fix}") from err
    own = model.state_dict()
    if (found := digest(own, [k for k in own if k not in state])) != base["sha256"]:
        raise BundleError(
            f"{config_path}: the base {describe(base)} rebuilt here has sha256 {found[:16]}…, not the "
            f"{base['sha256'][:16]}… the bundle was trained on (a different file, Hub revision or torch "
            f"version){fix}")
    model.load_state_dict(state, strict=False)
    return merge_lora(model)


# ------------------------------------------------------------------ every family
def fresh_bundle_dir(run_dir: str | Path) -> Path:
    """``run_dir/bundle`` without its old ``bundle.json``: until the new one is written last, the
    folder never passes for a complete bundle."""
    out = Path(run_dir) / BUNDLE_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).unlink(missing_ok=True)
    return out


def write_bundle_config(out: Path, kind: str, class_names: list[str], **fields: Any) -> Path:
    """``bundle.json`` (written last: its presence marks a complete bundle)."""
    config = {"format": BUNDLE_FORMAT, "kind": kind, "num_classes": len(class_names),
              "class_names": list(class_names), **fields}
    write_json(out / CONFIG, config)
    return out


def add_operating_point(out: Path, op: Any) -> Path:
    """``bundle.json`` with the run's operating point (``calibration.OperatingPoint``: temperature,
    threshold), rewritten atomically: the bundle stays complete throughout."""
    config = _read_config(out)
    config["operating_point"] = op.as_json()
    write_json(out / CONFIG, config)
    return out


def operating_point(config: dict[str, Any], where: str | Path = CONFIG) -> Any:
    """The bundle's ``calibration.OperatingPoint``; a bundle without one (older, a baseline):
    temperature 1 and the argmax, as before. A bad field is one ``BundleError`` line."""
    from spam_lightning.calibration import OperatingPoint

    try:
        return OperatingPoint.from_bundle(config, str(where))
    except ValueError as err:
        raise BundleError(str(err)) from None


def check_class_count(config: dict[str, Any], config_path: Path) -> None:
    """``check_classes``, and as many names as classes (GPT-2: checked against the head's rows)."""
    check_classes(config, config_path)
    if len(config["class_names"]) != config["num_classes"]:
        raise BundleError(f"{config_path}: class_names has {len(config['class_names'])} names but num_classes "
                          f"is {config['num_classes']}; re-create the bundle with a training run.")


def bad_field(config_path: Path, key: str, value: Any) -> BundleError:
    return BundleError(f"{config_path}: {key} is {_show(value)}; re-create the bundle.")


def open_bundle(path: str | Path) -> tuple[type, Path, dict[str, Any]]:
    """``(family class, bundle folder, bundle.json)`` for a bundle of any family."""
    from spam_lightning.model.family import family_class, known_kinds

    folder = find_bundle(path)
    config = _read_config(folder)
    kind = config.get("kind", "gpt2")
    try:
        return family_class(kind), folder, config
    except (KeyError, TypeError):
        raise BundleError(f"{folder / CONFIG}: kind {_show(kind)}; allowed: {', '.join(known_kinds())}.") from None


def export_main(argv: list[str] | None = None) -> int:
    """``spam-export RUN OUT``: RUN's bundle as a self-contained folder (every tensor, LoRA
    merged, no base to rebuild) for a machine without the base; it predicts as RUN's does."""
    import argparse
    import shutil
    import sys

    parser = argparse.ArgumentParser(prog="spam-export", description=export_main.__doc__.split(": ", 1)[1])
    parser.add_argument("run", help="a run folder (or its bundle/ folder)")
    parser.add_argument("out", type=Path, help="a new or empty folder for the self-contained bundle")
    args = parser.parse_args(argv)
    try:
        if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
            raise BundleError(f"{args.out} exists and is not an empty folder; pick a new OUT folder.")
        family, folder, config = open_bundle(args.run)
        if "base" not in config:  # already self-contained (older GPT-2 bundles, other families)
            shutil.copytree(folder, args.out, dirs_exist_ok=True)
        else:  # a family with delta bundles besides GPT-2 (the decoders) names its loader
            model, config = getattr(family, "load_model", load_gpt2)(folder, config)
            args.out.mkdir(parents=True, exist_ok=True)
            for extra in folder.iterdir():  # e.g. the decoders' tokenizer files
                if extra.is_file() and extra.name not in (WEIGHTS, CONFIG):
                    shutil.copy2(extra, args.out / extra.name)
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            write_safetensors(args.out / WEIGHTS, state, {"format": "pt"})
            write_json(args.out / CONFIG, {k: v for k, v in config.items() if k != "base"})  # last
    except (BundleError, OSError) as err:
        print(f"spam-export: {err}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"wrote {args.out} ({size:.1f} MB): spam-classify {args.out} MESSAGE")
    return 0
