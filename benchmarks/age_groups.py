"""Age-group accuracy of `agecascade predict` rows (and the peer's) on photos named by age.

The in-the-wild check groups true and predicted ages by decade: 0-9, 10-19, ..., 70-79, 80+
(9 groups). Per tool: exact accuracy (the predicted group is the true one), 1-off accuracy
(it is at most one group away) and the exact accuracy on the photos aged 0-9. A photo without
a face, or with an error, counts as wrong: a miss is never dropped. Beside them, the majority
class: every photo given the most common true group of the photos scored.

The true age comes from the file name: UTKFace's ``AGE_GENDER_RACE_DATE.jpg.chip.jpg`` or
FG-NET's ``NNNAxx.JPG``. UTKFace's held-out test split (the one `train` scores at the end) is a
fair in-the-wild set for a model trained on the rest; ``--link-split`` makes a folder of it:

  python benchmarks/age_groups.py --link-split prepared/utkface-dev test /tmp/utk-test
  agecascade predict /tmp/utk-test --model model.pt --out rows.jsonl
  python benchmarks/age_groups.py /tmp/utk-test --rows rows.jsonl [--peer-rows peer.jsonl]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from zero_shot import largest_face, read_rows

from agecascade.data.adapters.fgnet import NAME as FGNET_NAME
from agecascade.data.adapters.utkface import NAME as UTKFACE_NAME
from agecascade.errors import UserError

GROUPS = 9  # decades, the last one open: 80+


def group(age: float) -> int:
    return min(int(age // 10), GROUPS - 1)


def true_age(name: str) -> float | None:
    for pattern, field in ((UTKFACE_NAME, 1), (FGNET_NAME, 2)):
        match = pattern.match(name)
        if match:
            return float(match[field])
    return None


def read_ages(rows_file: Path) -> dict[str, float | None]:
    """File name -> the largest face's predicted age (None: no face, or an error)."""
    return {name: face["age"] if (face := largest_face(rows)) else None
            for name, rows in read_rows(rows_file).items()}


def score(truth: dict[str, float], predicted: dict[str, float | None]) -> dict:
    exact = one_off = young = young_right = found = 0
    for name, age in truth.items():
        guess = predicted.get(name)
        found += guess is not None
        hit = guess is not None and group(guess) == group(age)
        near = guess is not None and abs(group(guess) - group(age)) <= 1
        exact, one_off = exact + hit, one_off + near
        if group(age) == 0:
            young, young_right = young + 1, young_right + hit
    n = len(truth)
    return {"images": n, "faces_found": found, "exact": exact / n, "one_off": one_off / n,
            "exact_0_9": young_right / young if young else None, "n_0_9": young}


def majority(truth: dict[str, float]) -> dict:
    """Every photo given the most common true group: what accuracy means nothing below."""
    top, _ = Counter(group(a) for a in truth.values()).most_common(1)[0]
    return score(truth, {name: top * 10.0 + 5 for name in truth})


def link_split(prepared: Path, split: str, out: Path, seed: int, val: float, test: float) -> None:
    from agecascade.data.store import load_prepared
    from agecascade.train.data import assign_split

    manifest, _ = load_prepared(prepared)
    report = json.loads((prepared / "report.json").read_text())
    root = Path(report["root"]).resolve()
    chosen = manifest[assign_split(manifest, val, test, seed) == split]
    found = {path.name: path for path in root.rglob("*") if path.is_file()}  # one walk
    out.mkdir(parents=True, exist_ok=True)
    for name in chosen["path"]:
        source = found.get(Path(name).name)
        if source is None:
            raise SystemExit(f"{name}: not under {root}")
        (out / Path(name).name).unlink(missing_ok=True)
        (out / Path(name).name).symlink_to(source)
    print(f"{len(chosen)} {split} images of {prepared} linked into {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", help="the photos the rows are for")
    parser.add_argument("--rows", type=Path, help="agecascade predict's rows")
    parser.add_argument("--peer-rows", type=Path, help="the peer tool's rows, same format")
    parser.add_argument("--link-split", nargs=3, metavar=("PREPARED", "SPLIT", "OUT"),
                        help="link the images of a split of a prepared UTKFace store into OUT")
    parser.add_argument("--seed", type=int, default=0, help="--link-split: the split's seed")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    args = parser.parse_args()
    if args.link_split:
        prepared, split, out = args.link_split
        link_split(Path(prepared), split, Path(out), args.seed, args.val_fraction,
                   args.test_fraction)
        return
    if args.folder is None or args.rows is None:
        parser.error("give FOLDER and --rows (or --link-split)")
    truth = {p.name: age for p in sorted(args.folder.iterdir())
             if (age := true_age(p.name)) is not None}
    if not truth:
        raise SystemExit(f"{args.folder}: no file named by age (UTKFace or FG-NET names)")
    print(json.dumps({"majority_class": majority(truth)}))
    for name, rows in (("agecascade", args.rows), ("peer", args.peer_rows)):
        if rows is not None:
            print(json.dumps({name: score(truth, read_ages(rows))}))


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # a rows file zero_shot.read_rows cannot read
        raise SystemExit(f"error: {err}") from None
