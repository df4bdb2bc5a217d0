"""Zero-shot Adience group accuracy of `agecascade predict` rows (and the peer's) on Adience faces.

Adience's faces are Flickr photos (party, flash, phone shots): the nearest thing to an
in-the-wild set with ages that is here. Each face's true group comes from the fold files
(``read_adience``: the 8 canonical groups); a predicted age goes to the nearest group (ages
between two groups, 13 or 35 say, to the closer end). Per tool: exact and 1-off accuracy, and
the mean predicted age per true group; a face without a detection or with an error counts as
wrong, never dropped. Beside them, the majority class of the faces scored.

  agecascade predict ROOT/faces --model model.pt --out rows.jsonl
  python benchmarks/predict_throughput.py ROOT/faces --model model.pt --peer-rows peer.jsonl
  python benchmarks/adience_faces.py ROOT --rows rows.jsonl [--peer-rows peer.jsonl]

Rows name files as the tool saw them; they are matched to the fold files by file name.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from zero_shot import largest_face, read_rows

from agecascade.data.adapters.adience import GROUPS, read_adience
from agecascade.errors import UserError

BOUNDS = [tuple(int(v) for v in name.split("-")) for name in GROUPS]


def nearest_group(age: float) -> int:
    """The index of the Adience group whose range holds ``age``, else the closest one."""
    return min(range(len(BOUNDS)), key=lambda i: max(BOUNDS[i][0] - age, age - BOUNDS[i][1], 0))


def score(truth: dict[str, int], rows: dict[str, list[dict]]) -> dict:
    exact = one_off = found = 0
    ages: dict[int, list[float]] = {}
    for name, group in truth.items():
        face = largest_face(rows.get(name, []))
        if face is None:
            continue
        found += 1
        predicted = nearest_group(face["age"])
        exact += predicted == group
        one_off += abs(predicted - group) <= 1
        ages.setdefault(group, []).append(face["age"])
    n = len(truth)
    return {"faces": n, "found": found, "exact": exact / n, "one_off": one_off / n,
            "mean_age": {GROUPS[g]: round(sum(a) / len(a), 1) for g, a in sorted(ages.items())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the Adience folder (fold files and faces/)")
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--peer-rows", type=Path)
    args = parser.parse_args(argv)
    manifest, _ = read_adience(args.root)
    if manifest.empty:
        raise UserError(f"{args.root}: no Adience face with a canonical age group")
    truth = {Path(p).name: GROUPS.index(g) for p, g in zip(manifest["path"], manifest["age_group"])}
    common = Counter(truth.values()).most_common(1)[0][0]
    print(f"{len(truth)} Adience faces; majority class {GROUPS[common]}: exact "
          f"{sum(g == common for g in truth.values()) / len(truth):.1%}, 1-off "
          f"{sum(abs(g - common) <= 1 for g in truth.values()) / len(truth):.1%}")
    for label, path in (("agecascade", args.rows), ("peer", args.peer_rows)):
        if path is not None:
            s = score(truth, read_rows(path))
            print(f"{label}: {s['found']}/{s['faces']} faces found; exact {s['exact']:.1%}, "
                  f"1-off {s['one_off']:.1%}; mean predicted age by true group {s['mean_age']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
