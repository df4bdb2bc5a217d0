"""`agecascade demo-data`: small synthetic datasets in the five datasets' native layouts."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    from agecascade.demo import write_demo_datasets

    counts = write_demo_datasets(args.out, seed=args.seed)
    for name, n in counts.items():
        print(f"{name:<8} {n:>5} files -> {args.out / name}")
    return 0
