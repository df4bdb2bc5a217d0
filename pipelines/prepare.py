"""Stage `prepare`: a dataset root in its native layout -> manifest, crop store and drop report.

Writes into OUT:
  manifest.parquet  one row per kept face (see agecascade.data.manifest.COLUMNS)
  crops.npy         (N, size, size, 3) uint8, row i is manifest row i
  report.json       counts per drop reason and every dropped or flagged file with its reason
  counts.json       the flat counts alone, for `dvc metrics show`
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from functools import partial
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from agecascade.data.adapters import ADAPTERS, get_adapter
from agecascade.data.cropper import BOX_POLICIES, CropJob, CropSettings, crop_file
from agecascade.data.detect import available_detectors
from agecascade.data.imaging import DEFAULT_MAX_PIXELS
from agecascade.data.report import DropReport
from agecascade.data.store import COUNTS, CROPS, MANIFEST, REPORT, create_store, shrink_store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=sorted(ADAPTERS))
    parser.add_argument("--root", type=Path, required=True, help="dataset root, native layout")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--size", type=int, default=224, help="crop side in pixels")
    parser.add_argument("--margin", type=float, default=0.4, help="margin per side, x box side")
    parser.add_argument("--box", choices=BOX_POLICIES, default="auto",
                        help="auto: dataset box > detector > whole image; image: whole image "
                             "(for datasets that are already face crops)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="larger images are rejected as decompression bombs")


def _jobs(manifest: pd.DataFrame, root: Path) -> list[CropJob]:
    jobs = []
    for row in manifest.itertuples(index=False):
        box = (row.x0, row.y0, row.x1, row.y1)
        has_box = not any(pd.isna(v) for v in box)
        jobs.append(CropJob(str(root / row.path), tuple(map(float, box)) if has_box else None,
                            row.box_source if has_box else None))
    return jobs


def _results(jobs: list[CropJob], settings: CropSettings, workers: int):
    """Crop results in manifest order, on ``workers`` processes."""
    work = partial(crop_file, settings=settings)
    if workers <= 1 or len(jobs) < 2 * workers:
        yield from map(work, jobs)
        return
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(work, jobs, chunksize=chunk)


def prepare(dataset: str, root: Path, out: Path, settings: CropSettings,
            workers: int) -> DropReport:
    manifest, report = get_adapter(dataset)(root)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / CROPS
    store = create_store(store_path, len(manifest), settings.size)
    jobs = _jobs(manifest, root)
    kept, filled, first_seen = [], [], {}
    paths = manifest["path"].tolist()
    progress = tqdm(_results(jobs, settings, workers), total=len(jobs), unit="img",
                    desc=f"prepare {dataset}", disable=None, mininterval=1.0)
    for index, result in enumerate(progress):
        rel = paths[index]
        if result.reason:
            report.drop(rel, result.reason, result.detail)
            continue
        for reason, detail in result.notes:
            report.warn(rel, reason, detail)
        if result.sha1 in first_seen:
            report.warn(rel, "duplicate_content", f"same bytes as {first_seen[result.sha1]}")
        first_seen.setdefault(result.sha1, rel)
        store[len(kept)] = result.crop
        kept.append(index)
        filled.append((*result.box, result.box_source, result.width, result.height, result.sha1))
    store.flush()
    del store
    if len(kept) < len(jobs):
        shrink_store(store_path, len(kept))

    final = manifest.loc[kept].reset_index(drop=True)
    columns = ["x0", "y0", "x1", "y1", "box_source", "width", "height", "sha1"]
    final[columns] = pd.DataFrame(filled, columns=columns).astype(final[columns].dtypes.to_dict())
    final.to_parquet(out / MANIFEST, index=False)
    report.kept = len(final)
    report.check_balance()
    report.crops = {"file": CROPS, "shape": [len(final), settings.size, settings.size, 3],
                    "dtype": "uint8", "margin": settings.margin, "box_policy": settings.box_policy,
                    "detectors": available_detectors(), "max_pixels": settings.max_pixels,
                    "box_sources": final["box_source"].value_counts().to_dict()}
    report.write(out / REPORT)
    (out / COUNTS).write_text(json.dumps(report.counts(), indent=2) + "\n")
    return report


def main(args: argparse.Namespace) -> int:
    settings = CropSettings(size=args.size, margin=args.margin, max_pixels=args.max_pixels,
                            box_policy=args.box)
    if args.size < 8 or not 0.0 <= args.margin <= 2.0 or args.workers < 1:
        raise ValueError("--size must be >= 8, --margin in [0, 2], --workers >= 1")
    start = time.perf_counter()
    report = prepare(args.dataset, args.root, args.out, settings, args.workers)
    seconds = time.perf_counter() - start
    print(report.summary())
    print(f"  {report.input_rows / max(seconds, 1e-9):.1f} input rows/s over {seconds:.1f} s "
          f"on {args.workers} worker(s); wrote {args.out}/{{{MANIFEST},{CROPS},{REPORT},{COUNTS}}}")
    if report.kept == 0:
        print(f"warning: no usable face in {args.root}; see {args.out / REPORT}", file=sys.stderr)
    return 0
