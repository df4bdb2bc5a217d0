"""Stage `cam`: Grad-CAM maps of one backbone before and after each fine-tuning step (figure 14).

The same faces every run and for every backbone (``spread_over_ages``), one column for the
starting weights ("before fine-tuning") and one per ``--model TITLE=PATH`` checkpoint. Writes
the grid as one PNG; logs it with the chosen faces, predictions and layers to MLflow (experiment
"cam", one run per backbone) unless --no-track.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from agecascade.data.store import MANIFEST, load_prepared
from agecascade.explain.cam import MIN_SIDE, cam_grid, cam_maps, predict_ages, target_layer
from agecascade.nets import BACKBONES, PRETRAINED, AgeNet, create_model
from agecascade.nets.checkpoint import input_spec, load_checkpoint
from agecascade.nets.weights import InputSpec
from agecascade.train.data import IMAGENET
from agecascade.train.engine import pick_device

BEFORE = "before fine-tuning"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, required=True,
                        help="a `prepare` output folder with ages (the thesis: FG-NET)")
    parser.add_argument("--images", type=int, default=8, help="faces (rows), spread over ages")
    parser.add_argument("--model", action="append", required=True, metavar="TITLE=PATH",
                        help="a column: a stage's model.pt and its title; repeat in cascade order")
    parser.add_argument("--backbone", required=True,
                        help=f"the starting network: {', '.join(BACKBONES)} or a torchvision name")
    parser.add_argument("--pretrained", choices=PRETRAINED, default="none")
    parser.add_argument("--weights", default="", help="weights file for --pretrained vggface2")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the starting network's random layers (its head at least)")
    parser.add_argument("--input-size", type=int, default=0,
                        help="pixels the networks see (0 = the checkpoints' input_size)")
    parser.add_argument("--min-map-side", type=int, default=MIN_SIDE,
                        help="explain the deepest block whose map is at least this many cells "
                             "a side (the last block itself at 224 px)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def parse_models(specs: list[str]) -> list[tuple[str, Path]]:
    """``TITLE=PATH`` strings -> (title, path), each path checked to exist."""
    models = []
    for spec in specs:
        title, sep, path = spec.partition("=")
        if not sep or not title or not path:
            raise ValueError(f"--model {spec!r}: expected TITLE=PATH, e.g. IMDB=models/vgg16/imdb/model.pt")
        if not Path(path).is_file():
            raise ValueError(f"--model {spec!r}: no file {path}")
        models.append((title, Path(path)))
    return models


def spread_over_ages(manifest: pd.DataFrame, n: int, source: Path) -> np.ndarray:
    """Rows of ``n`` faces whose ages are nearest to ``n`` evenly spaced ages between the
    youngest and oldest: the same rows whatever the manifest's row order (ties go to the
    smaller path), so every run and every backbone shows the same faces."""
    ages = manifest["age"].to_numpy(dtype=float, na_value=np.nan)
    known = np.flatnonzero(~np.isnan(ages))
    if n < 1 or n > len(known):
        raise ValueError(f"--images {n}: {source} has {len(known)} faces with an age "
                         f"({len(manifest) - len(known)} without)")
    paths = manifest["path"].astype(str).to_numpy()[known]
    order = known[np.lexsort((paths, ages[known]))]  # rows by age, then path
    sorted_ages = ages[order]
    free = np.ones(len(order), dtype=bool)
    chosen = []
    for goal in np.linspace(sorted_ages[0], sorted_ages[-1], n):
        distance = np.where(free, np.abs(sorted_ages - goal), np.inf)
        pick = int(np.argmin(distance))  # the first minimum: the smallest (age, path)
        free[pick] = False
        chosen.append(order[pick])
    return np.asarray(chosen)


def starting_network(args: argparse.Namespace, classes: int) -> tuple[AgeNet, InputSpec]:
    """The weights fine-tuning starts from, with a seeded random head of ``classes`` outputs."""
    torch.manual_seed(args.seed)
    model = create_model(args.backbone, classes, args.pretrained,
                         Path(args.weights) if args.weights else None)
    return model, model.load_report.input_spec if model.load_report else IMAGENET


def run(args: argparse.Namespace) -> dict:
    """Write the figure; return what it shows (faces, predictions, explained layers)."""
    started = time.perf_counter()
    device = pick_device(args.device)
    models = parse_models(args.model)
    manifest, crops = load_prepared(args.manifest)
    rows = spread_over_ages(manifest, args.images, args.manifest)
    images = np.ascontiguousarray(crops[rows])  # (N, H, W, 3) uint8
    true_ages = manifest["age"].to_numpy(dtype=float, na_value=np.nan)[rows]

    checkpoints = [(title, *load_checkpoint(path, device)) for title, path in models]
    sizes = {meta["input_size"] for _, _, meta in checkpoints}
    if not args.input_size and len(sizes) > 1:
        raise ValueError(f"the checkpoints were trained at different sizes {sorted(sizes)}; "
                         "choose one with --input-size")
    size = args.input_size or sizes.pop()
    first_meta = checkpoints[0][2]
    before, before_spec = starting_network(args, len(first_meta["ages"]))
    if before.arch != first_meta["arch"]:
        raise ValueError(f"--backbone {args.backbone} --pretrained {args.pretrained} builds "
                         f"{before.arch}, but {models[0][1]} is a {first_meta['arch']}")
    networks = [(BEFORE, before, before_spec, first_meta["ages"])]
    networks += [(title, model, input_spec(meta), meta["ages"]) for title, model, meta in checkpoints]

    columns, shown = [], []
    for title, model, spec, ages in networks:
        name, layer = target_layer(model, size, args.min_map_side)
        maps = cam_maps(model, images, size, spec, ages, device, layer)
        predicted = predict_ages(model, images, size, spec, ages, device)
        # Blank: no location raises the age (Grad-CAM keeps the positive part) or no gradient.
        blank = int((np.ptp(maps.reshape(len(maps), -1), axis=1) == 0).sum())
        columns.append((title, maps, predicted))
        shown.append({"title": title, "layer": name, "blank_maps": blank,
                      "predicted": predicted.round(2).tolist()})
        print(f"{title}: Grad-CAM of {model.arch}.{name}, {blank} of {len(maps)} maps blank, "
              f"predicted ages {np.array2string(predicted, precision=1)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(cam_grid(columns, images, true_ages))
    print(f"{len(rows)} faces x {len(columns)} models at {size} px -> {args.out} "
          f"in {time.perf_counter() - started:.1f} s")
    return {"manifest": str(args.manifest), "input_size": size,
            "faces": manifest["path"].astype(str).to_numpy()[rows].tolist(),
            "true_ages": true_ages.tolist(), "columns": shown}


def main(args: argparse.Namespace) -> int:
    if args.no_track:
        run(args)
        return 0
    import mlflow

    from agecascade import tracking

    dataset = str(pd.read_parquet(args.manifest / MANIFEST, columns=["dataset"])
                  ["dataset"].iloc[0])
    tags = {"backbone": args.backbone, "stage": "cam", "dataset": dataset,
            "pretrained": args.pretrained}
    params = {"manifest": str(args.manifest), "images": args.images, "models": ";".join(args.model),
              "backbone": args.backbone, "seed": args.seed, "min_map_side": args.min_map_side}
    # A figure is made in one go: nothing to resume, so the run-id file lives in a scratch folder.
    with tempfile.TemporaryDirectory() as scratch, \
            tracking.tracked_run("cam", f"{args.backbone}-{dataset}", Path(scratch), tags, params):
        shown = run(args)
        mlflow.log_params({"input_size": shown["input_size"],  # as resolved from the checkpoints
                           "cam_layer": ",".join(sorted({c["layer"] for c in shown["columns"]}))})
        mlflow.log_artifact(str(args.out))
        mlflow.log_dict(shown, "cam.json")
    print(json.dumps({"out": str(args.out), "layers": [c["layer"] for c in shown["columns"]]}))
    return 0
