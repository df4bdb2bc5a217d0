"""Zero-shot age accuracy on FG-NET full-size photos: `agecascade predict` rows, and the peer's.
(UTKFace chips are scored alike, each chip its own subject.)

FG-NET is never seen in training here, so this is the number a user gets on new photos: the
detector has to find the face, and a photo where it does not is a miss, reported and scored,
never dropped. Per image the face used is the largest box (FG-NET photos show one person; a
second box is a false detection or a face in the background). The baseline is the median
predictor, leave-one-subject-out: each image gets the median age of the other subjects' images,
so a model has to beat "guess the typical age" on the same images to carry any information.
Another set of subjects would score otherwise (FG-NET's held-out half is not here), so the MAE and
the children's signed error also come with the range they span over subjects drawn again: a
bootstrap over subjects, each subject's photos drawn together. A tool that saw these photos in
training gets many of them exactly right: the share of ages within half a year of the truth,
and the MAE on the rest, show it (the peer is within half a year on 42 % of fgnet-dev's photos
and on 10 % of UTKFace's test chips; see the README).

Run:
  agecascade predict FOLDER --model model.pt --out rows.jsonl
  python benchmarks/predict_throughput.py FOLDER --model model.pt --peer-rows peer.jsonl
  python benchmarks/zero_shot.py FOLDER --rows rows.jsonl [--peer-rows peer.jsonl] [--json]
                                   [--bootstrap DRAWS]
Rows are JSON lines with at least ``file``, ``face``, ``box`` and ``age`` (``age_low`` /
``age_high`` where the tool gives an interval); a row with ``face: null`` is an image without a
face and its ``error`` says why.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from agecascade.data.adapters.fgnet import NAME as FGNET_NAME
from agecascade.data.adapters.utkface import NAME as UTKFACE_NAME
from agecascade.errors import MissingInput, UserError

BANDS = ((0, 12), (13, 19), (20, 39), (40, None))   # true age, inclusive; None: no upper end
CHILDREN = BANDS[0]
EXACT = 0.5  # years: an age this close to the truth is the right one, rounded


@dataclass(frozen=True)
class Truth:
    subject: str
    age: float


def band_name(band: tuple[int, int | None]) -> str:
    low, high = band
    return f"{low}+" if high is None else f"{low}-{high}"


def in_band(age: float, band: tuple[int, int | None]) -> bool:
    low, high = band
    return age >= low and (high is None or age <= high)


def read_truth(folder: Path) -> dict[str, Truth]:
    """File name -> subject and age, from the FG-NET names (NNNAxx[a|b].JPG) in ``folder``, or
    UTKFace's (AGE_GENDER_RACE_DATE.jpg.chip.jpg: no person is named, so each chip is its own
    subject; `age_groups.py --link-split` makes a folder of a held-out split)."""
    if not folder.is_dir():
        raise MissingInput(f"{folder}: no such folder")
    truth = {}
    for path in sorted(folder.iterdir()):
        fgnet, utkface = FGNET_NAME.match(path.name), UTKFACE_NAME.match(path.name)
        if fgnet:
            truth[path.name] = Truth(fgnet[1], float(fgnet[2]))
        elif utkface:
            truth[path.name] = Truth(path.name, float(utkface[1]))
    if not truth:
        raise UserError(f"{folder}: no FG-NET (NNNAxx[a|b].JPG) or UTKFace "
                        "(AGE_GENDER_RACE_DATE.jpg.chip.jpg) file names")
    return truth


def read_rows(path: Path) -> dict[str, list[dict]]:
    """File name -> its rows, from a JSON-lines file."""
    if not path.is_file():
        raise MissingInput(f"{path}: no such rows file")
    by_image: dict[str, list[dict]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or "file" not in row:
            raise UserError(f"{path}:{number}: a row needs a 'file' field")
        by_image.setdefault(Path(row["file"]).name, []).append(row)
    return by_image


def box_area(box: list[float]) -> float:
    left, top, right, bottom = box
    return max(0.0, right - left) * max(0.0, bottom - top)


def largest_face(rows: list[dict]) -> dict | None:
    """The row of the image's largest box with an age, or None when the image has no face."""
    faces = [r for r in rows if r.get("face") is not None and r.get("age") is not None]
    return max(faces, key=lambda r: box_area(r["box"]), default=None)


