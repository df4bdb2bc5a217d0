"""Stage `register`: the lowest FG-NET MAE candidate becomes the registry's champion.

The selection, logging and registration are ``agecascade.candidates``'s; this module turns the
command line into a ``RegisterConfig``, runs it and says what it crowned.
"""
from __future__ import annotations

import argparse

from agecascade import config as cli_config
from agecascade.candidates import RegisterConfig, register_best
from agecascade.registry import CHALLENGER, CHAMPION


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_config.add_arguments(parser, RegisterConfig)


def main(args: argparse.Namespace) -> int:
    report = register_best(cli_config.from_args(RegisterConfig, args))
    best, previous = report["chosen"], report[CHALLENGER]
    print(f"{report['name']} v{report['version']} ({best['backbone']}, mode {best['mode']}, "
          f"FG-NET MAE {best['mae']:.2f}) is {CHAMPION}; {CHALLENGER}: "
          f"{'none' if previous is None else f'v{previous}'}")
    return 0
