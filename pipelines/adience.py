"""Stage `adience`: the Adience 5-fold protocol on top of a cascade checkpoint (thesis, section 5).

For each test fold k a network starts from ``--init`` (output layer re-initialised for the
groups), trains on the other folds (validation split taken from those, by subject) and predicts
fold k by argmax. Reported: exact and 1-off accuracy as mean ± std over folds (8 groups), the
3-group (0-12, 15-20, 25-100) confusion matrix with per-class precision and recall (table 6),
and ``minors_recall``, the recall of the child class that access control depends on.

``--groups 8 3`` (the default) trains a separate network per grouping, as the thesis did for
its 3-group experiment: a 3-class head sees the three classes' boundaries directly. With
``--groups 8`` alone, ``minors_recall`` comes from the 8-group predictions merged to 3 groups.

Writes OUT/metrics.json (flat keys; 3-group keys start with ``g3_``), OUT/folds.csv (one row
per fold), OUT/classes.csv (pooled per-class precision and recall) and OUT/confusion_g<G>.png
(pooled over the test folds). Each fold keeps its state in OUT/folds/g<G>/fold<k>/: result.json
(marks it finished; reused while its fingerprint of settings, init weights and data matches),
rows.csv (which face was train/val/test/left out, and each test face's prediction),
history.csv and confusion.png. fit's last.pt resumes inside a fold.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from agecascade.data.adapters.adience import GROUPS, GROUPS3, TO_GROUP3
from agecascade.data.store import load_prepared
from agecascade.evaluation.classification import (confusion_matrix, exact_accuracy,
                                                  fold_mean_std, one_off_accuracy,
                                                  precision_recall)
from agecascade.evaluation.plots import confusion_png
from agecascade.nets import freeze_features
from agecascade.nets.backbones import he_init
from agecascade.train.cascade import model_from_init, read_init
from agecascade.train.data import assign_split, make_loader
from agecascade.train.engine import TrainConfig, adam, fit, pick_device, predict

# groups -> (manifest column, class names in age order)
GROUPINGS: dict[int, tuple[str, list[str]]] = {8: ("age_group", GROUPS), 3: ("age_group3", GROUPS3)}
CHILD = GROUPS3.index("0-12")
MERGE_8_TO_3 = np.array([GROUPS3.index(TO_GROUP3[g]) for g in GROUPS])  # (8,) group -> 3-group
RESULT, ROWS, CONFUSION, RUN_ID = "result.json", "rows.csv", "confusion.png", "mlflow_run_id"
SETTINGS = ("mode", "epochs", "lr", "batch", "patience", "val_fraction", "input_size", "seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, required=True, help="prepared Adience folder")
    parser.add_argument("--init", type=Path, required=True, help="model.pt of the cascade stage")
    parser.add_argument("--mode", choices=["a", "b", "c"], default="c",
                        help="a: train the classifier layers only; b/c: full fine-tune "
                             "(b from an IMDB checkpoint, c from an IMDB -> AgeDB one)")
    parser.add_argument("--groups", type=int, nargs="+", choices=sorted(GROUPINGS), default=[8, 3],
                        help="groupings to run, one network per fold each")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of the training folds' subjects kept for validation")
    parser.add_argument("--input-size", type=int, help="default: the init checkpoint's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="data-loader processes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")


# --- data ---------------------------------------------------------------------------------

@dataclass
class Protocol:
    """Everything the folds share, loaded once."""
    manifest: pd.DataFrame
    crops: np.ndarray
    folds: np.ndarray          # (N,) int, -1 where the manifest has no fold
    init: dict                 # the cascade checkpoint, read once
    digest: str                # init weights + data: a fold result is reused only if it matches
    device: torch.device


def load_protocol(args: argparse.Namespace) -> Protocol:
    manifest, crops = load_prepared(args.manifest)
    missing = {"fold", "subject", "sha1", *(GROUPINGS[g][0] for g in args.groups)} - set(manifest)
    if missing:
        raise ValueError(f"{args.manifest}: manifest lacks column(s) {sorted(missing)}")
    init = read_init(args.init)
    if not isinstance(init, dict) or not {"model", "meta"} <= set(init) \
            or not {"arch", "ages", "input_spec", "input_size"} <= set(init["meta"]):
        raise ValueError(f"{args.init}: not a stage model.pt (needs 'model' and 'meta' with arch, "
                         "ages, input_spec, input_size)")
    folds = manifest["fold"].astype("Float64").fillna(-1).to_numpy(dtype=np.int64)
    digest = hashlib.sha1()
    for key in sorted(init["model"]):  # the weights themselves, not the file's name or date
        digest.update(key.encode())
        digest.update(init["model"][key].detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    columns = ["path", "subject", "sha1", "fold", "age_group", "age_group3"]
    digest.update(pd.util.hash_pandas_object(manifest[[c for c in columns if c in manifest]],
                                             index=False).to_numpy().tobytes())
    digest.update(np.ascontiguousarray(crops[:: max(1, len(crops) // 64)]).tobytes())  # a sample
    digest.update(str(crops.shape).encode())
    return Protocol(manifest, crops, folds, init, digest.hexdigest(), pick_device(args.device))


def group_labels(manifest: pd.DataFrame, groups: int, source: Path) -> np.ndarray:
    """(N,) class index in age order, -1 where the row has no group."""
    column, classes = GROUPINGS[groups]
    values = manifest[column].astype("string")
    unknown = sorted(set(values.dropna()) - set(classes))
    if unknown:
        where = manifest.loc[values == unknown[0], "path"].iloc[0]
        raise ValueError(f"{source}: {column} {unknown[0]!r} (e.g. {where}) is not one of {classes}")
    index = {name: i for i, name in enumerate(classes)}
    return values.map(index).astype("Float64").fillna(-1).to_numpy(dtype=np.int64)


def fold_rows(p: Protocol, labels: np.ndarray, k: int, val_fraction: float, seed: int
              ) -> dict[str, np.ndarray]:
    """Sorted manifest rows per part. Training-fold rows that share a subject or an image hash
    with fold k are 'excluded' (counted), so no test face is ever trained on."""
    usable = (labels >= 0) & (p.folds >= 0)
    test = usable & (p.folds == k)
    pool = usable & (p.folds != k)
    overlap = np.zeros(len(labels), dtype=bool)
    for column in ("subject", "sha1"):
        values = p.manifest[column].astype("string")
        seen = set(values[test].dropna())
        overlap |= values.isin(seen).fillna(False).to_numpy(dtype=bool)
    pool_rows = np.flatnonzero(pool & ~overlap)
    split = assign_split(p.manifest.iloc[pool_rows], val_fraction, 0.0, seed)
    return {"train": pool_rows[split == "train"], "val": pool_rows[split == "val"],
            "test": np.flatnonzero(test), "excluded": np.flatnonzero(pool & overlap)}


# --- one fold -----------------------------------------------------------------------------

def train_fold(args: argparse.Namespace, p: Protocol, labels: np.ndarray, groups: int,
               rows: dict[str, np.ndarray], folder: Path, fingerprint: str,
               on_epoch: Callable[[int, dict], None] | None) -> tuple[dict, np.ndarray]:
    """Fine-tune on the training folds; return (summary, predicted class per test row)."""
    start = time.perf_counter()
    torch.manual_seed(args.seed)  # the fresh output layer starts alike in every fold and rerun
    model, spec, _ = model_from_init(p.init, tuple(float(i) for i in range(groups)))
    # The classes are age *groups*; model_from_init matches output units by label value, and
    # group index 6 is not age 6: no unit of the previous stage stands for a group.
    he_init(model.output_layer)
    if args.mode == "a":
        freeze_features(model)
    cuda = p.device.type == "cuda"
    model = model.to(p.device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch,
                         patience=args.patience, input_size=args.input_size, seed=args.seed,
                         input_spec=spec)
    optimizer = adam([q for q in model.parameters() if q.requires_grad], args.lr)

    def loader(part: str, batch: int, shuffle: bool):
        return make_loader(p.crops, labels, rows[part], batch, shuffle, args.seed, args.workers, cuda)

    steps = torch.arange(groups, dtype=torch.float32, device=p.device)  # "ages" = group indices
    meta = {"arch": model.arch, "backbone": p.init["meta"].get("backbone", model.arch),
            "input_spec": asdict(spec), "mode": args.mode, "dataset": "adience",
            "ages": steps.tolist(), "groups": GROUPINGS[groups][1], "input_size": args.input_size,
            "init": str(args.init), "seed": args.seed, "fingerprint": fingerprint}
    history = fit(model, loader("train", args.batch, True), loader("val", max(args.batch, 64), False),
                  steps, optimizer, config, p.device, folder, meta, on_epoch)
    best = torch.load(folder / "model.pt", map_location=p.device, weights_only=True)
    model.load_state_dict(best["model"])
    logits, true, _ = predict(model, loader("test", max(args.batch, 64), False), p.device,
                              args.input_size, steps, spec)
    if not np.array_equal(true.numpy(), labels[rows["test"]]):
        raise RuntimeError("test predictions came back out of row order")
    pd.DataFrame(history).to_csv(folder / "history.csv", index=False)
    (folder / "model.pt").unlink()  # five networks per grouping: the scores are what is kept
    summary = {"best_epoch": best["epoch"] + 1, "epochs": len(history),
               "val_group_mae": best["metrics"]["val_mae"],
               "seconds": round(time.perf_counter() - start, 2)}
    return summary, logits.argmax(dim=1).numpy()


def score_fold(groups: int, true: np.ndarray, pred: np.ndarray) -> dict:
    confusion = confusion_matrix(true, pred, groups)
    minors = confusion if groups == 3 else merge_to_3(confusion)
    return {"exact_acc": exact_accuracy(true, pred), "one_off_acc": one_off_accuracy(true, pred),
            "minors_recall": float(precision_recall(minors)[1][CHILD]),
            "confusion": confusion.tolist()}


def merge_to_3(confusion8: np.ndarray) -> np.ndarray:
    """An 8-group confusion matrix read as the 3-group one (0-12, 15-20, 25-100)."""
    to3 = np.eye(3, dtype=np.int64)[MERGE_8_TO_3]  # (8,3) one-hot
    return to3.T @ np.asarray(confusion8) @ to3


def write_rows(folder: Path, p: Protocol, labels: np.ndarray, groups: int,
               rows: dict[str, np.ndarray], pred: np.ndarray) -> None:
    """Which face went where, and what fold k's faces were called: the audit trail of a fold."""
    classes = np.array(GROUPINGS[groups][1])
    parts = [pd.DataFrame({"row": r, "part": part}) for part, r in rows.items()]
    table = pd.concat(parts, ignore_index=True)
    table.insert(1, "path", p.manifest["path"].to_numpy()[table["row"]])
    table.insert(2, "subject", p.manifest["subject"].to_numpy()[table["row"]])
    table["true"] = classes[labels[table["row"]]]
    predicted = pd.Series(pd.NA, index=table.index, dtype="string")
    predicted[table["part"] == "test"] = classes[pred]
    table["pred"] = predicted
    table.to_csv(folder / ROWS, index=False)


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # a kill leaves the old file or the new one, so 'finished' is reliable