def loso_median(truth: dict[str, Truth]) -> dict[str, float]:
    """Each image's baseline guess: the median age of every image of the other subjects."""
    by_subject: dict[str, list[float]] = {}
    for t in truth.values():
        by_subject.setdefault(t.subject, []).append(t.age)
    guess = {s: statistics.median(a for other, ages in by_subject.items() if other != s
                                  for a in ages) for s in by_subject}
    return {name: guess[t.subject] for name, t in truth.items()}


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 3) if values else None


def subjects_resampled(truth: dict[str, Truth], errors: dict[str, float], draws: int,
                       seed: int = 0) -> dict:
    """The 5th and 95th percentiles of the MAE and of the children's signed error over
    ``draws`` sets of as many subjects, drawn with replacement from those with a detected
    image. A subject's photos go together: they share one face, and often one scanner."""
    by_subject: dict[str, list[tuple[float, float]]] = {}
    for name, error in errors.items():
        by_subject.setdefault(truth[name].subject, []).append((truth[name].age, error))
    subjects = sorted(by_subject)
    rng = random.Random(seed)
    maes, children = [], []
    for _ in range(draws):
        drawn = [pair for s in rng.choices(subjects, k=len(subjects)) for pair in by_subject[s]]
        maes.append(statistics.fmean(abs(e) for _, e in drawn))
        young = [e for age, e in drawn if in_band(age, CHILDREN)]
        if young:
            children.append(statistics.fmean(young))

    def central_90(values: list[float]) -> list[float] | None:
        if len(values) < 2:
            return None
        cuts = statistics.quantiles(values, n=20, method="inclusive")
        return [round(cuts[0], 3), round(cuts[-1], 3)]

    return {"draws": draws, "subjects": len(subjects), "mae_90": central_90(maes),
            "signed_children_90": central_90(children)}


def score(truth: dict[str, Truth], rows: dict[str, list[dict]],
          baseline: dict[str, float], draws: int = 0) -> dict:
    """Detection, MAE, signed error, per-band figures and interval coverage of one tool's rows.
    MAE and signed error are over detected images; ``mae_misses_as_median`` scores every image,
    a miss getting the baseline's guess, as a user falling back to the typical age would.
    ``draws`` > 0 adds their range over subjects drawn again (:func:`subjects_resampled`)."""
    misses: Counter = Counter()
    errors, base_errors, scored_all = {}, {}, {}
    covered, widths, multi = [], [], 0
    for name, t in truth.items():
        image_rows = rows.get(name, [])
        multi += sum(r.get("face") is not None for r in image_rows) > 1
        face = largest_face(image_rows)
        base_errors[name] = baseline[name] - t.age
        if face is None:
            misses[next((r["error"] for r in image_rows if r.get("error")),
                        "no_face_found" if image_rows else "no_row")] += 1
            scored_all[name] = abs(base_errors[name])
            continue
        errors[name] = float(face["age"]) - t.age
        scored_all[name] = abs(errors[name])
        if face.get("age_low") is not None and face.get("age_high") is not None:
            covered.append(face["age_low"] <= t.age <= face["age_high"])
            widths.append(face["age_high"] - face["age_low"])
    bands = {}
    for band in BANDS:
        names = [n for n, t in truth.items() if in_band(t.age, band)]
        hit = [n for n in names if n in errors]
        bands[band_name(band)] = {
            "images": len(names), "detected": len(hit),
            "mae": _mean([abs(errors[n]) for n in hit]),
            "signed": _mean([errors[n] for n in hit]),
            "exact_share": _share([abs(errors[n]) < EXACT for n in hit]),
            "baseline_mae": _mean([abs(base_errors[n]) for n in hit]),
        }
    scored = {
        "images": len(truth),
        "detected": len(errors),
        "missed": sum(misses.values()),
        "miss_reasons": dict(misses),
        "detection_rate": round(len(errors) / len(truth), 4),
        "multi_face_images": multi,
        "mae": _mean([abs(e) for e in errors.values()]),
        "signed": _mean(list(errors.values())),
        "exact_share": _share([abs(e) < EXACT for e in errors.values()]),
        "mae_not_exact": _mean([abs(e) for e in errors.values() if abs(e) >= EXACT]),
        "baseline_mae": _mean([abs(base_errors[n]) for n in errors]),
        "mae_misses_as_median": _mean(list(scored_all.values())),
        "baseline_mae_all": _mean([abs(e) for e in base_errors.values()]),
        "coverage": _mean([float(c) for c in covered]),
        "coverage_images": len(covered),
        "interval_width": _mean(widths),
        "bands": bands,
    }
    if draws and errors:
        scored["subjects_resampled"] = subjects_resampled(truth, errors, draws)
    return scored


