"""Are two runs different, or within noise? McNemar's exact test on their paired predictions.

    python scripts/compare.py RUN_A RUN_B [--split test] [--show 10]

RUN_A and RUN_B are run folders (a sweep job's folder is one) of the same data; each holds the
``predictions.csv`` a finished run writes. Prints both accuracies with 95 % bootstrap intervals,
the messages only one run gets right, the p-value and a verdict in words.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without pip install

from spam_lightning.sweeps.stats import StatsError, accuracy_interval, compare, read_predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--show", type=int, default=10, help="flipped messages to list (0: none)")
    args = parser.parse_args(argv)
    try:
        a, b = read_predictions(args.run_a), read_predictions(args.run_b)
        result = compare(a, b, args.split)
        for name, run, frame in (("A", args.run_a, a), ("B", args.run_b, b)):
            part = frame[frame["split"] == args.split]
            low, high = accuracy_interval((part["predicted"] == part["label"]).to_numpy())
            accuracy = result.accuracy_a if name == "A" else result.accuracy_b
            print(f"{name}: {accuracy:.2%} [95% CI {low:.2%}, {high:.2%}]  {run}")
    except StatsError as err:
        print(f"compare.py: {err}", file=sys.stderr)
        return 1
    print(f"{args.split}: {result.n} messages; only A right: {result.only_a}, only B right: "
          f"{result.only_b}; McNemar exact p = {result.p_value:.4g}: {result.verdict}")
    if args.show and len(result.flips):
        shown = result.flips.head(args.show).assign(text=lambda f: f["text"].astype(str).str.slice(0, 60))
        print(shown.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