# --- MLflow (only through this class; the fold loop calls it when tracking) --------------------

class FoldRuns:
    """One nested MLflow run per fold under the active parent run."""

    def __init__(self) -> None:
        import mlflow

        self.mlflow = mlflow
        self.parent = mlflow.active_run().info

    @contextlib.contextmanager
    def run(self, folder: Path, name: str, resume: bool) -> Iterator[Callable[[int, dict], None]]:
        """A fold's run; ``resume`` continues the one an interrupted attempt left in ``folder``."""
        from agecascade import tracking

        id_file = folder / RUN_ID
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        with self.mlflow.start_run(run_id=run_id, run_name=None if run_id else name, nested=True,
                                   experiment_id=None if run_id else self.parent.experiment_id) as run:
            id_file.write_text(run.info.run_id)
            yield tracking.log_epoch

    def log_result(self, result: dict, folder: Path) -> None:
        self.mlflow.log_metrics({k: result[k] for k in ("exact_acc", "one_off_acc", "minors_recall",
                                                         "val_group_mae") if _finite(result[k])})
        for path in (folder / CONFUSION, folder / "history.csv", folder / ROWS):
            self.mlflow.log_artifact(str(path))
        result["mlflow_parent"] = self.parent.run_id

    def replay(self, result: dict, folder: Path, name: str) -> None:
        """A fold finished under another parent run (or untracked): log it under this one."""
        with self.run(folder, name, resume=False) as log_epoch:
            for epoch in pd.read_csv(folder / "history.csv").to_dict("records"):
                log_epoch(int(epoch.pop("epoch")), epoch)
            self.log_result(result, folder)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# --- the protocol -------------------------------------------------------------------------

