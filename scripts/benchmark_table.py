#!/usr/bin/env python
"""What a ``benchmark.json`` says (issues 15, 22): its medians, MFU, checks and ratios, phases
merged from earlier runs, and the README table and ``benchmark.md`` generated from it.

``python scripts/benchmark_table.py`` rewrites what lies between ``<!-- benchmark-table:start -->``
and ``<!-- benchmark-table:end -->`` in ``README.md``; ``--check`` only says whether the README is
up to date (exit 1 if not). ``scripts/benchmark.py`` measures and calls this module for the rest.
No torch import: this is numbers and text in, numbers and text out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
START = "<!-- benchmark-table:start -->"
END = "<!-- benchmark-table:end -->"
TRAIN_PHASES = ("a", "b", "c")
INFER_PHASES = ("d_fp32", "d_bf16", "e_fp32")
HISTORY = ("train_losses", "val_losses", "train_accs", "val_accs")
LOADED = 0.10  # other processes' CPU, in cores: above this a phase is flagged ``loaded``


def ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def max_history_diff(h1: dict[str, list[float]], h2: dict[str, list[float]]) -> float:
    if any(len(h1[k]) != len(h2[k]) for k in HISTORY):
        return float("inf")
    return max([0.0] + [abs(a - b) for k in HISTORY for a, b in zip(h1[k], h2[k], strict=True)])


RUN_KEYS = ("seq", "seconds", "process_seconds", "wall_seconds", "msgs_per_s", "training_seconds",
            "other_cpu_s", "other_cpu_fraction", "loaded", "idle_wait_s", "peak_rss_mb")


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one phase: the medians of the times, every run listed under ``runs``,
    the other fields from the run nearest the median; other CPU: the worst run's."""
    med = statistics.median(r["wall_seconds"] for r in runs)
    rep = min(runs, key=lambda r: abs(r["wall_seconds"] - med))
    out = {**rep, "wall_seconds": med}
    for key in ("seconds", "process_seconds", "msgs_per_s"):
        if all(r.get(key) is not None for r in runs):
            out[key] = statistics.median(r[key] for r in runs)
    fracs = [r["other_cpu_fraction"] for r in runs if r.get("other_cpu_fraction") is not None]
    out |= {"other_cpu_fraction": max(fracs) if fracs else None,
            "loaded": any(r.get("loaded") for r in runs),
            "runs": [{k: r.get(k) for k in RUN_KEYS if k in r} for r in runs],
            "deterministic_across_runs": all(r.get("history") == rep.get("history") and
                                             r.get("predictions") == rep.get("predictions")
                                             for r in runs)}
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
    if set_mfu(phases, peak) <= 1.0:
        return peak, []
    over = sorted(n for n, r in phases.items() if (r.get("mfu") or 0) > 1.0)
    print(f"MFU above 100 % for {over}: measuring the matmul peak again", flush=True)
    again = remeasure()
    peak = {k: max(v, again[k]) for k, v in peak.items()}
    notes = [f"MFU above 100 % for {', '.join(over)} against the first peak; peak re-measured "
             "with larger matmuls"]
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
    checks: dict[str, Any] = dict(prior_checks or {})
    digests = {name: res["weights"] for name, res in phases.items() if "weights" in res}
    checks["weights_identical"] = all(len({digests[n] for n in group if n in digests}) <= 1
                                      for group in (TRAIN_PHASES, INFER_PHASES))
    checks["deterministic_across_runs"] = all(
        r.get("deterministic_across_runs", True) for r in phases.values())
    a, e, f = phases.get("a"), phases.get("e_fp32"), phases.get("f") or {}
    for name in ("b", "c"):
        if a and name in phases:
            phases[name]["speedup_vs_a"] = ratio(a["wall_seconds"], phases[name]["wall_seconds"])
    if a and "b" in phases:
        b = phases["b"]
        checks["a_vs_b_history_max_abs_diff"] = max_history_diff(a["history"], b["history"])
        checks["a_vs_b_accuracies_equal"] = all(  # train too: the same shuffled batches
            abs(a[f"{s}_accuracy"] - b[f"{s}_accuracy"]) < 1e-6 for s in ("train", "val", "test"))
    for name in ("d_fp32", "d_bf16"):
        if e and name in phases:
            phases[name]["speedup_vs_e"] = ratio(phases[name]["msgs_per_s"], e["msgs_per_s"])
    preds = {n: r["predictions"] for n, r in phases.items() if "predictions" in r}  # run now
    for key, (x, y) in (("d_vs_e_fp32_agreement", ("d_fp32", "e_fp32")),
                        ("d_bf16_vs_e_agreement", ("d_bf16", "e_fp32")),
                        ("d_bf16_vs_fp32_agreement", ("d_bf16", "d_fp32"))):
        if x in preds and y in preds:
            checks[key] = sum(map(int.__eq__, preds[x], preds[y])) / max(1, len(preds[x]))
    if f.get("results_equal") is not None:
        checks["f_shared_equals_unshared"] = f["results_equal"]
    fracs = [r.get("other_cpu_fraction") for r in [*phases.values(), *f.get("jobs", [])]]
    fracs = [x for x in fracs if x is not None]
    headline = {
        "chapter_vs_book": phases.get("b", {}).get("speedup_vs_a"),
        "fast_vs_book": phases.get("c", {}).get("speedup_vs_a"),
        "classify_fp32_vs_hf": phases.get("d_fp32", {}).get("speedup_vs_e"),
        "classify_bf16_vs_hf": phases.get("d_bf16", {}).get("speedup_vs_e"),
        "classify_fp32_agreement": checks.get("d_vs_e_fp32_agreement"),
        # with HF's fp32 predictions (= ours in fp32 when d_vs_e_fp32_agreement is 1)
        "classify_bf16_agreement": checks.get("d_bf16_vs_e_agreement",
                                              checks.get("d_bf16_vs_fp32_agreement")),
        "sweep_cache_speedup": f.get("speedup"),
        "max_other_cpu_fraction": max(fracs) if fracs else None,
        "loaded_phases": sorted(n for n, r in phases.items() if r.get("loaded")),
    }
    return headline, checks


