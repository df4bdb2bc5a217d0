"""`prepare` in one call: a dataset root in its native layout -> manifest, crop store, drop report.

``run`` writes into ``config.out``:
  manifest.parquet  one row per kept face (see agecascade.data.manifest.COLUMNS)
  crops.npy         (N, size, size, 3) uint8, row i is manifest row i
  report.json       counts per drop reason and every dropped or flagged file with its reason
  counts.json       the flat counts alone, for `dvc metrics show`
Each is written under a temporary name and renamed once complete: a run that fails or is killed
while cropping leaves the previous run's files as they were, and no half-written file can pass
for a finished one. ``run`` logs nothing and prints only a progress bar: the stage module
decides what to show.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from agecascade.atomic import replacing, write_text_atomic
from agecascade.config import option
from agecascade.errors import MissingInput, UserError

from .adapters import ADAPTERS, get_adapter
from .cropper import CropJob, CropResult, CropSettings, Framing, Like, crop_file
from .recipe import BOX_POLICIES, CropRecipe
from .detect import available_detectors, resolve_detector
from .imaging import DEFAULT_MAX_PIXELS
from .landmarks import landmarks_available, realigned, zoomed
from .report import DropReport
from .store import COUNTS, CROPS, MANIFEST, REPORT, create_store, shrink_store

DATASETS = tuple(sorted(ADAPTERS))
IN_FLIGHT = 2  # chunks queued per worker: keeps workers busy, bounds pending results in memory

Crop = Callable[[CropJob, CropSettings], CropResult]


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """Every setting of the `prepare` stage and its default; the command line is built from
    it, so a default lives here only."""
    dataset: str = option(choices=DATASETS, help="the dataset whose native layout --root holds")
    root: Path = option(help="dataset root, native layout")
    out: Path = option(help="output folder")
    size: int = option(224, help="crop side in pixels")
    margin: float = option(0.4, help="margin per side, x box side")
    box: str = option("auto", choices=BOX_POLICIES,
                      help="auto: dataset box > detector > whole image; image: whole image "
                           "(for datasets that are already face crops); aligned: whole image, "
                           "warped so the landmarks sit where predict puts them")
    like: Path | None = option(None, help="a model.pt trained on whole chips: frame each face "
                                          "as its training crops framed theirs (its detector, "
                                          "window and offset), as `predict` does, so fine-tuning "
                                          "it here starts from the view it knows")
    workers: int = option(os.cpu_count() or 1, help="crop processes (default: one per core)")
    max_pixels: int = option(DEFAULT_MAX_PIXELS,
                             help="larger images are rejected as decompression bombs")
    # No face photo comes near 128 MB; a bigger file is a video, an archive or a raw scan, and
    # reading it whole into every worker could exhaust memory.
    max_file_mb: float = option(128.0, help="larger files are dropped as file_too_large, unread")

    def __post_init__(self) -> None:
        rules = {
            "dataset": (self.dataset in ADAPTERS, f"one of {', '.join(DATASETS)}"),
            "size": (self.size >= 8, ">= 8"),
            "margin": (0.0 <= self.margin <= 2.0, "in [0, 2]"),
            "box": (self.box in BOX_POLICIES, f"one of {', '.join(BOX_POLICIES)}"),
            "workers": (self.workers >= 1, ">= 1"),
            "max_pixels": (self.max_pixels >= 1, ">= 1"),
            "max_file_mb": (0.0 < self.max_file_mb < math.inf, "> 0 and finite"),
        }
        bad = [f"{name if name == 'dataset' else '--' + name.replace('_', '-')} "
               f"{getattr(self, name)!r} (must be {rule})"
               for name, (ok, rule) in rules.items() if not ok]
        if bad:  # every bad value at once, on one line: the user fixes them in one go
            raise UserError("; ".join(bad))

    @property
    def crop_settings(self) -> CropSettings:
        """The part each worker needs, in the units the cropper reads."""
        return CropSettings(size=self.size, margin=self.margin, max_pixels=self.max_pixels,
                            box_policy=self.box, max_file_bytes=int(self.max_file_mb * 2**20),
                            like=framing_of(self.like) if self.like else None)


def framing_of(checkpoint: Path) -> Like:
    """How ``checkpoint``'s training crops framed a face: its recipe's detector, window (the
    augmentation's mean zoom included) and offset."""
    import torch  # only --like reads a checkpoint

    if not checkpoint.is_file():
        raise MissingInput(f"--like {checkpoint}: no such file")
    crop = torch.load(checkpoint, map_location="cpu", weights_only=True).get("meta", {}).get("crop")
    if crop is None:
        raise UserError(f"--like {checkpoint}: records no crop recipe (a checkpoint of an older "
                        "version); prepare with --margin instead")
    recipe = CropRecipe(**crop)
    if recipe.window <= 0:
        raise UserError(f"--like {checkpoint}: its crops were cut around face boxes with a margin "
                        f"of {recipe.margin:g}; prepare with --margin {recipe.margin:g} instead")
    if recipe.template and not landmarks_available():
        raise UserError(f"--like {checkpoint}: the model aligns faces by their landmarks, and "
                        "dlib's 5-point shape predictor is not installed (pip install "
                        "'agecascade[faces]')")
    return Like(resolve_detector(recipe.box_source), recipe)


class WorkerDied(UserError):
    """A worker process ended without a result: killed (the kernel's out-of-memory killer sends
    SIGKILL) or crashed in native code. The run cannot tell which file did it, only which were
    in flight."""


def _jobs(manifest: pd.DataFrame, root: Path) -> list[CropJob]:
    jobs = []
    for row in manifest.itertuples(index=False):
        box = (row.x0, row.y0, row.x1, row.y1)
        has_box = not any(pd.isna(v) for v in box)
        jobs.append(CropJob(str(root / row.path), tuple(map(float, box)) if has_box else None,
                            row.box_source if has_box else None))
    return jobs


def _crop_chunk(crop: Crop, settings: CropSettings, jobs: list[CropJob]) -> list[CropResult]:
    """One worker task. ``crop`` travels by reference, so the worker runs the function the
    parent named, not whatever its own import of this module holds."""
    return [crop(job, settings) for job in jobs]


def _results(jobs: list[CropJob], settings: CropSettings, workers: int) -> Iterator[CropResult]:
    """Crop results in manifest order, on ``workers`` processes.

    ``crop_file`` never raises, so the only failure left is a worker that dies. The pool then
    breaks (``BrokenProcessPool``) instead of waiting forever, and the run stops with
    ``WorkerDied`` naming the files that were in flight. ``crop_file`` is read from this
    module's namespace at call time, so a test can swap it for one that kills its worker.
    """
    if workers <= 1 or len(jobs) < 2 * workers:
        yield from (crop_file(job, settings) for job in jobs)
        return
    size = max(1, min(64, len(jobs) // (workers * 8)))
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    pending: deque[tuple[list[CropJob], Future]] = deque()
    try:
        for chunk in chunks:
            pending.append((chunk, pool.submit(_crop_chunk, crop_file, settings, chunk)))
            if len(pending) >= IN_FLIGHT * workers:
                yield from _next(pending)
        while pending:
            yield from _next(pending)
    finally:  # also on an error or Ctrl-C in the consumer: do not wait for queued chunks
        pool.shutdown(wait=True, cancel_futures=True)


def _next(pending: deque[tuple[list[CropJob], Future]]) -> list[CropResult]:
    """The oldest chunk's results, once done; WorkerDied if the pool broke meanwhile."""
    try:
        results = pending[0][1].result()
    except BrokenProcessPool:
        files = [job.file for chunk, _ in pending for job in chunk]
        raise WorkerDied(
            f"a worker process died (killed by a signal, such as SIGKILL from the out-of-memory "
            f"killer, or crashed) while cropping one of {len(files)} files in flight, from "
            f"{files[0]} to {files[-1]}; the run stopped before writing its manifest. Use fewer "
            f"--workers or a lower --max-pixels if memory ran out") from None
    pending.popleft()
    return results


def _crop_into(path: Path, manifest: pd.DataFrame, report: DropReport, config: PrepareConfig,
               settings: CropSettings) -> tuple[pd.DataFrame, dict | None]:
    """Fill the crop store at ``path`` with the kept faces, in manifest order; the manifest of
    the kept rows, with the box each crop used, and the framing of whole-image crops
    (:func:`framing_summary`). Drops and warnings go into ``report``."""
    jobs = _jobs(manifest, config.root)
    store = create_store(path, len(jobs), settings.size)
    kept, filled, first_seen, framings = [], [], {}, []
    paths = manifest["path"].tolist()
    progress = tqdm(_results(jobs, settings, config.workers), total=len(jobs), unit="img",
                    desc=f"prepare {config.dataset}", disable=None, mininterval=1.0)
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
        framings.append(result.framing)
        kept.append(index)
        filled.append((*result.box, result.box_source, result.width, result.height, result.sha1))
    framing = framing_summary([f for f in framings if f is not None])
    if config.box == "aligned":
        _align_chips(store, framings, framing, [paths[i] for i in kept], report)
    store.flush()
    del store  # unmapped before the file is cut short
    if len(kept) < len(jobs):
        shrink_store(path, len(kept))

    final = manifest.loc[kept].reset_index(drop=True)
    columns = ["x0", "y0", "x1", "y1", "box_source", "width", "height", "sha1"]
    final[columns] = pd.DataFrame(filled, columns=columns).astype(final[columns].dtypes.to_dict())
    report.kept = len(final)
    report.check_balance()
    return final, framing


def _align_chips(store: np.ndarray, framings: list[Framing | None], summary: dict | None,
                 paths: list[str], report: DropReport) -> None:
    """Warp every stored chip so that its landmarks sit on the chips' median place (the
    template), as ``predict`` warps a real face (``landmarks.realigned``). A chip whose face the
    template's detector missed stays as it was, counted as ``not_aligned``."""
    if summary is None or not summary["template"]:
        raise UserError("--box aligned: the detector found no face in any chip, so there is no "
                        "landmark template to align them on")
    template = np.array(summary["template"])
    for row, (framing, rel) in enumerate(zip(framings, paths)):
        if framing is None or framing.landmarks is None or framing.detector != summary["detector"]:
            found = "no face" if framing is None else f"the face by {framing.detector} only"
            report.warn(rel, "not_aligned",
                        f"{summary['detector']} found {found}: chip kept as it is")
            continue
        store[row] = realigned(store[row], np.array(framing.landmarks), template)


def framing_summary(framings: list[Framing]) -> dict | None:
    """The median framing of whole-image crops (see ``cropper.face_framing``), measured with
    the commonest detector only: detectors differ in how much of a face their box takes. The
    landmark template is the median over the crops where the shape predictor ran."""
    if not framings:
        return None
    detector = pd.Series([f.detector for f in framings]).mode().iloc[0]
    chosen = [f for f in framings if f.detector == detector]
    window, offset_x, offset_y = np.median([(f.window, *f.offset) for f in chosen], axis=0)
    landmarks = np.array([f.landmarks for f in chosen if f.landmarks is not None])
    template = np.median(landmarks, axis=0).round(5).tolist() if len(landmarks) else []
    return {"window": float(window), "offset": [float(offset_x), float(offset_y)],
            "detector": str(detector), "measured": len(chosen), "template": template,
            "template_measured": len(landmarks)}


def run(config: PrepareConfig) -> DropReport:
    """Prepare one dataset into ``config.out``; the drop report it wrote."""
    settings = config.crop_settings  # first: a bad --like fails before any reading
    if config.box == "aligned" and not landmarks_available():
        raise UserError("--box aligned needs dlib's 5-point shape predictor "
                        "(pip install 'agecascade[faces]')")
    manifest, report = get_adapter(config.dataset)(config.root)
    try:
        config.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, no permission: the user's to fix
        raise UserError(f"--out {config.out}: cannot create it ({err.strerror})") from err
    with replacing(config.out / CROPS) as crops:
        final, framing = _crop_into(crops, manifest, report, config, settings)
    with replacing(config.out / MANIFEST) as tmp:
        final.to_parquet(tmp, index=False)
    if settings.like is not None:
        like, recipe = settings.like, settings.like.recipe
        window, offset_x, offset_y = recipe.framing()
        framing = {"window": window, "offset": [offset_x, offset_y], "detector": like.detector,
                   "measured": int((final["box_source"] == like.detector).sum()),
                   # the landmarks' place in these crops, which show the model's zoom
                   "template": zoomed(recipe.template, recipe.zoom).tolist() if recipe.template
                   else [], "like": str(config.like)}
    report.crops = {"file": CROPS, "shape": [len(final), settings.size, settings.size, 3],
                    "dtype": "uint8", "margin": settings.margin, "box_policy": settings.box_policy,
                    "detectors": available_detectors(), "max_pixels": settings.max_pixels,
                    "max_file_bytes": settings.max_file_bytes,
                    "box_sources": final["box_source"].value_counts().to_dict(),
                    "framing": framing}
    report.write(config.out / REPORT)
    write_text_atomic(config.out / COUNTS, json.dumps(report.counts(), indent=2) + "\n")
    return report
