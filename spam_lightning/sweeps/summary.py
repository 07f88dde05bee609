"""A sweep's ``summary.md`` and ``summary.csv``: one row per configuration with the book's columns,
seeds as mean ± std; a job without ``metrics.json`` (crashed, killed, running) is a failed row."""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from spam_lightning.io_utils import atomic_write

log = logging.getLogger(__name__)

BOOK_COLUMNS = ["Model", "Weights", "Trainable token", "Trainable layers", "Context length",
                "Training acc", "Validation acc", "Test acc", "Training time", "Device"]
SPLITS = ("train", "val", "test")
# the operating point's test metrics (metrics.json's ``test_*_op``: at the run's threshold, or the
# argmax): columns where some job has them (runs before calibration, baselines: none)
OP_COLUMNS = {"Test precision": "precision", "Test recall": "recall", "Test FPR": "fpr"}


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _context_label(max_length: Any, resolved: int | None) -> str:
    if max_length in (None, "null", "None"):
        return f"longest train ex. ({resolved})" if resolved else "longest train ex."
    if str(max_length) == "model":
        return f"context length ({resolved})" if resolved else "context length"
    return str(resolved or max_length)


def _job_record(job_dir: Path) -> dict[str, Any]:
    """What one job folder says about its configuration and results."""
    overrides = _load_yaml(job_dir / ".hydra" / "overrides.yaml") or []
    config = _load_yaml(job_dir / ".hydra" / "config.yaml") or {}
    key = ",".join(sorted(o for o in overrides if not o.split("=")[0].lstrip("+~") == "seed"))
    model, data = config.get("model") or {}, config.get("data") or {}
    try:  # metrics.json's values win over the config's: a family may record what it ran
        m = json.loads((job_dir / "metrics.json").read_text(encoding="utf-8")) or {}
    except (OSError, json.JSONDecodeError):
        m = {}
    token = m.get("token", (config.get("token") or {}).get("name"))
    return {
        "job": job_dir.name, "dir": job_dir, "config": key or "(defaults)",
        "Model": m.get("model", model.get("name")),
        "Weights": m.get("weights", model.get("weights")), "Trainable token": token,
        "Trainable layers": m.get("trainable", (config.get("trainable") or {}).get("name")),
        "Context length": ("—" if m.get("max_length", 0) is None  # no tokens: every word counts
                           else _context_label(data.get("max_length"), m.get("max_length"))),
        "padding": data.get("padding"), "seed": m.get("seed", config.get("seed")),
        "status": "ok" if m else "failed",
        # the book's row 19 (96.33 %) is token=mean, padding included; it has no masked_mean row
        "reference": None if token == "masked_mean" else (config.get("reference") or {}).get(
            "test_acc"),
        **{f"{split}_acc": m.get(f"{split}_accuracy") for split in SPLITS},
        "minutes": (m.get("training_seconds") or 0) / 60, "Device": m.get("device"),
        **{f"op_{k}": m.get(f"test_{k}_op") for k in OP_COLUMNS.values()},
        "threshold": m.get("threshold"), "has_op": "test_fpr_op" in m,
        "test_recall_per_class": m.get("test_recall_per_class"),
    }


def _per_class(records: list[dict[str, Any]]) -> str:
    """Each class's test recall (mean ± std over seeds), e.g. ``ham 98.00%, spam 91.33%``:
    what class weights and unbalanced data change; "—" where metrics.json has none."""
    found = [r["test_recall_per_class"] for r in records if r.get("test_recall_per_class")]
    if not found:
        return "—"
    names = list(dict.fromkeys(n for f in found for n in f))
    return ", ".join(f"{n} {_fmt([f.get(n) for f in found], True)}" for n in names)


def _fmt(values: list[float], percent: bool) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "—"
    scale, unit = (100, "%") if percent else (1, " min")
    mean = sum(vals) / len(vals) * scale
    return f"{mean:.2f}{unit}" if len(vals) == 1 else f"{mean:.2f} ± {statistics.stdev(vals) * scale:.2f}{unit}"


def _threshold(jobs: list[dict[str, Any]]) -> str:
    """The rows' decision threshold on P(class 1): "argmax", a value, or a range over seeds."""
    values = [r["threshold"] for r in jobs]
    if not values:
        return "—"
    if all(v is None for v in values):
        return "argmax"
    numbers = [v for v in values if v is not None]
    low, high = min(numbers), max(numbers)
    text = f"{low:.3g}" if low == high else f"{low:.3g}–{high:.3g}"
    return text if len(numbers) == len(values) else f"{text}, argmax"


def _uncertainty(groups: list[list[dict[str, Any]]], baseline: int) -> list[tuple[str, str]]:
    """Per row: the 95 % interval on test accuracy and the verdict against row ``baseline``
    (``sweeps/stats.py``), from the jobs' ``predictions.csv``; "—" where they are missing."""
    from spam_lightning.sweeps.stats import (
        StatsError,
        correct_matrix,
        read_predictions,
        row_interval,
        row_verdict,
    )

    matrices: list[Any] = []
    for ok in groups:
        try:
            matrices.append(correct_matrix([read_predictions(r["dir"]) for r in ok]) if ok else None)
        except (StatsError, OSError, KeyError, ValueError):
            matrices.append(None)
    base = matrices[baseline] if 0 <= baseline < len(matrices) else None
    out = []
    for i, m in enumerate(matrices):
        try:
            low, high = row_interval(m) if m is not None else (None, None)
            ci = "—" if low is None else f"[{100 * low:.2f}, {100 * high:.2f}]"
            verdict = ("baseline" if i == baseline else "—" if m is None or base is None
                       else row_verdict(base, m))
        except StatsError:  # no scipy: the table without the statistics
            ci, verdict = "—", "—"
        out.append((ci, verdict))
    return out


