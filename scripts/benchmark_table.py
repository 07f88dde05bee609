#!/usr/bin/env python
"""The README's benchmark table, generated from ``docs/benchmark.json`` (issue 15).

``python scripts/benchmark_table.py`` rewrites what lies between ``<!-- benchmark-table:start -->``
and ``<!-- benchmark-table:end -->`` in ``README.md``; ``--check`` only says whether the README is
up to date (exit 1 if not). ``scripts/benchmark.py --readme`` calls the same code after a run.
No torch import: this is text in, text out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
START = "<!-- benchmark-table:start -->"
END = "<!-- benchmark-table:end -->"


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
        "a": "the book's loop (`spam_lightning.reference`), its evaluations + full-set accuracy",
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
    return ["", f"| start-up, fresh process (median of 3; other CPU {_other(s)}) | wall |",
            "| --- | ---: |", *rows]


def update_readme(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table``."""
    if START not in text or END not in text:
        raise ValueError(f"README has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    import json

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