def run_grouping(args: argparse.Namespace, p: Protocol, groups: int,
                 runs: FoldRuns | None) -> tuple[list[dict], dict]:
    """Every fold of one grouping, reusing finished ones; (per-fold results, label counts)."""
    labels = group_labels(p.manifest, groups, args.manifest)
    counts = {"n_no_group": int((labels < 0).sum()),
              "n_no_fold": int(((labels >= 0) & (p.folds < 0)).sum())}
    if counts["n_no_group"] or counts["n_no_fold"]:
        print(f"g{groups}: {counts['n_no_group']} rows without a {GROUPINGS[groups][0]} and "
              f"{counts['n_no_fold']} without a fold are left out (counted in metrics.json)")
    folds = sorted(set(p.folds[(labels >= 0) & (p.folds >= 0)].tolist()))
    if len(folds) < 2:
        raise ValueError(f"{args.manifest}: {len(folds)} fold(s) with {GROUPINGS[groups][0]} "
                         "labels; cross-validation needs at least 2")
    # what a finished fold's result depends on (paths, workers and device do not count)
    settings = {key: getattr(args, key) for key in SETTINGS} | {"digest": p.digest,
                                                                "groups": groups}
    return [run_fold(args, p, labels, groups, k, settings, runs) for k in folds], counts


