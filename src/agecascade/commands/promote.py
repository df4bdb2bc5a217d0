"""`agecascade promote`: make a registered version, or a run's logged AgeEstimator, the champion.

The champion it replaces becomes the challenger, so a promotion is undone by promoting that
version back. A training run's model refers to its checkpoint in the checkout (DVC keeps the
bytes); promoting the run, from the checkout's root, registers a self-contained copy.
"""
from __future__ import annotations

import argparse

from agecascade.registry import CHALLENGER, CHAMPION, EXPERIMENT, NAME, aliases, promote


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int, help="an existing version of --name")
    which.add_argument("--run-id", help="an MLflow run that logged an AgeEstimator (registered "
                       "first if it is not a version yet)")
    parser.add_argument("--name", default=NAME, help="registered model name")
    parser.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment of the run "
                        "that logs a self-contained copy of a run's by-reference model")


def main(args: argparse.Namespace) -> int:
    version = promote(args.name, version=args.version, run_id=args.run_id,
                      experiment=args.experiment)
    previous = aliases(args.name).get(CHALLENGER)
    print(f"{args.name} v{version} is {CHAMPION}; {CHALLENGER}: "
          f"{'none' if previous is None else f'v{previous}'}")
    return 0
