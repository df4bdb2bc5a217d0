"""The age-bias line of a model, fitted afresh, and what reading its ages through it does.

`train` fits ``predicted = slope * true + intercept`` on its validation split and `predict`
reads every age back through it (agecascade/train/calibration.py). This fits the same line on
the model's own validation split of ``--manifest`` (the store it was trained on: the split is
the checkpoint's seed and fractions), so it also measures a checkpoint trained before the line
was stored, and prints, per part, the MAE and mean signed error of the raw and the corrected
ages, and those of the children (0-12): the model's test split, and ``--photos``, any other
prepared store (for example `prepare fgnet --like MODEL`, the crops `predict` cuts). Rows of
``--photos`` whose face the model's detector did not find (`prepare --like` keeps them with
another box) are left out and counted. Ages go through `predict`'s ``Predictor`` (flip TTA);
the line is fitted without flip, as `train` fits it. Run:
  python benchmarks/bias_line.py --model models/utkface-dev-mobilenet_v2/model.pt \\
      --manifest prepared/utkface-dev --photos prepared/fgnet-dev [--json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from agecascade.data.store import load_prepared
from agecascade.inference.predictor import Predictor, TorchEngine
from agecascade.train.calibration import corrected_ages, fit_bias_line
from agecascade.train.data import assign_split

CHILD = 12  # the oldest age counted as a child


def errors(ages: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    error, child = ages - truth, truth <= CHILD
    return {"mae": float(np.abs(error).mean()), "signed": float(error.mean()),
            "children_signed": float(error[child].mean()) if child.any() else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True, help="the store it trained on")
    parser.add_argument("--photos", type=Path, help="another prepared store to score")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    engine = TorchEngine(args.model, "cpu")
    meta = engine.meta
    manifest, crops = load_prepared(args.manifest)
    split = assign_split(manifest, meta["val_fraction"], meta["test_fraction"], meta["seed"])
    truth = manifest["age"].to_numpy(dtype=float)
    val = np.flatnonzero(split == "val")
    unflipped = Predictor(engine, flip=False).probs(np.asarray(crops[val]))
    line = fit_bias_line(unflipped @ engine.ages.astype(np.float64), truth[val])
    read = corrected_ages(engine.ages, line)
    parts = {"test": (crops, truth, np.flatnonzero(split == "test"))}
    report = {"model": str(args.model), "line": list(line), "stored_line": list(engine.bias_line)}
    if args.photos:
        photos, photo_crops = load_prepared(args.photos)
        found = (photos["box_source"] == engine.recipe.box_source).to_numpy() \
            if engine.recipe.box_source else np.ones(len(photos), bool)
        report["photos_left_out"] = int((~found).sum())
        parts["photos"] = (photo_crops, photos["age"].to_numpy(dtype=float), np.flatnonzero(found))
    predictor = Predictor(engine, flip=True)
    for name, (store, ages, rows) in parts.items():
        probs = predictor.probs(np.asarray(store[rows])).astype(np.float64)
        probs /= probs.sum(axis=1, keepdims=True)
        report[name] = {"n": int(len(rows)),
                        "raw": errors(probs @ engine.ages.astype(np.float64), ages[rows]),
                        "corrected": errors(probs @ read, ages[rows])}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.model}: line fitted on the validation split: slope {line[0]:.3f}, intercept "
          f"{line[1]:.2f} (stored: {engine.bias_line[0]:.3f}, {engine.bias_line[1]:.2f})")
    for name in parts:
        part = report[name]
        print(f"{name} ({part['n']} crops): " + "; ".join(
            f"{kind} MAE {e['mae']:.2f} (signed {e['signed']:+.2f}, 0-{CHILD} "
            f"{e['children_signed']:+.2f})" for kind, e in (("raw", part["raw"]),
                                                         ("corrected", part["corrected"]))))
    if "photos_left_out" in report:
        print(f"photos left out (no face from the model's detector): {report['photos_left_out']}")


if __name__ == "__main__":
    main()
