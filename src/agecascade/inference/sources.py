"""What `predict` reads: the files its INPUT arguments name, and the frames of video files.

A folder is walked recursively and every regular file in it is an input: a file that is no image
gets a row with its error instead of vanishing from the count. Videos are recognised by their
suffix and sampled at a fixed rate, each sampled frame being one image.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from agecascade.errors import MissingInput, UserError
from agecascade.inference.faces import FaceSettings, ImageFaces, analyse_file, analyse_image

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg"})


def expand(inputs: tuple[Path, ...]) -> list[Path]:
    """Files named and files under folders named, in a stable order (folders sorted), without
    repeats. A path that does not exist is a usage error: nothing would tell the user otherwise."""
    if not inputs:
        raise UserError("no INPUT given: name image files, folders or videos")
    files: dict[Path, None] = {}
    for path in inputs:
        if path.is_dir():
            for folder, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    files.setdefault(Path(folder) / name)
        elif path.exists():
            files.setdefault(path)
        else:
            raise MissingInput(f"INPUT {path}: no such file or folder")
    return list(files)


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def worker_init() -> None:
    """One thread per worker process, the processes being the parallelism. Set before torch is
    imported (only MTCNN imports it), so this module never pays torch's import itself."""
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import cv2
    except ImportError:
        return
    cv2.setNumThreads(1)


def analyse_safely(path: Path, settings: FaceSettings, video_fps: float) -> list[ImageFaces]:
    """:func:`analyse`, with a failure of a detector or video library on one file as its row."""
    try:
        return analyse(path, settings, video_fps)
    except Exception as err:
        return [ImageFaces(error="processing_error", detail=f"{type(err).__name__}: {err}")]


def analyse(path: Path, settings: FaceSettings, video_fps: float) -> list[ImageFaces]:
    """The faces of one input: a photo gives one entry, a video one per sampled frame."""
    if is_video(path):
        return analyse_video(path, settings, video_fps)
    return [analyse_file(str(path), settings)]


def analyse_video(path: Path, settings: FaceSettings, video_fps: float) -> list[ImageFaces]:
    """One entry per frame sampled every 1 / ``video_fps`` seconds (by the frame's timestamp),
    or one entry with the error if the file cannot be decoded as video."""
    try:
        import cv2
    except ImportError:
        return [ImageFaces(error="no_video_support",
                           detail="install the 'faces' extra (opencv) to read videos")]
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return [ImageFaces(error="unsupported_video", detail="OpenCV cannot open it")]
        found, next_time, frame_index = [], 0.0, 0
        native_fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            time = (frame_index / native_fps if native_fps > 0
                    else capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
            frame_index += 1
            if time + 1e-6 < next_time:
                continue
            next_time = time + 1.0 / video_fps
            image = Image.fromarray(np.ascontiguousarray(frame[:, :, ::-1]))  # BGR -> RGB
            entry = analyse_image(image, settings)
            entry.time = round(time, 3)
            found.append(entry)
        if not found:
            return [ImageFaces(error="unsupported_video", detail="no frame could be decoded")]
        return found
    finally:
        capture.release()
