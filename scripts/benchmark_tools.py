"""Measuring tools of ``scripts/benchmark.py``: FLOPs by Lightning's ``measure_flops``, matmul
timings by ``torch.utils.benchmark.Timer``, memory and CPU use from ``/proc``, the machine; and
its random GPT-2 checkpoints in the Hub's layout (the package's layout table, a meta model)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import platform
import struct
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from benchmark_table import LOADED  # scripts/ is on sys.path: benchmark.py puts it there
from torch.utils import benchmark

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def proc_status_mb(field: str) -> float:
    """A ``/proc/self/status`` field (``VmHWM`` peak RSS, ``VmRSS`` current) in MiB."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return int(next(x for x in lines if x.startswith(field)).split()[1]) / 1024


class FlopLog:
    """Block FLOPs of what really ran: a hook counts each block call by shape (cheap enough to
    stay on while timing); ``total()`` measures one call of each kind with Lightning's
    ``measure_flops`` on a meta-device copy of the block, backward included where it trains."""

    def __init__(self) -> None:
        self.calls, self.blocks = Counter(), {}

    def attach(self, blocks: Iterable[torch.nn.Module]) -> FlopLog:
        for block in blocks:
            def record(_module: Any, args: tuple, kwargs: dict, kind: str = "forward", b=block):
                x = args[0] if args else kwargs["hidden_states"]  # transformers' GPT2Block
                trains = torch.is_grad_enabled() and any(p.requires_grad for p in b.parameters())
                self.calls[(id(b), kind, tuple(x.shape), trains)] += 1

            self.blocks[id(block)] = block
            block.register_forward_pre_hook(record, with_kwargs=True)
            if hasattr(block, "forward_at"):  # our classifier's last block: one query per row
                block.forward_at = lambda x, pos, at=block.forward_at, rec=record: (
                    rec(None, (x,), {}, "forward_at") or at(x, pos))
        return self

    def total(self) -> float:
        from lightning.fabric.utilities.throughput import measure_flops

        sigs = {i: (repr(b), tuple(p.requires_grad for p in b.parameters()))
                for i, b in self.blocks.items()}  # blocks alike share a measurement
        firsts = {sig: i for i, sig in sigs.items()}  # one block of each kind
        metas = {sig: copy.deepcopy(self.blocks[i]).to("meta") for sig, i in firsts.items()}
        each: dict[Any, int] = {}
        for bid, kind, shape, trains in self.calls:
            if (key := (sigs[bid], kind, shape, trains)) not in each:
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
    return benchmark.Timer(stmt, globals=names, num_threads=torch.get_num_threads())


def measure_peak(seconds: float, sizes: tuple[int, ...] | None, device: str) -> dict[str, float]:
    """Best GFLOP/s of square matmuls, fp32 and bf16 (MFU's denominators): the fastest of the
    Timer's blocks over several sizes, the closest a shared machine comes to its hardware."""
    sizes = sizes or ((4096, 8192) if device.startswith("cuda") else (1024, 2048, 4096))
    out = {}
    for name, dtype in DTYPES.items():
        rates = []
        for n in sizes:
            a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
            m = timer("a @ b", a=a, b=b).blocked_autorange(min_run_time=seconds / len(sizes))
            rates.append(2 * n**3 / min(m.times) / 1e9)
        out[name] = max(rates)
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
                  xs={k: new(m, k) for k in (dim, 4 * dim)},
                  ws=[(new(n, k), new(n)) for k, n in shapes]).blocked_autorange(
                      min_run_time=seconds / len(rows))
        gflops = sum(2.0 * m * k * n for k, n in shapes) / t.median / 1e9
        out[name][label] = {"rows": m, "gflops": gflops, "repeats": len(t.times) * t.number_per_run}
    return out


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the GPT weights (the class head's bias excluded: (d)/(e) zero it)."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if k != "out_head.bias"):
        h.update(key.encode() + state[key].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def busy_cpu_seconds() -> float | None:
    """Non-idle CPU seconds of the whole machine since boot (``/proc/stat``: user + nice +
    system + irq + softirq + steal; guest time is inside user/nice)."""
    with contextlib.suppress(OSError, ValueError):
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(v[0:3]) + sum(v[5:8])) / os.sysconf("SC_CLK_TCK")
    return None


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


def hub_tensors(ours: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our GPTModel's tensors under the Hub's names, by the package's one GPT-2 layout table."""
    from spam_lightning.model.weights import hf_plan

    out = {}
    for key, entry in hf_plan(cfg).items():
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
    ends = list(itertools.accumulate(4 * s.numel() for s in shapes.values()))
    header = {"__metadata__": {"format": "pt"}} | {
        k: {"dtype": "F32", "shape": list(s), "data_offsets": [end - 4 * s.numel(), end]}
        for (k, s), end in zip(shapes.items(), ends, strict=True)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            fh.write((torch.randn(shape, generator=gen) * 0.02).numpy().tobytes())
    return path.stat().st_size


def bytes_written() -> int:
    """What this process has handed to ``write()`` so far (Linux ``/proc/self/io`` wchar; 0
    elsewhere): checkpoints, bundle, logs and cache files of a run, rewrites included."""
    try:
        with open("/proc/self/io") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("wchar:"))
    except (OSError, StopIteration):
        return 0


def folder_bytes(folder: Path) -> int:
    """A folder's size on disk as ``du`` counts it: hard-linked files once."""
    seen, total = set(), 0
    for path in folder.rglob("*"):
        if path.is_file() and (st := path.stat()).st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_size
    return total
