"""Write summary.md and summary.csv for a Hydra sweep folder: `python scripts/summarize.py SWEEP_DIR`."""

import argparse

from spam_lightning.sweeps.summary import _markdown, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep_dir", help="a multirun folder, e.g. outputs/multirun/2026-11-30_12-00-00")
    parser.add_argument("--baseline", type=int, default=1,
                        help="the row (1 = the first) every other row is tested against")
    args = parser.parse_args()
    table = summarize(args.sweep_dir, baseline=args.baseline - 1)
    print(_markdown(table))
    print(f"\nwrote {args.sweep_dir}/summary.md and summary.csv")


if __name__ == "__main__":
    main()
