"""How MTCNN's box relates to dlib's HOG box on the same face, measured on UTKFace chips.

`predict` falls back to MTCNN where dlib finds no face, and dlib's 5-point shape predictor then
needs a box framed as dlib's HOG frames faces: it places its landmarks relative to the box.
This prints, over chips where both detectors find one face, the median of dlib's box side over
MTCNN's box width and of the centre offset in MTCNN widths (the numbers
``detect.BOX_MAPS["mtcnn", "dlib"]`` holds). Each chip is padded by half its side with its edge
pixels first: MTCNN's box runs past a chip's edge otherwise.

    python benchmarks/box_mapping.py ../shared/datasets/utkface-dev --count 400
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from agecascade.data.detect import detect_faces


def padded(path: Path) -> Image.Image:
    chip = np.asarray(Image.open(path).convert("RGB"))
    pad = chip.shape[0] // 2
    return Image.fromarray(np.pad(chip, ((pad, pad), (pad, pad), (0, 0)), mode="edge"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a folder of UTKFace chips")
    parser.add_argument("--count", type=int, default=400, help="chips sampled (seeded)")
    args = parser.parse_args()
    files = sorted(args.root.rglob("*.jpg"))
    if not files:
        raise SystemExit(f"{args.root}: no .jpg chips")
    rng = np.random.default_rng(0)
    chosen = [files[i] for i in rng.choice(len(files), min(args.count, len(files)), replace=False)]
    scale, dx, dy = [], [], []
    for path in chosen:
        image = padded(path)
        dlib, mtcnn = detect_faces(image, "dlib"), detect_faces(image, "mtcnn")
        if len(dlib) != 1 or len(mtcnn) != 1:
            continue
        (a0, b0, a1, b1), (m0, n0, m1, n1) = dlib[0].box, mtcnn[0].box
        width = m1 - m0
        scale.append((a1 - a0) / width)
        dx.append(((a0 + a1) - (m0 + m1)) / 2 / width)
        dy.append(((b0 + b1) - (n0 + n1)) / 2 / width)
    if not scale:
        raise SystemExit("no chip had exactly one face for both detectors")
    q = lambda v: [round(float(x), 4) for x in np.percentile(v, [25, 50, 75])]
    print(json.dumps({"chips": len(chosen), "paired": len(scale), "side_over_width_q": q(scale),
                      "dx_q": q(dx), "dy_q": q(dy)}))


if __name__ == "__main__":
    main()
