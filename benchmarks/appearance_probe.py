"""What a model reads as age: its test-split MAE and signed error with one appearance effect at a
time applied to the test crops (greyscale, sepia, blur, JPEG, grain, zoom in and out).

A model whose ages move with pixel grain or blur has learnt the photo, not the face, and will
over- or under-age scanned and old photos (docs/zero-shot.md: a model trained without grain
added 39 years to UTKFace test chips given noise of std 0.05). The crops are the store's own,
split as `train --val-fraction V --test-fraction T --seed S` split them, and go through the
same ``Predictor`` as `agecascade predict` (flip TTA on). Run:
  python benchmarks/appearance_probe.py --model models/utkface-dev-mobilenet_v2/model.pt \\
      --manifest prepared/utkface-dev [--json]
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from agecascade.data.store import load_prepared
from agecascade.inference.predictor import Predictor, TorchEngine
from agecascade.train.data import assign_split
from agecascade.train.degrade import LUMA, SEPIA, gaussian_blur, jpeg_roundtrip, recolour

Effect = Callable[[torch.Tensor], torch.Tensor]   # RGB in [0, 1], (B,3,S,S) -> the same


def _zoom(fraction: float) -> Effect:
    """< 1: the central ``fraction`` of the crop, enlarged; > 1: the crop inside a border of
    its own edge pixels, shrunk."""
    def apply(x: torch.Tensor) -> torch.Tensor:
        side = x.shape[-1]
        if fraction < 1:
            keep = round(side * fraction)
            start = (side - keep) // 2
            x = x[..., start:start + keep, start:start + keep]
        else:
            pad = round(side * (fraction - 1) / 2)
            x = F.pad(x, (pad,) * 4, mode="replicate")
        return F.interpolate(x, size=side, mode="bilinear", antialias=True, align_corners=False)
    return apply


def effects(seed: int) -> dict[str, Effect]:
    gen = torch.Generator().manual_seed(seed)
    grey = (LUMA,) * 3
    return {
        "none": lambda x: x,
        "greyscale": lambda x: recolour(x, grey),
        "sepia": lambda x: recolour(x, SEPIA),
        "blur sigma 1.5 px": lambda x: gaussian_blur(x, torch.full((len(x),), 1.5)),
        "blur sigma 3 px": lambda x: gaussian_blur(x, torch.full((len(x),), 3.0)),
        "JPEG quality 20": lambda x: jpeg_roundtrip(x, [20] * len(x)),
        "noise std 0.05": lambda x: (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1),
        "zoom in to 90 %": _zoom(0.9),
        "zoom in to 80 %": _zoom(0.8),
        "zoom out to 111 %": _zoom(1 / 0.9),
        "contrast x 0.5": lambda x: _contrast(x, 0.5),
        "contrast x 1.5": lambda x: _contrast(x, 1.5),
        "exposure x 1.6": lambda x: x * 1.6,
        "exposure x 0.5": lambda x: x * 0.5,
        "gamma 0.6": lambda x: x ** 0.6,
        "gamma 1.6": lambda x: x ** 1.6,
        "warm cast": lambda x: x * x.new_tensor([1.15, 1.0, 0.8]).view(1, 3, 1, 1),
    }


def _contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Each image's pixels moved toward (< 1) or away from (> 1) its own mean grey level."""
    grey = recolour(x, (LUMA,) * 3).mean((1, 2, 3), keepdim=True)
    return grey + factor * (x - grey)


def probe(predictor: Predictor, crops: np.ndarray, ages: np.ndarray, seed: int) -> dict:
    """Effect name -> MAE and signed error overall, and signed error for ages 0-12 and 13+."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255
    child = ages <= 12
    results = {}
    for name, effect in effects(seed).items():
        pixels = (effect(x.clone()).clamp(0, 1) * 255).round().byte()
        predicted = predictor.estimate(pixels.permute(0, 2, 3, 1).contiguous().numpy())[0]["age"]
        error = predicted - ages
        results[name] = {"mae": round(float(np.abs(error).mean()), 3),
                         "signed": round(float(error.mean()), 3),
                         "signed_0_12": round(float(error[child].mean()), 3) if child.any() else None,
                         "signed_13_up": round(float(error[~child].mean()), 3) if (~child).any() else None}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a model.pt")
    parser.add_argument("--manifest", type=Path, required=True, help="the `prepare` folder it trained on")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0, help="the training run's --seed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    manifest, crops = load_prepared(args.manifest)
    rows = np.flatnonzero(assign_split(manifest, args.val_fraction, args.test_fraction,
                                       args.seed) == args.split)
    if len(rows) == 0:
        parser.error(f"the {args.split} split of {args.manifest} is empty with these fractions")
    predictor = Predictor(TorchEngine(args.model, "cpu"))
    results = probe(predictor, crops[rows], manifest["age"].to_numpy(float)[rows], args.seed)
    if args.json:
        print(json.dumps({"images": len(rows), "effects": results}))
        return 0
    print(f"{args.model} on {len(rows)} {args.split} crops of {args.manifest}")
    print(f"{'effect':<20} {'MAE':>6} {'signed':>7} {'0-12':>7} {'13+':>7}")
    for name, r in results.items():
        shown = [f"{v:+7.2f}" if v is not None else "    n/a" for v in
                 (r["signed"], r["signed_0_12"], r["signed_13_up"])]
        print(f"{name:<20} {r['mae']:6.2f} {' '.join(shown)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
