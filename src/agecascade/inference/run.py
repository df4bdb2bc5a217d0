"""`agecascade predict`: photos, folders and videos in; one row per face out.

Decoding, detection and cropping run in worker processes (one CPU thread each); the model runs
in this process on batches gathered across images. Rows come out in input order, as JSON lines
or CSV, and a summary counts files, faces, errors and speed. A file that cannot be read gets a
row with a named error and the run goes on.
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import numpy as np
from tqdm import tqdm

from agecascade.config import device_option, option
from agecascade.data.detect import DETECTORS, resolve_detector
from agecascade.errors import UserError
from agecascade.inference.faces import (NO_DETECTOR, FaceSettings, ImageFaces, cutting,
                                        detector_for, fallback_for, rows)
from agecascade.inference.predictor import Predictor
from agecascade.inference.sources import analyse_safely, expand, is_video, worker_init

IN_FLIGHT = 4           # tasks queued per worker: keeps workers busy, bounds memory
CSV_FIELDS = ("file", "time", "face", "box", "detector", "score", "age", "age_std", "age_low",
              "age_high", "p_under_18", "error", "detail")


@dataclass(frozen=True)
class PredictConfig:
    inputs: tuple[Path, ...] = option(help="image files, folders (walked recursively) and videos")
    model: str = option(help="model.pt, an exported .onnx file, or an MLflow model URI "
                             "(models:/age-estimator@champion, runs:/<id>/model)")
    out: Path | None = option(None, help="results.jsonl or results.csv (by suffix); JSON lines "
                                         "on stdout when not given")
    annotate: Path | None = option(None, help="folder for each image drawn with its faces' "
                                              "boxes and ages")
    detector: str = option("auto", choices=(*DETECTORS, NO_DETECTOR),
                           help="face detector; none: each image is one face crop")
    fallback: str = option("auto", choices=(*DETECTORS, NO_DETECTOR),
                           help="a second detector for the images where --detector finds no face; "
                                "auto: MTCNN when installed (it finds turned and blurred faces "
                                "dlib's HOG misses, docs/detectors.md); none: no second look")
    min_face: int = option(0, help="ignore faces whose box side is under this many pixels")
    batch: int = option(64, help="face crops per forward pass")
    flip: bool = option(True, help="average each face's prediction with its mirror image's")
    device: str = device_option()
    video_fps: float = option(1.0, help="frames sampled per second of video")
    probs: bool = option(False, help="add the whole age distribution to each JSON row")
    workers: int = option(0, help="processes that decode and detect; 0: one per CPU core")
    max_pixels: int = option(50_000_000, help="refuse larger images (decompression bombs)")
    max_file_mb: float = option(128.0, help="refuse larger files")

    def __post_init__(self) -> None:
        problems = {"batch": self.batch >= 1, "min_face": self.min_face >= 0,
                    "video_fps": self.video_fps > 0, "workers": self.workers >= 0,
                    "max_pixels": self.max_pixels > 0, "max_file_mb": self.max_file_mb > 0}
        bad = [name for name, ok in problems.items() if not ok]
        if bad:
            raise UserError(f"out of range: {', '.join('--' + b.replace('_', '-') for b in bad)}")
        if self.out is not None and self.out.suffix.lower() not in (".jsonl", ".json", ".csv"):
            raise UserError(f"--out {self.out}: use a .jsonl or .csv file name")
        if self.probs and self.out is not None and self.out.suffix.lower() == ".csv":
            raise UserError("--probs needs JSON output: a distribution does not fit a CSV cell")


@dataclass
class Summary:
    detector: str = ""       # the detector that ran ("auto" resolved)
    framing: str = ""        # how faces were cut: "landmarks", "box" or "whole image"
    files: int = 0
    images: int = 0          # photos plus sampled video frames
    faces: int = 0
    errors: Counter = field(default_factory=Counter)  # error name -> rows
    seconds: float = 0.0

    def line(self) -> str:
        errors = ", ".join(f"{name} {n}" for name, n in sorted(self.errors.items())) or "none"
        rate = self.images / self.seconds if self.seconds else 0.0
        return (f"{self.files} files, {self.images} images, {self.faces} faces, errors: {errors}; "
                f"{rate:.1f} images/s, {self.faces / self.seconds if self.seconds else 0:.1f} "
                f"faces/s over {self.seconds:.1f} s")


def analysed(files: list[Path], settings: FaceSettings, video_fps: float,
             workers: int) -> Iterator[tuple[Path, list[ImageFaces]]]:
    """Each file's faces, in input order. A worker that dies (out of memory, a crash in native
    code) marks the files it may have held as ``worker_died``; a fresh pool takes the rest."""
    if workers <= 1 or len(files) < 2:
        yield from ((f, analyse_safely(f, settings, video_fps)) for f in files)
        return
    todo = deque(files)
    while todo:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=worker_init)
        pending: deque[tuple[Path, Future]] = deque()
        try:
            while todo or pending:
                while todo and len(pending) < IN_FLIGHT * workers:
                    path = todo.popleft()
                    pending.append((path, pool.submit(analyse_safely, path, settings, video_fps)))
                path, future = pending[0]
                try:
                    result = future.result()
                except BrokenProcessPool:
                    for lost, _ in pending:
                        yield lost, [ImageFaces(error="worker_died", detail=(
                            "a worker process died while this file was in flight (out of "
                            "memory, or a crash in native code)"))]
                    pending.clear()
                    break
                pending.popleft()
                yield path, result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class Writer:
    """Rows to a JSON-lines or CSV stream."""

    def __init__(self, stream: TextIO, as_csv: bool):
        self.stream = stream
        self.csv = csv.DictWriter(stream, CSV_FIELDS, extrasaction="ignore") if as_csv else None
        if self.csv:
            self.csv.writeheader()

    def write(self, row: dict) -> None:
        if self.csv:
            self.csv.writerow({k: json.dumps(v) if isinstance(v, list) else v
                               for k, v in row.items()})
        else:
            self.stream.write(json.dumps(row) + "\n")


def run(config: PredictConfig, predictor: Predictor,
        on_image: Callable[[Path, ImageFaces, list[dict]], None] | None = None,
        stream: TextIO | None = None) -> Summary:
    """Predict every input; rows to ``config.out`` (or ``stream``, stdout by default).
    ``on_image`` sees each image with its rows (the annotator uses it)."""
    files = expand(config.inputs)
    detector = (NO_DETECTOR if config.detector == NO_DETECTOR  # fails here, not in each worker
                else resolve_detector(detector_for(config.detector, predictor.recipe)))
    recipe, framing = cutting(predictor.recipe, detector)
    fallback = fallback_for(config.fallback, detector)
    settings = FaceSettings(recipe, detector, config.min_face, config.max_pixels,
                            int(config.max_file_mb * 2**20), fallback)
    workers = config.workers or os.cpu_count() or 1
    summary = Summary(detector=detector + (f", else {fallback}" if fallback else ""),
                      files=len(files), framing=framing)
    started = time.perf_counter()
    out = stream or sys.stdout
    handle = None
    if config.out is not None:
        config.out.parent.mkdir(parents=True, exist_ok=True)
        handle = out = config.out.open("w", newline="")
    writer = Writer(out, config.out is not None and config.out.suffix.lower() == ".csv")
    pending: list[tuple[Path, ImageFaces]] = []
    progress = tqdm(total=len(files), unit="file", disable=not sys.stderr.isatty(),
                    file=sys.stderr)
    try:
        for path, entries in analysed(files, settings, config.video_fps, workers):
            pending += [(path, entry) for entry in entries]
            if sum(len(e.faces) for _, e in pending) >= config.batch:
                _flush(pending, predictor, config, writer, summary, on_image)
            progress.update()
        _flush(pending, predictor, config, writer, summary, on_image)
    finally:
        progress.close()
        if handle is not None:
            handle.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _flush(pending: list[tuple[Path, ImageFaces]], predictor: Predictor, config: PredictConfig,
           writer: Writer, summary: Summary,
           on_image: Callable[[Path, ImageFaces, list[dict]], None] | None) -> None:
    """Estimate the faces of every pending image in one go and write their rows, in order."""
    crops = [e.crops for _, e in pending if not e.error and e.faces]
    estimates, probs = (predictor.estimate(np.concatenate(crops)) if crops else ({}, None))
    offset = 0
    for path, entry in pending:
        n = 0 if entry.error else len(entry.faces)
        mine = {k: v[offset:offset + n] for k, v in estimates.items()}
        fields = {"file": str(path)}
        if entry.time is not None or is_video(path):
            fields["time"] = entry.time
        image_rows = rows(entry, mine, probs[offset:offset + n] if config.probs and n else None,
                          **fields)
        offset += n
        for row in image_rows:
            writer.write(row)
        summary.images += 1
        summary.faces += n
        summary.errors.update(r["error"] for r in image_rows if r["error"])
        if on_image is not None:
            on_image(path, entry, image_rows)
    pending.clear()

