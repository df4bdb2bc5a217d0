"""A prepared folder (crops.npy + manifest.parquet) of synthetic faces, for benchmarks that need
a store of a given shape and no real data: FG-NET-sized LOPO, torchrun overhead.

Each image is noise whose brightness grows with its age, so a network can learn something.
Run:  python benchmarks/synthetic_store.py OUT --images 1000 --subjects 82 --size 224
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from agecascade.data.manifest import make_row, to_frame
from agecascade.data.store import CROPS, MANIFEST, create_store


def write(out: Path, images: int, subjects: int, size: int, seed: int = 0) -> Path:
    """``images`` crops of ``size`` px spread over ``subjects`` people (FG-NET's layout: a
    person's photos at several ages), ages 0-69."""
    if images < subjects:
        raise SystemExit(f"--images {images}: at least one per subject ({subjects})")
    rng = np.random.default_rng(seed)
    ages = rng.integers(0, 70, images)
    out.mkdir(parents=True, exist_ok=True)
    store = create_store(out / CROPS, images, size)
    for i, age in enumerate(ages):
        store[i] = np.clip(rng.normal(40 + 3 * age, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    store.flush()
    frame = to_frame([make_row(f"{i:05d}.jpg", "fgnet", age=float(a), subject=f"{i % subjects:03d}")
                      for i, a in enumerate(ages)])
    frame["sha1"] = [f"{i:040x}" for i in range(images)]
    frame.to_parquet(out / MANIFEST, index=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--subjects", type=int, default=82)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    write(args.out, args.images, args.subjects, args.size)


if __name__ == "__main__":
    main()
