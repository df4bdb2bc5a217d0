"""Stage `prepare`: a dataset root in its native layout -> manifest, crop store and drop report.

The computation and its settings live in ``agecascade.data.prepare``; this module turns the
command line into a ``PrepareConfig``, runs it and prints the drop summary. The dataset stays a
positional argument (``agecascade prepare fgnet --root ...``), as dvc.yaml calls it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from agecascade import config as cli_config
from agecascade.data.prepare import PrepareConfig, run
from agecascade.data.store import COUNTS, CROPS, MANIFEST, REPORT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    dataset = next(f for f in dataclasses.fields(PrepareConfig) if f.name == "dataset")
    parser.add_argument("dataset", choices=dataset.metadata["choices"],
                        help=dataset.metadata["help"])
    cli_config.add_arguments(parser, PrepareConfig, skip=("dataset",))


def main(args: argparse.Namespace) -> int:
    config = cli_config.from_args(PrepareConfig, args)
    start = time.perf_counter()
    report = run(config)
    seconds = time.perf_counter() - start
    print(report.summary())
    print(f"  {report.input_rows / max(seconds, 1e-9):.1f} input rows/s over {seconds:.1f} s "
          f"on {config.workers} worker(s); wrote "
          f"{config.out}/{{{MANIFEST},{CROPS},{REPORT},{COUNTS}}}")
    if report.kept == 0:
        print(f"warning: no usable face in {config.root}; see {config.out / REPORT}",
              file=sys.stderr)
    return 0