def sweep_summary(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Phase (f) from its jobs (own caches first, then shared, seed by seed): the summed process
    times, their ratio, and whether each seed's results are the same both ways."""
    own, shared = [j for j in jobs if not j["shared"]], [j for j in jobs if j["shared"]]
    equal = all(max_history_diff(x["history"], y["history"]) <= 1e-6 and
                all(abs(x[f"{s}_accuracy"] - y[f"{s}_accuracy"]) < 1e-9 for s in ("val", "test"))
                for x, y in zip(own, shared, strict=True))
    unshared_s, shared_s = (sum(j["wall_seconds"] for j in js) for js in (own, shared))
    keep = ("seq", "seed", "shared", "seconds", "process_seconds", "wall_seconds",
            "training_seconds", "test_accuracy", "trunk_cache", "other_cpu_fraction", "loaded",
            "peak_rss_mb")
    fracs = [j["other_cpu_fraction"] for j in jobs if j.get("other_cpu_fraction") is not None]
    return {"unshared_seconds": unshared_s, "shared_seconds": shared_s,
            "speedup": ratio(unshared_s, shared_s), "results_equal": equal,
            "seconds": unshared_s + shared_s, "wall_seconds": unshared_s + shared_s,
            "other_cpu_fraction": max(fracs) if fracs else None,
            "loaded": any(j.get("loaded") for j in jobs),
            "jobs": [{k: j.get(k) for k in keep} for j in jobs]}


def results_json(quick: bool, command: str, phases: dict[str, dict], merged_from: list[dict],
                 peak: dict[str, float], peaks: list[dict], ceiling: dict, notes: list[str],
                 **fields: Any) -> dict[str, Any]:
    """The whole ``benchmark.json``: ``phases`` (run now and merged) with their ratios and
    checks, the GEMM ceiling as a fraction of ``peak``, notes on load; ``fields``: the context,
    machine, threads, torch, isolation and load average, as given."""
    for prec, by_rows in ceiling.items():
        for r in by_rows.values():
            r["fraction_of_peak"] = r["gflops"] / peak[prec]
    headline, checks = summarize(fields.get("context", {}), phases,
                                 {k: v for m in merged_from for k, v in m["checks"].items()})
    worst = headline["max_other_cpu_fraction"]
    if worst is not None and worst > LOADED:
        notes.append(f"loaded: other processes used up to {worst:.2f} of a core during "
                     f"{', '.join(headline['loaded_phases']) or 'some phases'}; "
                     "those times are inflated")
    if phases.get("f", {}).get("reason"):
        notes.append(f"sweep_cache_speedup is null: {phases['f']['reason']}")
    return {"label": "quick smoke run, not the result" if quick else "benchmark", "quick": quick,
            "command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            **headline, **{k: fields[k] for k in ("context", "machine", "threads", "torch",
                                                 "isolation", "load_average")},
            "peak_gflops": peak, "peak_measurements": peaks, "gemm_ceiling": ceiling,
            "startup_seconds": phases.get("s", {}).get("median_seconds"),
            "merged_from": merged_from, "checks": checks, "notes": notes,
            "phases": {k: {kk: vv for kk, vv in v.items() if kk != "predictions"}
                       for k, v in phases.items()}}


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
        taken = [name for name in old.get("phases", {}) if name not in run_now]
        for name in taken:
            res = old["phases"][name]
            merged[name] = {**res, "from": res.get("from") or {
                "date": old.get("date"), "command": old.get("command"),
                "peak_gflops": old.get("peak_gflops")}}
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


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x * 100:.{digits}f} %"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}×"


