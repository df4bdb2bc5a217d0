"""Thesis figure 14 in one call: Grad-CAM of one backbone before and after each fine-tuning step.

The same faces every run and for every backbone (``spread_over_ages``), so figures of two runs or
two backbones can be set side by side. One column shows the starting weights ("before
fine-tuning"), one each ``TITLE=PATH`` checkpoint, in cascade order. ``run`` writes the grid as
one PNG and returns what it shows; it logs nothing: the stage module decides where that goes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from agecascade.config import device_option, option
from agecascade.data.store import load_prepared
from agecascade.errors import UserError
from agecascade.explain.cam import MIN_SIDE, cam_grid, cam_maps, predict_ages, target_layer
from agecascade.nets import BACKBONES, PRETRAINED, AgeNet, create_model
from agecascade.nets.checkpoint import input_spec, load_checkpoint
from agecascade.nets.weights import InputSpec
from agecascade.train.data import IMAGENET
from agecascade.train.engine import pick_device

BEFORE = "before fine-tuning"


def parse_model(spec: str) -> tuple[str, Path]:
    """``TITLE=PATH`` -> (title, path)."""
    title, sep, path = spec.partition("=")
    if not sep or not title or not path:
        raise UserError(f"--model {spec!r}: expected TITLE=PATH, e.g. "
                        "IMDB=models/vgg16/imdb/model.pt")
    return title, Path(path)


@dataclass(frozen=True, kw_only=True)
class CamConfig:
    """Every setting of the `cam` stage and its default; the command line is built from it,
    so a default lives here only."""
    manifest: Path = option(help="a `prepare` output folder with ages (the thesis: FG-NET)")
    images: int = option(8, help="faces (rows), spread over ages")
    model: tuple[str, ...] = option(
        repeat=True, metavar="TITLE=PATH",
        help="a column: a stage's model.pt and its title; repeat in cascade order")
    backbone: str = option(help=f"the starting network: {', '.join(BACKBONES)} or a "
                                "torchvision name")
    pretrained: str = option("none", choices=PRETRAINED, help="the starting network's weights")
    weights: str = option("", help="weights file for --pretrained vggface2")
    seed: int = option(0, help="seeds the starting network's random layers (its head at least)")
    input_size: int = option(0, help="pixels the networks see (0 = the checkpoints' input_size)")
    min_map_side: int = option(MIN_SIDE, help="explain the deepest block whose map is at least "
                                              "this many cells a side (the last block itself at "
                                              "224 px)")
    device: str = device_option()
    out: Path = option(help="the PNG to write")

    def __post_init__(self) -> None:
        if not self.model:
            raise UserError("--model: name at least one checkpoint as TITLE=PATH")
        for spec in self.model:  # every one TITLE=PATH, checked before any work
            parse_model(spec)
        if self.pretrained not in PRETRAINED:
            raise UserError(f"--pretrained {self.pretrained!r}: use one of {PRETRAINED}")
        if self.images < 1 or self.min_map_side < 1 or self.input_size < 0:
            raise UserError(f"--images and --min-map-side must be >= 1, --input-size >= 0 (got "
                            f"{self.images}, {self.min_map_side}, {self.input_size})")

    @property
    def columns(self) -> list[tuple[str, Path]]:
        """(title, checkpoint path) per ``--model``, in cascade order."""
        return [parse_model(spec) for spec in self.model]


def spread_over_ages(manifest: pd.DataFrame, n: int, source: Path) -> np.ndarray:
    """Rows of ``n`` faces whose ages are nearest to ``n`` evenly spaced ages between the
    youngest and oldest: the same rows whatever the manifest's row order (ties go to the
    smaller path), so every run and every backbone shows the same faces."""
    ages = manifest["age"].to_numpy(dtype=float, na_value=np.nan)
    known = np.flatnonzero(~np.isnan(ages))
    if n < 1 or n > len(known):
        raise UserError(f"--images {n}: {source} has {len(known)} faces with an age "
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


def starting_network(config: CamConfig, classes: int) -> tuple[AgeNet, InputSpec]:
    """The weights fine-tuning starts from, with a seeded random head of ``classes`` outputs."""
    torch.manual_seed(config.seed)
    model = create_model(config.backbone, classes, config.pretrained,
                         Path(config.weights) if config.weights else None)
    return model, model.load_report.input_spec if model.load_report else IMAGENET


def run(config: CamConfig) -> dict:
    """Write the figure; return what it shows (dataset, faces, predictions, explained layers)."""
    started = time.perf_counter()
    models = config.columns
    for title, path in models:
        if not path.is_file():
            raise UserError(f"--model {title}={path}: no file {path}")
    device = pick_device(config.device)
    manifest, crops = load_prepared(config.manifest)
    rows = spread_over_ages(manifest, config.images, config.manifest)
    images = np.ascontiguousarray(crops[rows])  # (N, H, W, 3) uint8
    true_ages = manifest["age"].to_numpy(dtype=float, na_value=np.nan)[rows]

    checkpoints = [(title, *load_checkpoint(path, device)) for title, path in models]
    sizes = {meta["input_size"] for _, _, meta in checkpoints}
    if not config.input_size and len(sizes) > 1:
        raise UserError(f"the checkpoints were trained at different sizes {sorted(sizes)}; "
                        "choose one with --input-size")
    size = config.input_size or sizes.pop()
    first_meta = checkpoints[0][2]
    before, before_spec = starting_network(config, len(first_meta["ages"]))
    if before.arch != first_meta["arch"]:
        raise UserError(f"--backbone {config.backbone} --pretrained {config.pretrained} builds "
                        f"{before.arch}, but {models[0][1]} is a {first_meta['arch']}")
    networks = [(BEFORE, before, before_spec, first_meta["ages"])]
    networks += [(title, model, input_spec(meta), meta["ages"])
                 for title, model, meta in checkpoints]

    columns, shown = [], []
    for title, model, spec, ages in networks:
        name, layer = target_layer(model, size, config.min_map_side)
        maps = cam_maps(model, images, size, spec, ages, device, layer)
        predicted = predict_ages(model, images, size, spec, ages, device)
        # Blank: no location raises the age (Grad-CAM keeps the positive part) or no gradient.
        blank = int((np.ptp(maps.reshape(len(maps), -1), axis=1) == 0).sum())
        columns.append((title, maps, predicted))
        shown.append({"title": title, "layer": name, "blank_maps": blank,
                      "predicted": predicted.round(2).tolist()})
        print(f"{title}: Grad-CAM of {model.arch}.{name}, {blank} of {len(maps)} maps blank, "
              f"predicted ages {np.array2string(predicted, precision=1)}")
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_bytes(cam_grid(columns, images, true_ages))
    print(f"{len(rows)} faces x {len(columns)} models at {size} px -> {config.out} "
          f"in {time.perf_counter() - started:.1f} s")
    return {"manifest": str(config.manifest), "dataset": str(manifest["dataset"].iloc[0]),
            "input_size": size, "faces": manifest["path"].astype(str).to_numpy()[rows].tolist(),
            "true_ages": true_ages.tolist(), "columns": shown}
