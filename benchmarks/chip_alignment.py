"""How a dataset's own aligner frames faces, by age, against the one template `predict` uses.

`predict` warps every face so that dlib's five landmarks land on the chips' median place (the
recipe's template). If the dataset's aligner frames children differently from adults (a
different zoom or centre), a network trained on the raw chips learns that framing as a cue the
photos do not carry. This fits, for each chip, the similarity that takes its landmarks onto
the median template, and prints its scale and the chip centre's shift per age band
(docs/zero-shot.md, item 10).

Run:
  python benchmarks/chip_alignment.py ../shared/datasets/utkface-dev [--limit 2500] [--json]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from agecascade.data.cropper import Framing, face_framing
from agecascade.data.landmarks import landmarks_available, scale_and_shift
from agecascade.data.prepare import framing_summary
from agecascade.errors import MissingInput, UserError

BANDS = ((0, 2), (3, 5), (6, 12), (13, 19), (20, 39), (40, 59), (60, 200))


def chip_framings(root: Path, limit: int, seed: int) -> tuple[np.ndarray, list[Framing], int]:
    """(ages (N,), the N framings `prepare --box image` measures, chips without a dlib face)
    for a seeded sample of UTKFace-named chips (``AGE_GENDER_RACE_DATE.jpg.chip.jpg``)."""
    chips = sorted(root.rglob("*.chip.jpg"))
    if not chips:
        raise MissingInput(f"{root}: no UTKFace chips (*.chip.jpg)")
    random.Random(seed).shuffle(chips)
    ages, framings, missed = [], [], 0
    for chip in chips[:limit]:
        framing = face_framing(Image.open(chip).convert("RGB"))
        if framing is None or framing.detector != "dlib":
            missed += 1
            continue
        ages.append(int(chip.name.split("_")[0]))
        framings.append(framing)
    return np.array(ages), framings, missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--limit", type=int, default=2500, help="chips sampled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per band")
    args = parser.parse_args()
    if not landmarks_available():
        raise UserError("needs dlib's 5-point shape predictor (pip install 'agecascade[faces]')")
    ages, framings, missed = chip_framings(args.root, args.limit, args.seed)
    template = np.array(framing_summary(framings)["template"])   # the recipe's, as prepare makes it
    points = np.array([f.landmarks for f in framings])
    scale, centre = map(np.array, zip(*(scale_and_shift(p, template) for p in points)))
    eyes = np.linalg.norm(points[:, [0, 1]].mean(1) - points[:, [2, 3]].mean(1), axis=1)
    if not args.json:
        print(f"{len(ages)} chips with a dlib face, {missed} without; per band, medians:")
        print("band     chips  scale to template  centre shift (x, y)  eye distance")
    for low, high in BANDS:
        band = (ages >= low) & (ages <= high)
        if not band.any():
            continue
        row = {"band": f"{low}-{high}" if high < 200 else f"{low}+", "chips": int(band.sum()),
               "scale": round(float(np.median(scale[band])), 3),
               "centre_shift": np.median(centre[band], axis=0).round(3).tolist(),
               "eye_distance": round(float(np.median(eyes[band])), 3)}
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{row['band']:8} {row['chips']:5}  {row['scale']:17.3f}  "
                  f"({row['centre_shift'][0]:+.3f}, {row['centre_shift'][1]:+.3f})       "
                  f"{row['eye_distance']:.3f}")


if __name__ == "__main__":
    main()
