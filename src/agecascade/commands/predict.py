"""`agecascade predict`: the age of every face in photos, folders and videos.

The work is ``agecascade.inference``'s; this module builds a ``PredictConfig`` from the command
line, loads the model (a checkpoint, an ONNX file or an MLflow URI), runs, and prints the summary.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agecascade import config as cli_config
from agecascade.inference.annotate import Annotator
from agecascade.inference.predictor import Predictor, load_engine
from agecascade.train.calibration import INTERVAL
from agecascade.inference.run import PredictConfig, run



def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_config.add_arguments(parser, PredictConfig, skip=("inputs",))
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="image files, folders (walked recursively) and videos")
    parser.epilog = (f"age_low / age_high: the {100 * (1 - INTERVAL) / 2:g}th and "
                     f"{100 * (1 + INTERVAL) / 2:g}th percentiles of the predicted age "
                     "distribution, calibrated by the temperature fitted on the validation split "
                     "in training; age_std and p_under_18: its spread and its mass below 18. "
                     "age: the expected value of the network's own distribution. All of them "
                     "read the classes at their bias-corrected ages (the line the validation "
                     "split's predicted ages made against the true ones, also fitted in "
                     "training); probs: the network's class probabilities, over the "
                     "checkpoint's own class ages.")


def main(args: argparse.Namespace) -> int:
    config = cli_config.from_args(PredictConfig, args)
    if config.model.startswith(("models:/", "runs:/")) or "://" in config.model:
        from agecascade.serving import engine_from_uri

        engine = engine_from_uri(config.model, config.device)
    else:
        engine = load_engine(config.model, config.device)
    annotator = Annotator(config.annotate, config.max_pixels) if config.annotate else None
    summary = run(config, Predictor(engine, config.batch, config.flip), annotator)
    where = f"; rows in {config.out}" if config.out else ""
    drawn = f"; {annotator.written} annotated images in {config.annotate}" if annotator else ""
    print(f"predict ({engine.name}, detector {summary.detector}, framing {summary.framing}): "
          f"{summary.line()}{where}{drawn}",
          file=sys.stderr)
    return 0