def run_fold(args: argparse.Namespace, p: Protocol, labels: np.ndarray, groups: int, k: int,
             settings: dict, runs: FoldRuns | None) -> dict:
    """Test fold k's result: the finished one on disk when its fingerprint matches, else trained."""
    folder = args.out / "folds" / f"g{groups}" / f"fold{k}"
    folder.mkdir(parents=True, exist_ok=True)
    name, done = f"g{groups}-fold{k}", folder / RESULT
    fingerprint = hashlib.sha1(json.dumps({**settings, "fold": k}, sort_keys=True).encode()
                               ).hexdigest()
    result = json.loads(done.read_text()) if done.exists() else None
    if result is not None and result.get("fingerprint") == fingerprint:
        print(f"{name}: finished earlier, reusing {done}")
        if not (folder / CONFUSION).exists():
            plot_fold(result, groups, folder, k)
        if runs is not None and result.get("mlflow_parent") != runs.parent.run_id:
            runs.replay(result, folder, name)
            _write_json(result, done)
        return result
    rows = fold_rows(p, labels, k, args.val_fraction, args.seed)
    if len(rows["train"]) == 0 or len(rows["val"]) == 0:
        raise ValueError(f"{args.manifest}: fold {k} leaves {len(rows['train'])} training and "
                         f"{len(rows['val'])} validation images; use more data")
    sizes = {f"n_{part}": int(len(r)) for part, r in rows.items()}
    print(f"{name}: training on {sizes['n_train']}, validating on {sizes['n_val']}, testing "
          f"{sizes['n_test']} ({sizes['n_excluded']} training rows share a subject or image "
          "with the test fold and are left out)")
    with runs.run(folder, name, resume=True) if runs else contextlib.nullcontext() as on_epoch:
        summary, pred = train_fold(args, p, labels, groups, rows, folder, fingerprint, on_epoch)
        write_rows(folder, p, labels, groups, rows, pred)
        result = {"fingerprint": fingerprint, "fold": k, **sizes, **summary,
                  **score_fold(groups, labels[rows["test"]], pred)}
        plot_fold(result, groups, folder, k)
        if runs is not None:
            runs.log_result(result, folder)
    _write_json(result, done)
    print(f"{name}: exact {result['exact_acc']:.3f}  1-off {result['one_off_acc']:.3f}  "
          f"minors recall {result['minors_recall']:.3f}")
    return result


def plot_fold(result: dict, groups: int, folder: Path, k: int) -> None:
    confusion_png(np.array(result["confusion"]), GROUPINGS[groups][1], folder / CONFUSION,
                  f"Adience, {groups} groups, test fold {k}")


def summarise(groups: int, results: list[dict], counts: dict) -> tuple[dict, pd.DataFrame]:
    """Flat metrics of one grouping (keys of the 3-group run start with g3_) and its class table."""
    prefix = "" if groups == 8 else f"g{groups}_"
    pooled = np.sum([np.array(r["confusion"]) for r in results], axis=0)  # (G,G)
    metrics: dict[str, float | int] = {}
    for key in ("exact_acc", "one_off_acc"):
        mean, std, _ = fold_mean_std(np.array([r[key] for r in results]))
        metrics |= {f"{prefix}{key}": mean, f"{prefix}{key}_std": std}
    metrics |= {f"{prefix}n_test": int(pooled.sum()), f"{prefix}n_folds": len(results),
                f"{prefix}n_overlap_left_out": sum(r["n_excluded"] for r in results),
                **{f"{prefix}{k}": v for k, v in counts.items()}}
    tables = [class_table(str(groups), pooled, GROUPINGS[groups][1])]
    if groups == 8:
        tables.append(class_table("8as3", merge_to_3(pooled), GROUPS3))
    else:
        precision, recall = precision_recall(pooled)
        for i, name in enumerate(GROUPS3):
            metrics |= {f"g3_precision_{name}": float(precision[i]),
                        f"g3_recall_{name}": float(recall[i])}
    return metrics, pd.concat(tables, ignore_index=True)


