"""Prepare train/validation/test.csv for the SMS spam data without training.

python scripts/prepare_data.py --data-dir data/sms_spam       # the copy bundled in the package
python scripts/prepare_data.py --source download               # fetch from --url / the UCI URLs
python scripts/prepare_data.py --source /path/to/SMSSpamCollection  # or the zip
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spam_lightning.data.source import BUNDLED, DEFAULT_URLS, DataError
from spam_lightning.data.table import prepare


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--source",
        default=BUNDLED,
        help="bundled (default: the copy in the package), download (from --url), or a local "
        "SMSSpamCollection file or zip",
    )
    p.add_argument(
        "--url",
        action="append",
        dest="urls",
        help="download URL for --source download (repeatable)",
    )
    p.add_argument("--data-dir", default="data/sms_spam")
    p.add_argument("--split-seed", type=int, default=123)
    p.add_argument("--train-frac", type=float, default=0.7)
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--on-bad-rows", choices=["error", "skip"], default="error")
    p.add_argument("--split", choices=["chapter", "bonus"], default="chapter",
                   help="chapter: gpt_class_finetune.py's split; bonus: additional_experiments.py's")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        prepared = prepare(
            args.source,
            args.data_dir,
            args.urls or DEFAULT_URLS,
            split_seed=args.split_seed,
            train_frac=args.train_frac,
            val_frac=args.val_frac,
            on_bad_rows=args.on_bad_rows,
            split=args.split,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    state = "reused" if prepared.reused else "prepared"
    print(f"{state} {prepared.data_dir}")
    print(json.dumps(prepared.meta["splits"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
