"""`agecascade export`: a model.pt as a self-contained ONNX file, checked against PyTorch.

The check runs the same crops through both and refuses the file if their ages differ by more
than ``MAX_AGE_DIFF`` years. Real face crops (``--check-crops``, a `prepare` output) probe the
network where it is used; without them it checks on synthetic crops.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agecascade import config as cli_config
from agecascade.config import option
from agecascade.data.store import load_prepared
from agecascade.errors import UserError
from agecascade.inference.onnx import MIN_OPSET, PROBE_CROPS, export_onnx

FORMATS = ("onnx",)


@dataclass(frozen=True)
class ExportConfig:
    model: Path = option(help="model.pt of a training stage")
    out: Path = option(help="the file to write, e.g. model.onnx")
    format: str = option("onnx", choices=FORMATS, help="the exported format")
    opset: int = option(MIN_OPSET, help=f"ONNX opset ({MIN_OPSET} or later)")
    check_crops: Path | None = option(None, help=f"a `prepare` output folder: up to "
                                      f"{PROBE_CROPS} of its crops check the export against "
                                      "PyTorch (default: synthetic crops)")


def sample_crops(folder: Path, n: int = PROBE_CROPS) -> np.ndarray:
    """Up to ``n`` crops of a prepared folder, spread evenly over its rows."""
    _, crops = load_prepared(folder)
    if len(crops) == 0:
        raise UserError(f"{folder}: no crops to check the export with")
    rows = np.unique(np.linspace(0, len(crops) - 1, min(n, len(crops))).round().astype(int))
    return np.asarray(crops[rows])


def export(config: ExportConfig) -> dict:
    if config.format not in FORMATS:
        raise UserError(f"unknown export format {config.format!r}; known: {', '.join(FORMATS)}")
    crops = None if config.check_crops is None else sample_crops(config.check_crops)
    return export_onnx(config.model, config.out, config.opset, crops)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_config.add_arguments(parser, ExportConfig)


def main(args: argparse.Namespace) -> int:
    print(json.dumps(export(cli_config.from_args(ExportConfig, args)), indent=2))
    return 0