def class_table(grouping: str, confusion: np.ndarray, classes: list[str]) -> pd.DataFrame:
    precision, recall = precision_recall(confusion)
    return pd.DataFrame({"grouping": grouping, "group": classes, "n_true": confusion.sum(axis=1),
                         "n_pred": confusion.sum(axis=0), "precision": precision, "recall": recall})


def minors(groups_run: dict[int, list[dict]]) -> dict[str, float]:
    """The headline: recall of 0-12 over all test folds pooled (every child counts once), from
    the 3-group network when it ran, else from the 8-group one merged; std over folds."""
    groups = 3 if 3 in groups_run else 8
    results = groups_run[groups]
    pooled = np.sum([np.array(r["confusion"]) for r in results], axis=0)
    confusion = pooled if groups == 3 else merge_to_3(pooled)
    precision, recall = precision_recall(confusion)
    _, std, _ = fold_mean_std(np.array([r["minors_recall"] for r in results]))
    return {"minors_recall": float(recall[CHILD]), "minors_recall_std": std,
            "minors_precision": float(precision[CHILD]), "minors_from_groups": groups}


def child_teen_adult(groups_run: dict[int, list[dict]]) -> pd.DataFrame:
    """The pooled 3-group confusion counts (rows true, columns predicted), as thesis table 6:
    from the 3-group networks when they ran, else the 8-group predictions merged."""
    groups = 3 if 3 in groups_run else 8
    pooled = np.sum([np.array(r["confusion"]) for r in groups_run[groups]], axis=0)
    confusion = pooled if groups == 3 else merge_to_3(pooled)
    return pd.DataFrame(confusion, index=pd.Index(GROUPS3, name="true"), columns=GROUPS3)


def run(args: argparse.Namespace, p: Protocol, runs: FoldRuns | None = None) -> dict:
    """The protocol as ``args`` says; writes OUT's files and returns the flat metrics."""
    done: dict[int, list[dict]] = {}
    metrics: dict = {"n_images": len(p.manifest)}
    tables, fold_table = [], []
    for groups in args.groups:
        done[groups], counts = run_grouping(args, p, groups, runs)
        part, table = summarise(groups, done[groups], counts)
        metrics |= part
        tables.append(table)
        pooled = np.sum([np.array(r["confusion"]) for r in done[groups]], axis=0)
        confusion_png(pooled, GROUPINGS[groups][1], args.out / f"confusion_g{groups}.png",
                      f"Adience, {groups} groups, {len(done[groups])} test folds pooled")
        fold_table += [{"groups": groups, **{k: v for k, v in r.items()
                                            if k not in ("confusion", "fingerprint", "mlflow_parent")}}
                       for r in done[groups]]
    metrics |= minors(done)
    child_teen_adult(done).to_csv(args.out / "confusion_g3.csv")
    metrics = {k: (v if _finite(v) else None) for k, v in metrics.items()}  # JSON has no NaN
    _write_json(metrics, args.out / "metrics.json")
    pd.DataFrame(fold_table).to_csv(args.out / "folds.csv", index=False)
    pd.concat(tables, ignore_index=True).to_csv(args.out / "classes.csv", index=False)
    return metrics


def main(args: argparse.Namespace) -> int:
    args.groups = sorted(set(args.groups), reverse=True)
    args.out.mkdir(parents=True, exist_ok=True)
    p = load_protocol(args)
    if args.input_size is None:
        args.input_size = int(p.init["meta"]["input_size"])
    if args.no_track:
        metrics = run(args, p)
    else:
        import mlflow

        from agecascade import tracking

        backbone = str(p.init["meta"].get("backbone", p.init["meta"]["arch"]))
        tags = {"backbone": backbone, "stage": "adience", "mode": args.mode, "dataset": "adience",
                "init": str(args.init)}
        params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if k not in ("run", "command", "no_track")}
        with tracking.tracked_run("adience", f"{backbone}-mode-{args.mode}", args.out, tags, params):
            metrics = run(args, p, FoldRuns())
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if _finite(v)})
            for path in sorted(args.out.glob("confusion_g?.png")) + [
                    args.out / "metrics.json", args.out / "folds.csv", args.out / "classes.csv"]:
                mlflow.log_artifact(str(path))
    print(json.dumps(metrics, indent=2))
    return 0