def _labels(keys: list[str]) -> dict[str, str]:
    """Each row's overrides without those every row shares (e.g. a checkpoint path given to the
    whole sweep): the rows' differences; a row that would be left with nothing keeps them all."""
    parts = {k: k.split(",") if k else [] for k in keys}
    shared = set.intersection(*(set(p) for p in parts.values())) if len(keys) > 1 else set()
    return {k: ",".join(o for o in p if o not in shared) or k for k, p in parts.items()}


def summarize(sweep_dir: str | Path, write: bool = True, baseline: int = 0) -> pd.DataFrame:
    """Build (and write) the summary table of a Hydra multirun folder; ``baseline``: the row
    (0-based) every other row is tested against."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"Sweep folder not found: {sweep_dir}")
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: (len(p.name), p.name))
    records = [_job_record(j) for j in jobs]
    rows, groups = [], []
    keys = list(dict.fromkeys(r["config"] for r in records))  # keeps sweep order
    labels = _labels(keys)
    for key in keys:
        group = [r for r in records if r["config"] == key]
        ok = [r for r in group if r["status"] == "ok"]
        groups.append(ok)
        first = (ok or group)[0]
        failed = len(group) - len(ok)
        rows.append({
            "Config": labels[key],
            # None: not a setting of this model (a baseline's weights, an encoder's token)
            **{c: "—" if first[c] is None else first[c] for c in BOOK_COLUMNS[:5]},
            **{c: _fmt([r[f"{s}_acc"] for r in ok], True) for c, s in zip(BOOK_COLUMNS[5:8], SPLITS, strict=True)},
            "Training time": _fmt([r["minutes"] for r in ok], False),
            "Device": first.get("Device") or "—",
            "Reference test acc": "—" if first["reference"] is None else f"{first['reference']:.2f}%",
            **{c: _fmt([r[f"op_{k}"] for r in ok], True) for c, k in OP_COLUMNS.items()},
            "Threshold": _threshold([r for r in ok if r["has_op"]]),
            "Seeds": len(ok),
            "Test recall per class": _per_class(ok),
            "Status": "ok" if not failed else f"failed ({failed}/{len(group)})",
        })
    vs = f"vs row {baseline + 1}"
    for row, (ci, verdict) in zip(rows, _uncertainty(groups, baseline), strict=True):
        row.update({"Test acc 95% CI": ci, vs: verdict})
    op = [*OP_COLUMNS, "Threshold"] if any(r["has_op"] for r in records) else []
    columns = ["Config", *BOOK_COLUMNS, "Test acc 95% CI", *op, "Reference test acc", vs, "Seeds", "Status",
               "Test recall per class"]
    table = pd.DataFrame(rows, columns=columns)
    if write:
        atomic_write(sweep_dir / "summary.csv", lambda tmp: table.to_csv(tmp, index=False))
        md = _markdown(table)
        atomic_write(sweep_dir / "summary.md", lambda tmp: tmp.write_text(md + "\n", encoding="utf-8"))
        _figure(table, sweep_dir / "summary.png")
    return table


def _figure(table: pd.DataFrame, path: Path) -> None:
    """Each row's test accuracy with its 95 % interval, the reference value beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def number(text: Any) -> float:
        try:
            return float(str(text).split(" ")[0].rstrip("%"))
        except ValueError:
            return math.nan

    acc = table["Test acc"].map(number)
    ci = table["Test acc 95% CI"].map(lambda c: [number(x) for x in c.strip("[]").split(", ")]
                                      if c.startswith("[") else [math.nan, math.nan])
    low, high = acc - ci.map(lambda c: c[0]), ci.map(lambda c: c[1]) - acc
    rows = range(len(table))
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(table) + 1.5))
    ax.errorbar(acc, rows, xerr=[low.fillna(0), high.fillna(0)], fmt="o", capsize=3, label="test accuracy, 95% CI")
    ax.plot(table["Reference test acc"].map(number), rows, "rx", label="reference (book)")
    ax.set_yticks(list(rows), [f"{i + 1}: {c[:50]}" for i, c in enumerate(table["Config"])], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%)")
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs the optional tabulate)."""
    rows = [list(table.columns), ["---"] * table.shape[1], *table.values.tolist()]
    return "\n".join("| " + " | ".join(str(v).replace("|", "\\|") for v in r) + " |" for r in rows)


class SweepSummaryCallback(Callback):
    """Hydra callback: writes the summary into the sweep folder after every job and when a
    multirun ends. Hydra stops a sweep by raising at the end of a batch with a failed job, before
    ``on_multirun_end``: the summary written after each job still shows that job as a failed row."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            table = summarize(sweep_dir)
        except Exception as err:  # a summary must never turn a job into a failure
            log.warning("Could not write the sweep summary for %s: %s", sweep_dir, err)
            return
        if job_return.status == JobStatus.FAILED:
            failed = int((table["Status"] != "ok").sum())
            print(f"Job {config.hydra.job.num} failed ({', '.join(config.hydra.overrides.task)}): "
                  f"{Path(config.hydra.runtime.output_dir) / 'train.log'}; {failed} of {len(table)} "
                  f"rows failed so far; summary: {sweep_dir / 'summary.md'}", file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            table = summarize(sweep_dir)
        except Exception as err:  # a summary must never turn a finished sweep into a failure
            log.warning("Could not write the sweep summary for %s: %s", sweep_dir, err)
            return
        log.info("Sweep summary (%d rows): %s", len(table), sweep_dir / "summary.md")
        print(_markdown(table))