def _mfu(r: dict[str, Any]) -> str:
    return "-" if r.get("mfu") is None else f"{r['mfu'] * 100:.0f} %"


def _other(r: dict[str, Any]) -> str:
    f = r.get("other_cpu_fraction")
    if f is None:
        return "-"
    return f"{f:.2f}" + (" **loaded**" if r.get("loaded") else "")


def _seconds(r: dict[str, Any]) -> str:
    """The wall time ratios use (the whole process, unless run in-process), median of runs."""
    wall = r.get("wall_seconds", r["seconds"])
    runs = r.get("runs") or []
    text = f"{wall:,.1f} s"
    if len(runs) > 1:
        text += " (median of " + ", ".join(f"{x['wall_seconds']:,.1f}" for x in runs) + ")"
    return text


def render_table(results: dict[str, Any]) -> str:
    """The README table (markdown, no trailing newline) from a ``benchmark.json`` dict."""
    phases = results.get("phases", {})
    ctx = results.get("context", {})
    machine = results.get("machine", {})
    peak = results.get("peak_gflops", {})
    lines: list[str] = []
    if results.get("quick"):
        lines += [
            f"**Quick smoke run ({ctx.get('model')}, {ctx.get('epochs')} epoch(s), "
            f"{ctx.get('num_texts')} messages), not the result:** it only shows that "
            "`scripts/benchmark.py` runs end to end; its ratios say nothing about gpt2-small.",
            "",
        ]
    cpu = machine.get("cpu_model") if isinstance(machine, dict) else machine
    cores = machine.get("cores") if isinstance(machine, dict) else None
    lines += [
        f"Measured {results.get('date', '?')} on {cpu}"
        + (f", {cores} cores" if cores else "")
        + f", torch {results.get('torch', '?')}, {results.get('threads', '?')} threads; "
        f"{ctx.get('model')} with random weights (seed {ctx.get('seed')}), "
        f"{ctx.get('epochs')} epoch(s); matmul peak "
        f"{peak.get('fp32', 0):.0f} GFLOP/s fp32, {peak.get('bf16', 0):.0f} GFLOP/s bf16. "
        "Wall: the phase's whole process (start-up and imports included), median over "
        f"{ctx.get('repeat', 1)} interleaved run(s); ratios are of these medians. "
        "Other CPU: CPU seconds other processes used per wall second during the phase "
        "(fraction of one core; **loaded** above 0.10). Command: "
        f"`{results.get('command', '?')}`.",
        "",
        "| run | wall | vs the book | final train / val / test | MFU | other CPU |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    titles = {
        "a": f"the book's loop ({_book_code(phases.get('a'))}), its evaluations + full-set "
             "accuracy",
        "b": "`python train.py` (chapter config)",
        "c": "`python train.py experiment=fast`",
    }
    for name, title in titles.items():
        if name not in phases:
            continue
        r = phases[name]
        accs = " / ".join(
            f"{r[f'{s}_accuracy'] * 100:.2f}" for s in ("train", "val", "test")
        ) + " %"
        vs = 1.0 if name == "a" else r.get("speedup_vs_a")
        lines.append(
            f"| {title} | {_seconds(r)} | {_x(vs)} | {accs} | {_mfu(r)} | {_other(r)} |"
        )
    lines += _training_notes(phases)
    infer = [n for n in ("d_fp32", "d_bf16", "e_fp32") if n in phases]
    if infer:
        lines += [
            "",
            f"| inference, {ctx.get('num_texts')} messages, batch {ctx.get('batch_size')} "
            "| msgs/s | vs HF fp32 | agreement | MFU | other CPU |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        agree = {
            "d_fp32": results.get("classify_fp32_agreement"),
            "d_bf16": results.get("classify_bf16_agreement"),
            "e_fp32": None,
        }
        titles = {
            "d_fp32": "`Classifier` fp32",
            "d_bf16": "`Classifier` bf16",
            "e_fp32": "HF `GPT2ForSequenceClassification` fp32",
        }
        for name in infer:
            r = phases[name]
            vs = 1.0 if name == "e_fp32" else r.get("speedup_vs_e")
            lines.append(
                f"| {titles[name]} | {r['msgs_per_s']:.1f} | {_x(vs)} | "
                f"{_pct(agree[name])} | {_mfu(r)} | {_other(r)} |"
            )
    sweep = phases.get("f")
    if sweep is not None:
        lines.append("")
        if results.get("sweep_cache_speedup") is None:
            lines.append(f"Shared trunk cache (phase f): not measured ({sweep.get('reason')}).")
        else:
            lines.append(
                f"Shared trunk cache (phase f): {len(sweep['seeds'])} jobs "
                f"(`{' '.join(sweep['overrides']) or 'chapter config'}`, seeds "
                f"{', '.join(map(str, sweep['seeds']))}) take {sweep['unshared_seconds']:.1f} s "
                f"in all when each builds its own trunk cache, {sweep['shared_seconds']:.1f} s "
                "sharing one on disk: "
                f"{results['sweep_cache_speedup']:.2f}×; results equal: "
                f"{sweep.get('results_equal')}."
            )
    lines += _ceiling_lines(results) + _startup_lines(phases.get("s"))
    merged = results.get("merged_from") or []
    if merged:
        lines += ["", "Phases from earlier runs on the same machine (`--merge`): " + "; ".join(
            f"{', '.join(m['phases'])} from the run of {m['date']} (`{m['command']}`"
            + (f"; their MFU is against that run's peak, {m['peak_gflops']['fp32']:.0f} GFLOP/s "
               f"fp32, {m['peak_gflops']['bf16']:.0f} bf16" if m.get("peak_gflops") else "")
            + ")"
            for m in merged
        ) + "."]
    notes = results.get("notes") or []
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines)


