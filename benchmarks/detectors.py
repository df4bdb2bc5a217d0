"""Face detectors of ``detect_faces`` on a folder of photos: how often each finds the face, how
often it is right, how many false faces it adds, and how fast it is on one process and one thread.

The right face: a returned box contains the centre of the photo's 68 landmarks, read from
``<folder>/../points/<name>.pts`` (FG-NET's layout); photos without one count for "found" only.
Ages come from FG-NET names (``NNNAxx``) or UTKFace names (``age_gender_race_...``).
Speed is ``detect_faces`` alone on decoded images (the working copy's resize included, the file's
decoding not). ``--grid 4`` puts 4 x 4 photos side by side in one image: each face
is then 1/4 as large relative to the image, as in a group photo. Run:
  python benchmarks/detectors.py ../shared/datasets/fgnet-dev/images [--grid 4]
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from agecascade.data.adapters.fgnet import read_pts
from agecascade.data import detect
from agecascade.data.detect import AUTO_ORDER, Detection, detect_face, detect_faces, use_threads
from agecascade.data.imaging import decode
from agecascade.errors import UserError

BANDS = ((0, 12, "0-12"), (13, 19, "13-19"), (20, 39, "20-39"), (40, 200, "40+"))
AGE_IN_NAME = (re.compile(r"^\d{3}a(\d{2})", re.IGNORECASE), re.compile(r"^(\d{1,3})_\d_\d_"))
SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class Face:
    band: str | None
    centre: tuple[float, float] | None  # of the annotated landmarks, in the test image's pixels


@dataclass
class Sample:
    image: Image.Image
    faces: list[Face]


def age_band(name: str) -> str | None:
    for pattern in AGE_IN_NAME:
        match = pattern.match(name)
        if match:
            age = int(match[1])
            return next(label for low, high, label in BANDS if low <= age <= high)
    return None


def load_photos(folder: Path, limit: int | None) -> list[Sample]:
    """Every photo of the folder, or ``limit`` of them evenly spaced over its sorted names."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if limit and limit < len(files):
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    points = folder.parent / "points"
    photos = []
    for file in files:
        pts = points / f"{file.stem.lower()}.pts"
        centre = tuple(read_pts(pts).mean(axis=0)) if pts.is_file() else None
        image = decode(file.read_bytes(), file.name).image
        photos.append(Sample(image, [Face(age_band(file.name), centre)]))
    return photos


