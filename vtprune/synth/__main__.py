"""``python -m vtprune.synth --split test --n 600 --out eval/data/synth_vqa``: export a split as files."""

from __future__ import annotations

import argparse

from . import SPLITS, TEST_SIZE, export_split, generate_split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtprune.synth", description=__doc__)
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--n", type=int, default=TEST_SIZE, help="number of samples (skills round-robin)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="eval/data/synth_vqa", help="root directory; files go to OUT/SPLIT/")
    args = parser.parse_args(argv)
    directory = export_split(generate_split(args.split, args.n, args.seed), args.out, args.split)
    print(f"wrote {args.n} samples to {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