def _book_code(a: dict[str, Any] | None) -> str:
    """Whose code phase (a) ran: the ``llms_from_scratch`` package (with its version) since issue
    22; runs before it, which carry no ``book_code``, ran ``spam_lightning.reference``."""
    name, _, version = (a or {}).get("book_code", "spam_lightning.reference").partition(" ")
    return f"`{name}`" + (f" {version}" if version else "")


TITLES = {"b": "(b) `experiment=chapter`", "c": "(c) `experiment=fast`",
          "d_fp32": "(d) `Classifier` fp32", "d_bf16": "(d) `Classifier` bf16",
          "e_fp32": "(e) HF `GPT2ForSequenceClassification` fp32",
          "s": "(s) start-up commands, 3 runs each", "load": "loading test"}


def render_markdown(results: dict[str, Any]) -> str:
    """``docs/benchmark.md``: how it was measured, the README's table, every run in order."""
    phases, checks = results["phases"], results["checks"]
    titles = {**TITLES, "a": f"(a) the book's loop ({_book_code(phases.get('a'))})"}
    lines = [
        "# Benchmark (issues 6, 15)", "",
        "Generated by `scripts/benchmark.py` with `docs/benchmark.json`; do not edit by hand.", "",
        "Each phase runs in its own interpreter (unless `--in-process`) on the same random-"
        "initialised weights and the SMS data: (a) the book's loop by the book's own code "
        f"({_book_code(phases.get('a'))}: its seeds, global-RNG shuffling, evaluation every 50 "
        "steps on 5 batches, then accuracy on the full train/validation/test loaders), "
        "(b) `python train.py` (the chapter config) and (c) `experiment=fast` through "
        "`spam_lightning.train.train`, (d) the `spam-classify` engine and (e) `transformers`' "
        "`GPT2ForSequenceClassification` on the same weights, (f) a sweep over seeds with and "
        "without the shared on-disk trunk cache. Wall times are the whole subprocess (start-up "
        "and imports included, the benchmark's own weight hashing excluded); ratios are of "
        "medians. Other CPU is machine-wide non-idle CPU time (`/proc/stat`) minus the phase's "
        "own (children included), per wall second: a phase above 0.10 of a core is **loaded** "
        "and its time is not to be trusted. MFU is useful FLOPs/s (each block's calls counted "
        "by Lightning's `measure_flops`, backward included where it trains) over the matmul "
        "peak of the same precision (`torch.utils.benchmark.Timer`), measured at the start and "
        "the end of the run, the max kept.", "",
        render_table(results), "",
        "## Every run, in the order run", "",
        "| run of | # | phase | in-phase s | process s | other CPU (cores) | loaded | peak RSS MiB |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    rows = []
    for name, r in phases.items():
        # a phase merged from an earlier benchmark.json (--merge): its runs are of that run
        when = r["from"]["date"] if r.get("from") else results.get("date")
        if name == "f":
            rows += [(when, j.get("seq", 0), f"(f) seed {j['seed']}, "
                      f"{'shared' if j['shared'] else 'own'} cache", j) for j in r.get("jobs", [])]
        else:
            rows += [(when, run.get("seq", 0), titles.get(name, name), run)
                     for run in r.get("runs", [r])]
    for when, seq, title, run in sorted(rows, key=lambda x: (x[0] or "", x[1] or 0)):
        frac, proc = run.get("other_cpu_fraction"), run.get("process_seconds")
        lines.append(
            f"| {when} | {seq} | {title} | {run.get('seconds') or 0:.2f} | "
            f"{'-' if proc is None else f'{proc:.2f}'} | "
            f"{'-' if frac is None else f'{frac:.3f}'} | "
            f"{'**yes**' if run.get('loaded') else 'no'} | {run.get('peak_rss_mb') or 0:.0f} |")
    lines += ["", "Matmul peak measurements (GFLOP/s): " + "; ".join(
        f"{m['when']}: fp32 {m['fp32']:.0f}, bf16 {m['bf16']:.0f} (other CPU "
        + ("-" if m.get("other_cpu_fraction") is None else f"{m['other_cpu_fraction']:.2f}") + ")"
        for m in results["peak_measurements"]),
        "", "Checks: " + ", ".join(f"{k} = {v}" for k, v in checks.items())]
    return "\n".join(lines) + "\n"


STARTUP_TITLES = {
    "import_torch": "`import torch`",
    "import_lightning": "`import lightning`",
    "import_train": "`import spam_lightning.train` (what `python train.py` imports first)",
    "classify_help": "`spam-classify --help`",
    "classify_first_prediction_tiny": "`spam-classify RUN \"...\"`, a gpt2-tiny bundle, cold",
}


def _training_notes(phases: dict[str, Any]) -> list[str]:
    """What each training row ran (the benchmark's overrides, from the JSON) and its step time
    in the fit loop against the same batches in a bare PyTorch loop."""
    out = []
    for name, title in (("b", "chapter config"), ("c", "`experiment=fast`")):
        r = phases.get(name)
        if not r or not r.get("overrides"):
            continue
        text = f"{title}: `{' '.join(r['overrides'])}`"
        st = r.get("steps") or {}
        if st.get("step_ms") is not None:
            text += (f"; over the last epoch's {st['steps_timed']} steps without an evaluation, a "
                     f"training step takes {st['step_ms']:.1f} ms (median) in the fit loop and "
                     f"{st['bare_step_ms']:.1f} ms for the same batches in a bare PyTorch loop: "
                     f"{st['per_step_overhead_ms']:.1f} ms of framework per step (median of the "
                     "per-batch differences)")
        out.append(f"- {text}.")
    return ["", "Overrides the benchmark gives each training row, and its step times:", *out] if out else []


def _ceiling_lines(results: dict[str, Any]) -> list[str]:
    """The GEMM ceiling: what the BLAS gives the model's own matmul shapes."""
    ceiling = results.get("gemm_ceiling")
    if not ceiling:
        return []
    parts = [
        f"{prec} {r['gflops']:.0f} GFLOP/s at {r['rows']:,} rows ({label.replace('_', ' ')}) = "
        f"{r['fraction_of_peak'] * 100:.0f} %"
        for prec, by_rows in ceiling.items() for label, r in by_rows.items()
    ]
    return ["", "GEMM ceiling: one block's own matmuls (q, k, v, out, FeedForward; `F.linear`), "
            "median of repeats, as a fraction of the square-matmul peak: " + "; ".join(parts)
            + ". A whole pass also runs attention, GELU and LayerNorm, so it can at best come "
            "near this; on this kind of shared machine both move by about 15 % between runs."]


def _startup_lines(s: dict[str, Any] | None) -> list[str]:
    if not s or not s.get("median_seconds"):
        return []
    rows = [f"| {STARTUP_TITLES.get(k, k)} | {v:.2f} s |" for k, v in s["median_seconds"].items()]
    repeats = len(next(iter(s.get("runs_seconds", {}).values()), [None] * 3))
    how = f"median of {repeats}" if repeats > 1 else "one run"
    return ["", f"| start-up, fresh process ({how}; other CPU {_other(s)}) | wall |",
            "| --- | ---: |", *rows]


def update_readme(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table``."""
    if START not in text or END not in text:
        raise ValueError(f"README has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=str(REPO / "docs" / "benchmark.json"))
    p.add_argument("--readme", default=str(REPO / "README.md"))
    p.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    args = p.parse_args(argv)
    table = render_table(json.loads(Path(args.json).read_text()))
    readme = Path(args.readme)
    text = readme.read_text()
    new = update_readme(text, table)
    if args.check:
        if new != text:
            print(f"{readme}: benchmark table differs from {args.json}", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    print(f"{readme}: benchmark table regenerated from {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
