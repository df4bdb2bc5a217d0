"""`agecascade evaluate`: the DEX mean absolute error of a model file on any prepared manifest,
of the network's own ages and of the bias-corrected ages `predict` gives, and how often its
calibrated 90 % interval (the one `predict` reports) holds the true age."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from agecascade.calibrated import bias_line_of, temperature_of
from agecascade.data.store import load_prepared
from agecascade.errors import UserError
from agecascade.nets.checkpoint import input_spec, load_checkpoint
from agecascade.nets.dex import dex_age
from agecascade.train.calibration import corrected_ages, coverage
from agecascade.train.compute import PRECISIONS, choose_compute
from agecascade.train.data import LabelSpace, assign_split, make_loader
from agecascade.train.engine import pick_device, predict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model.pt of `agecascade train`")
    parser.add_argument("--manifest", type=Path, required=True, help="a `prepare` output folder")
    parser.add_argument("--split", choices=["all", "train", "val", "test"], default="all",
                        help="rows of the model's own train/val/test split (same manifest)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="as in `train`; auto reproduces the test MAE that `train` reported")


def main(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    model, meta = load_checkpoint(args.model, device)
    manifest, crops = load_prepared(args.manifest)
    ages = manifest["age"].to_numpy(dtype=float)
    if np.isnan(ages).any():
        raise UserError(f"{args.manifest}: rows without an age cannot be scored by MAE")
    rows = np.arange(len(manifest))
    if args.split != "all":
        split = assign_split(manifest, meta["val_fraction"], meta["test_fraction"], meta["seed"])
        rows = np.flatnonzero(split == args.split)
    if len(rows) == 0:
        raise UserError(f"no rows in split {args.split!r} of {args.manifest}")
    space = LabelSpace(tuple(meta["ages"]))
    loader = make_loader(crops, space.encode(ages), rows, args.batch, False, 0, 0, False)
    compute = choose_compute(device, meta["arch"], args.precision)
    logits, labels, predicted = predict(model, loader, compute, meta["input_size"],
                                        space.tensor(device), input_spec(meta))
    errors = np.abs(predicted.numpy() - ages[rows])
    temperature, line = temperature_of(meta), bias_line_of(meta)
    read = corrected_ages(np.asarray(space.values), line)
    corrected = dex_age(logits, torch.from_numpy(read)).numpy()
    result = {"n": int(len(rows)), "mae": float(errors.mean()),
              "median_ae": float(np.median(errors)),
              "mae_bias_corrected": float(np.abs(corrected - ages[rows]).mean()),
              "split": args.split, "temperature": temperature, "bias_line": list(line),
              "coverage": coverage(logits, ages[rows], read, temperature)}
    print(json.dumps(result, indent=2))
    return 0