def _share(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def _shown(value: float | None, sign: bool = False) -> str:
    return "n/a" if value is None else f"{value:+.2f}" if sign else f"{value:.2f}"


def describe(label: str, s: dict) -> list[str]:
    """One tool's figures as printed lines."""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["miss_reasons"].items())) or "none"
    lines = [
        f"{label}: {s['images']} images, {s['detected']} with a face "
        f"(detection rate {100 * s['detection_rate']:.1f} %), {s['missed']} missed ({reasons}); "
        f"{s['multi_face_images']} images with more than one face (the largest box is used)",
        f"  MAE {_shown(s['mae'])} on detected images (signed error {_shown(s['signed'], True)});"
        f" median predictor on the same images {_shown(s['baseline_mae'])}",
        f"  MAE over all {s['images']} images, a miss scored as the median predictor: "
        f"{_shown(s['mae_misses_as_median'])} (median predictor alone: "
        f"{_shown(s['baseline_mae_all'])})",
    ]
    if s["exact_share"] is not None:
        lines.append(f"  within {EXACT:g} years of the true age on {100 * s['exact_share']:.1f} % "
                     f"of detected images; MAE on the others {_shown(s['mae_not_exact'])}")
    if s["coverage"] is not None:
        lines.append(f"  interval coverage {100 * s['coverage']:.1f} % of {s['coverage_images']} "
                     f"detected images (true age in [age_low, age_high]; mean width "
                     f"{_shown(s['interval_width'])} years)")
    else:
        lines.append("  interval coverage: no age_low / age_high in these rows")
    lines.append(f"  {'band':<6} {'images':>6} {'detected':>8} {'MAE':>7} {'signed':>7} "
                 f"{'exact %':>7} {'median':>7}")
    for name, b in s["bands"].items():
        exact = "n/a" if b["exact_share"] is None else f"{100 * b['exact_share']:.1f}"
        lines.append(f"  {name:<6} {b['images']:>6} {b['detected']:>8} {_shown(b['mae']):>7} "
                     f"{_shown(b['signed'], True):>7} {exact:>7} {_shown(b['baseline_mae']):>7}")
    if "subjects_resampled" in s:
        r = s["subjects_resampled"]
        mae, young = r["mae_90"], r["signed_children_90"]
        lines.append(
            f"  on {r['subjects']} subjects drawn again ({r['draws']} draws, 90 % of them): MAE "
            + (f"{_shown(mae[0])} to {_shown(mae[1])}" if mae else "n/a")
            + f", {band_name(CHILDREN)} signed "
            + (f"{_shown(young[0], True)} to {_shown(young[1], True)}" if young else "n/a"))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the FG-NET images folder the rows are for")
    parser.add_argument("--rows", type=Path, required=True, help="agecascade predict's rows")
    parser.add_argument("--peer-rows", type=Path, help="the peer tool's rows, same format")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--bootstrap", type=int, default=2000, metavar="DRAWS",
                        help="sets of subjects drawn again for the MAE's and the children's "
                             "range (0 = none)")
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error(f"--bootstrap {args.bootstrap}: a count of draws, >= 0")
    truth = read_truth(args.folder)
    baseline = loso_median(truth)
    results = {"ours": score(truth, read_rows(args.rows), baseline, args.bootstrap)}
    if args.peer_rows:
        results["peer"] = score(truth, read_rows(args.peer_rows), baseline, args.bootstrap)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{args.folder}: {len(truth)} images of {len({t.subject for t in truth.values()})} "
          f"subjects; baseline: median age of the other subjects' images (leave-one-subject-out)")
    for label, s in results.items():
        print("\n".join(describe(label, s)))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
