"""Write summary.md and summary.csv for a Hydra sweep folder: `python scripts/summarize.py SWEEP_DIR`."""

import argparse
import sys
from pathlib import Path


def _jobs(folder: Path) -> list[Path]:
    """A sweep's job folders: those Hydra wrote a ``.hydra/`` into."""
    return [p for p in folder.iterdir() if (p / ".hydra").is_dir()]


def _sweeps(folder: Path) -> list[Path]:
    """Sweep folders directly inside ``folder`` (their jobs, or Hydra's multirun.yaml)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and ((p / "multirun.yaml").is_file() or _jobs(p)))


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a sweep to summarize (one message naming the fix), or None."""
    example = "e.g. outputs/multirun/2026-11-30_12-00-00_1a2b3c"
    if not folder.exists():
        return f"{folder}: no such folder; pass a sweep folder, {example}"
    if not folder.is_dir():
        return f"{folder}: not a folder; pass a sweep folder, {example}"
    if _jobs(folder):
        return None
    if sweeps := _sweeps(folder):
        listed = "\n  ".join(str(p) for p in sweeps)
        return (f"{folder} holds {len(sweeps)} sweep folder(s), not a sweep's jobs; summarize one "
                f"of them (the newest is last):\n  {listed}\n"
                f'e.g. python scripts/summarize.py "{sweeps[-1]}"')
    return (f"{folder} holds no sweep jobs (folders with a .hydra/ inside): pass the folder a "
            f"multirun wrote, {example}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep_dir", help="a multirun folder, e.g. outputs/multirun/2026-11-30_12-00-00")
    parser.add_argument("--baseline", type=int, default=1,
                        help="the row (1 = the first) every other row is tested against")
    args = parser.parse_args()
    if problem := folder_problem(Path(args.sweep_dir)):  # before the slow imports
        sys.exit(f"Error: {problem}")
    from spam_lightning.sweeps.summary import _markdown, summarize

    table = summarize(args.sweep_dir, baseline=args.baseline - 1)
    print(_markdown(table))
    print(f"\nwrote {args.sweep_dir}/summary.md and summary.csv")


if __name__ == "__main__":
    main()