def grids(photos: list[Sample], n: int) -> list[Sample]:
    """n x n photos side by side in one image, as in a group photo: each face n times smaller
    relative to the image, none smaller in pixels. Cells take the first photo's size."""
    cell_w, cell_h = photos[0].image.size
    samples = []
    for first in range(0, len(photos), n * n):
        canvas, faces = Image.new("RGB", (n * cell_w, n * cell_h), (128, 128, 128)), []
        for k, photo in enumerate(photos[first:first + n * n]):
            left, top = (k % n) * cell_w, (k // n) * cell_h
            canvas.paste(photo.image.resize((cell_w, cell_h), Image.BILINEAR), (left, top))
            sx, sy = cell_w / photo.image.width, cell_h / photo.image.height
            faces += [Face(face.band, None if face.centre is None
                           else (left + face.centre[0] * sx, top + face.centre[1] * sy))
                      for face in photo.faces]
        samples.append(Sample(canvas, faces))
    return samples


def contains(detection: Detection, point: tuple[float, float]) -> bool:
    x0, y0, x1, y1 = detection.box
    return x0 <= point[0] <= x1 and y0 <= point[1] <= y1


def prepare_faces(image: Image.Image) -> list[Detection]:
    """prepare's one face (detect_face: HOG, then Haar), as a reference under the same load."""
    found = detect_face(image)
    return [] if found is None else [Detection(found[0], 0.0, found[1])]


def finder(label: str) -> Callable[[Image.Image], list[Detection]]:
    """"prepare", a name of DETECTORS, or NAME/K: that detector looking for faces down to
    long side / K (its private setting, swapped in for the call)."""
    if label == "prepare":
        return prepare_faces
    name, _, fraction = label.partition("/")
    if not fraction:
        return functools.partial(detect_faces, detector=name)
    tuned = replace(detect._SPECS[name], fraction=int(fraction))

    def find(image: Image.Image) -> list[Detection]:
        default, detect._SPECS[name] = detect._SPECS[name], tuned
        try:
            return detect_faces(image, name)
        finally:
            detect._SPECS[name] = default
    return find


@dataclass
class Tally:
    seconds: float = 0.0
    images: int = 0
    found: int = 0           # images with a box
    faces: int = 0           # annotated faces
    hits: int = 0            # annotated faces inside a box
    checked: int = 0         # images with an annotated face
    largest_right: int = 0   # of those, images whose first box holds one
    extra: int = 0           # boxes holding no annotated face
    bands: dict[str, list[int]] = field(default_factory=lambda: {b: [0, 0] for _, _, b in BANDS})

    def add(self, sample: Sample, boxes: list[Detection], seconds: float) -> None:
        self.seconds += seconds
        self.images += 1
        self.found += bool(boxes)
        centres = [face.centre for face in sample.faces if face.centre is not None]
        for face in sample.faces:
            ok = bool(boxes) if face.centre is None else any(contains(b, face.centre) for b in boxes)
            if face.band:
                self.bands[face.band][0] += ok
                self.bands[face.band][1] += 1
            if face.centre is not None:
                self.faces += 1
                self.hits += ok
        if centres:
            self.checked += 1
            self.largest_right += bool(boxes) and any(contains(boxes[0], c) for c in centres)
            self.extra += sum(not any(contains(b, c) for c in centres) for b in boxes)

    def row(self, label: str) -> dict[str, str]:
        def share(count: int, total: int) -> str:
            return f"{100 * count / total:.1f}" if total else "–"
        row = {"detector": label, "found %": share(self.found, self.images),
               "right %": share(self.hits, self.faces)}
        row.update({f"{band} %": share(*self.bands[band]) for _, _, band in BANDS})
        row.update({"largest right %": share(self.largest_right, self.checked),
                    "extra / img": f"{self.extra / self.checked:.3f}" if self.checked else "–",
                    "img/s": f"{self.images / self.seconds:.1f}"})
        return row


def measure(labels: list[str], samples: list[Sample]) -> dict[str, Tally]:
    """Every detector on each image in turn, so that a change of the machine's load during the
    run slows all of them alike."""
    finders = {}
    for label in labels:
        try:
            finders[label] = finder(label)
            finders[label](samples[0].image)  # loads the model outside the timing
        except UserError as err:
            print(f"{label}: skipped, {err}")
            finders.pop(label)
    tallies = {label: Tally() for label in finders}
    for sample in samples:
        for label, find in finders.items():
            start = time.perf_counter()
            boxes = find(sample.image)
            tallies[label].add(sample, boxes, time.perf_counter() - start)
    return tallies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder of photos (FG-NET: .../fgnet-dev/images)")
    parser.add_argument("--detectors", default=",".join((*AUTO_ORDER, "prepare")),
                        help="comma-separated names for detect_faces, NAME/K to look for faces "
                             "down to long side / K, or 'prepare' for prepare's detect_face "
                             "(default: %(default)s)")
    parser.add_argument("--limit", type=int, help="only this many photos, evenly spaced by name")
    parser.add_argument("--grid", type=int, default=1,
                        help="test images of grid x grid photos side by side (group photos)")
    args = parser.parse_args()

    use_threads(1)
    samples = load_photos(args.folder, args.limit)
    faces = [face for sample in samples for face in sample.faces]
    bands = {band: sum(f.band == band for f in faces) for _, _, band in BANDS}
    if args.grid > 1:
        samples = grids(samples, args.grid)
    width, height = samples[0].image.size
    print(f"{len(faces)} faces of {args.folder} in {len(samples)} images ({width}x{height} first), "
          f"by age band {bands}, {sum(f.centre is not None for f in faces)} with landmarks; "
          f"{os.cpu_count()} cores, 1 thread; looking for faces down to "
          + ", ".join(f"{name} 1/{spec.fraction}" for name, spec in detect._SPECS.items())
          + " of the long side")
    print("right %: a box contains the face's landmark centre (age bands: the same, or found % "
          "without landmarks); largest right: the first box does; extra: boxes containing no "
          "face's centre\n")
    load = os.getloadavg()[0]
    tallies = measure([label.strip() for label in args.detectors.split(",")], samples)
    rows = [tally.row(label) for label, tally in tallies.items()]
    if rows:
        print("| " + " | ".join(rows[0]) + " |")
        print("|" + "---|" * len(rows[0]))
        for row in rows:
            print("| " + " | ".join(row.values()) + " |")
    print(f"\n1-minute load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
