"""The Adience 5-fold protocol on top of a cascade checkpoint (thesis, section 5).

For each test fold k a network starts from ``init`` (output layer re-initialised for the
groups), trains on the other folds (validation split taken from those, by subject) and predicts
fold k by argmax. Reported: exact and 1-off accuracy as mean ± std over folds (8 groups), the
3-group (0-12, 15-20, 25-100) confusion matrix with per-class precision and recall (table 6),
``minors_recall`` (the recall of the child class that access control depends on), and beside
each accuracy the majority-class baseline: the commonest group of fold k's training rows,
predicted for every face of fold k. It is the score of a network that learnt the class prior
and nothing of the faces.

``groups=(8, 3)`` trains a separate network per grouping, as the thesis did for its 3-group
experiment. An 8-group run is also scored merged to 3 groups (keys ``g8as3_``); with 8 groups
alone, ``minors_recall`` comes from those merged predictions.

Mode a trains the head on the frozen trunk, and ``train_blocks`` > 0 fine-tunes only the trunk's
last blocks and the head: either way the frozen part runs once per image (plain and mirrored)
for all folds and epochs, so many epochs cost little. That is what lets the demo's small
networks learn from ~110 faces per fold within its time budget; mode b or c with
``train_blocks`` 0 is the thesis's full fine-tune (``engine.fit``).

Writes into ``out``: metrics.json (flat keys; 3-group keys start with ``g3_``), folds.csv (one
row per fold), classes.csv (pooled per-class precision and recall), confusion_g3.csv and
confusion_g<G>.png (pooled over the test folds). Each fold keeps its state in
``out/folds/g<G>/fold<k>/``: result.json (marks it finished; reused while its fingerprint of
settings, init weights, crops and code matches), rows.csv (which face was train/val/test/left
out, and each test face's prediction), history.csv and confusion.png. ``fit``'s last.pt resumes
a full fine-tune inside a fold. This module logs nothing: the stage passes a
:class:`FoldTracker` to do that. Under torchrun the processes share the folds
(:func:`share_folds`) and rank 0 writes the rest.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ContextManager, Protocol as Interface

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from agecascade.atomic import to_csv_atomic, write_text_atomic
from agecascade.cache import fingerprint, run_key
from agecascade.config import device_option, option
from agecascade.data.adapters.adience import GROUPS, GROUPS3, TO_GROUP3
from agecascade.data.store import load_prepared
from agecascade.errors import UserError
from agecascade.evaluation.classification import (confusion_matrix, exact_accuracy,
                                                  fold_mean_std, one_off_accuracy,
                                                  precision_recall)
from agecascade.evaluation.plots import confusion_png
from agecascade.nets import AgeNet, freeze_features
from agecascade.nets.backbones import he_init
from agecascade.nets.split import split_trunk
from agecascade.nets.weights import InputSpec
from agecascade.train import distributed
from agecascade.train.cascade import model_from_init, read_init
from agecascade.train.data import assign_split, make_loader, to_input
from agecascade.train.compute import Compute, choose_compute, precision_option
from agecascade.train.engine import (TrainConfig, adam, clear_resume_point, fit, pick_device,
                                     predict)

# groups -> (manifest column, class names in age order)
GROUPINGS: dict[int, tuple[str, list[str]]] = {8: ("age_group", GROUPS), 3: ("age_group3", GROUPS3)}
CHILD = GROUPS3.index("0-12")
MERGE_8_TO_3 = np.array([GROUPS3.index(TO_GROUP3[g]) for g in GROUPS])  # (8,) group -> 3-group
RESULT, ROWS, CONFUSION = "result.json", "rows.csv", "confusion.png"
POLL_S = 5.0  # under torchrun: how often a process that finished its folds looks for the others'
OnEpoch = Callable[[int, dict], None]


@dataclass(frozen=True, kw_only=True)
class AdienceConfig:
    """Every setting of the `adience` stage and its default (the thesis's); the command line is
    built from it, so a default lives here only."""
    manifest: Path = option(help="prepared Adience folder")
    init: Path = option(help="model.pt of the cascade stage")
    mode: str = option("c", choices=("a", "b", "c"),
                       help="a: train the classifier layers only, on the frozen trunk's "
                            "features computed once; b/c: fine-tune (b from an IMDB "
                            "checkpoint, c from an IMDB -> AgeDB one)")
    groups: tuple[int, ...] = option((8, 3), choices=tuple(sorted(GROUPINGS)),
                                     help="groupings to run, one network per fold each")
    train_blocks: int = option(0, help="modes b, c: fine-tune only the trunk's last N blocks with "
                                       "weights, and the head; the frozen rest runs once per "
                                       "image (0 = everything)")
    epochs: int = option(20)
    lr: float = option(1e-4)
    batch: int = option(32)
    patience: int = option(3, help="halve the LR after this many epochs without a lower "
                                   "validation loss")
    val_fraction: float = option(0.2, help="share of the training folds' subjects kept for "
                                           "validation")
    input_size: int = option(0, help="0 = the init checkpoint's")
    seed: int = option(0)
    workers: int = option(0, help="data-loader processes (full fine-tune)")
    device: str = device_option()
    precision: str = precision_option()
    out: Path = option(help="folder of metrics.json, folds.csv, classes.csv and folds/")

    def __post_init__(self) -> None:
        # one network per grouping, 8 first (its merged 3-group scores come first in the table)
        object.__setattr__(self, "groups", tuple(sorted(set(self.groups), reverse=True)))
        if not self.groups or not set(self.groups) <= set(GROUPINGS):
            raise UserError(f"--groups {self.groups}: choose from {sorted(GROUPINGS)}")
        if self.mode == "a" and self.train_blocks:
            raise UserError("--train-blocks is for modes b and c; mode a trains the head only")
        if self.epochs < 1 or self.batch < 1 or self.train_blocks < 0 or self.input_size < 0:
            raise UserError(f"--epochs and --batch must be >= 1, --train-blocks and --input-size "
                            f">= 0 (got {self.epochs}, {self.batch}, {self.train_blocks}, "
                            f"{self.input_size})")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"--val-fraction {self.val_fraction}: must be between 0 and 1")

    def settings(self) -> dict:
        """What a finished fold's result depends on among the settings (paths, workers and
        device do not count; the data and weights count by content, see :func:`load_protocol`)."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("manifest", "init", "out", "groups", "workers", "device")}


class FoldTracker(Interface):
    """What the protocol tells an experiment tracker; the stage supplies one (or none)."""

    def fold(self, folder: Path, name: str) -> ContextManager[OnEpoch]:
        """A fold is about to train; the context yields its per-epoch callback."""

    def finished(self, result: dict, folder: Path) -> None:
        """A fold's result and files are ready (inside :meth:`fold`); may add keys to ``result``."""

    def reused(self, result: dict, folder: Path, name: str) -> bool:
        """A finished fold is reused; True when ``result`` gained keys that must be saved."""


# --- data ---------------------------------------------------------------------------------

@dataclass
class Protocol:
    """Everything the folds share, loaded once."""
    manifest: pd.DataFrame
    crops: np.ndarray
    folds: np.ndarray          # (N,) int, -1 where the manifest has no fold
    init: dict                 # the cascade checkpoint, read once
    input_size: int
    key: str                   # init tensors + crop store + code: part of every fold's fingerprint
    compute: Compute

    @property
    def device(self) -> torch.device:
        return self.compute.device


def load_protocol(config: AdienceConfig) -> Protocol:
    manifest, crops = load_prepared(config.manifest)
    missing = {"fold", "subject", "sha1", *(GROUPINGS[g][0] for g in config.groups)} - set(manifest)
    if missing:
        raise UserError(f"{config.manifest}: manifest lacks column(s) {sorted(missing)}")
    init = read_init(config.init)
    if not isinstance(init, dict) or not {"model", "meta"} <= set(init) \
            or not {"arch", "ages", "input_spec", "input_size"} <= set(init["meta"]):
        raise UserError(f"{config.init}: not a stage model.pt (needs 'model' and 'meta' with "
                        "arch, ages, input_spec, input_size)")
    folds = manifest["fold"].astype("Float64").fillna(-1).to_numpy(dtype=np.int64)
    device = distributed.own_device(pick_device(config.device), shared=True)
    key = run_key({}, config.manifest, device.type, init)  # each fold adds its settings
    compute = choose_compute(device, init["meta"]["arch"], config.precision)
    print(f"computing on {compute.describe()}")
    return Protocol(manifest, crops, folds, init, config.input_size or int(init["meta"]["input_size"]),
                    key, compute)


def group_labels(manifest: pd.DataFrame, groups: int, source: Path) -> np.ndarray:
    """(N,) class index in age order, -1 where the row has no group."""
    column, classes = GROUPINGS[groups]
    values = manifest[column].astype("string")
    unknown = sorted(set(values.dropna()) - set(classes))
    if unknown:
        where = manifest.loc[values == unknown[0], "path"].iloc[0]
        raise UserError(f"{source}: {column} {unknown[0]!r} (e.g. {where}) is not one of {classes}")
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


# --- training -----------------------------------------------------------------------------

def start_model(config: AdienceConfig, p: Protocol, groups: int) -> tuple[AgeNet, InputSpec]:
    """The init checkpoint's network with a fresh output layer of ``groups`` units."""
    torch.manual_seed(config.seed)  # the fresh output layer starts alike in every fold and rerun
    model, spec, _ = model_from_init(p.init, tuple(float(i) for i in range(groups)))
    # The classes are age *groups*; model_from_init matches output units by label value, and
    # group index 6 is not age 6: no unit of the previous stage stands for a group.
    he_init(model.output_layer)
    if config.mode == "a":
        freeze_features(model)
    return model, spec


def train_full(config: AdienceConfig, p: Protocol, labels: np.ndarray, groups: int,
               rows: dict[str, np.ndarray], folder: Path, key: str, on_epoch: OnEpoch | None
               ) -> tuple[list[dict], int, float, torch.Tensor]:
    """The thesis's recipe (``engine.fit``: augmentation, LR on plateau, kept epoch by validation)
    on the whole network (mode a: the head). Returns (history, kept epoch, its validation group
    MAE, test class probabilities)."""
    model, spec = start_model(config, p, groups)
    model = model.to(p.device, memory_format=p.compute.memory_format)
    train = TrainConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch,
                        patience=config.patience, input_size=p.input_size, seed=config.seed,
                        input_spec=spec)
    optimizer = adam([q for q in model.parameters() if q.requires_grad], config.lr)

    def loader(part: str, batch: int, shuffle: bool):
        return make_loader(p.crops, labels, rows[part], batch, shuffle, config.seed,
                           config.workers, p.device.type == "cuda")

    steps = torch.arange(groups, dtype=torch.float32, device=p.device)  # "ages" = group indices
    meta = {"arch": model.arch, "backbone": p.init["meta"].get("backbone", model.arch),
            "input_spec": asdict(spec), "mode": config.mode, "dataset": "adience",
            "ages": steps.tolist(), "groups": GROUPINGS[groups][1], "input_size": p.input_size,
            "seed": config.seed}
    history = fit(model, loader("train", config.batch, True),
                  loader("val", max(config.batch, 64), False), steps, optimizer, train, p.compute,
                  folder, meta, on_epoch, key=key)
    best = torch.load(folder / "model.pt", map_location=p.device, weights_only=True)
    model.load_state_dict(best["model"])
    logits, true, _ = predict(model, loader("test", max(config.batch, 64), False), p.compute,
                              p.input_size, steps, spec)
    if not np.array_equal(true.numpy(), labels[rows["test"]]):
        raise RuntimeError("test predictions came back out of row order")
    (folder / "model.pt").unlink()  # five networks per grouping: the scores are what is kept
    return history, best["epoch"] + 1, best["metrics"]["val_mae"], logits.softmax(dim=1)


@dataclass
class Tail:
    """The trainable part, its starting state, and the frozen part's output for every manifest
    row, plain and mirrored: (2, N, ...), computed once for all folds and epochs. Mode a: the
    head on the trunk's pooled features; ``train_blocks`` > 0: the trunk's last blocks and the
    head on the stem's maps."""
    net: torch.nn.Module
    start: dict
    views: torch.Tensor
    compute: Compute


def make_tail(config: AdienceConfig, p: Protocol, groups: int) -> Tail:
    model, spec = start_model(config, p, groups)
    model = model.to(p.device)
    nhwc = p.compute.nhwc

    def inputs(start: int, stop: int) -> torch.Tensor:
        images = torch.from_numpy(np.array(p.crops[start:stop])).to(p.device)  # a copy: read-only store
        return to_input(images, p.input_size, nhwc, spec)

    if config.mode == "a":
        frozen, net = model.features.eval(), model.head
    else:
        frozen, net = split_trunk(model, config.train_blocks, inputs(0, min(8, len(p.crops))))
    plain, mirrored = [], []
    with torch.no_grad():
        for start in range(0, len(p.crops), 128):
            x = inputs(start, start + 128)
            with p.compute.autocast():
                plain.append(frozen(x).float())
                mirrored.append(frozen(x.flip(-1)).float())
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return Tail(net, start, torch.stack([torch.cat(plain), torch.cat(mirrored)]), p.compute)


@torch.no_grad()
def _tail_probabilities(net: torch.nn.Module, views: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Softmax (len(rows), K), averaged over each face and its mirror image."""
    net.eval()
    idx = torch.as_tensor(rows, device=views.device)
    out = [net(views[v, idx[s:s + 256]]).float().softmax(1) for v in range(2)
           for s in range(0, len(idx), 256)]
    half = len(out) // 2
    return (torch.cat(out[:half]) + torch.cat(out[half:])) / 2


def train_tail(config: AdienceConfig, tail: Tail, labels: np.ndarray, groups: int,
               rows: dict[str, np.ndarray], seed: int, on_epoch: OnEpoch | None
               ) -> tuple[list[dict], int, float, torch.Tensor]:
    """The same recipe as :func:`train_full` (Adam, LR halved on a validation-loss plateau, the
    epoch with the lowest validation group MAE kept) on the tail, with a random view (plain or
    mirrored) per face per step as its augmentation. Returns as :func:`train_full`."""
    net, views = tail.net, tail.views
    net.load_state_dict(tail.start)
    device = views.device
    y = torch.as_tensor(labels, device=device)
    steps = torch.arange(groups, dtype=torch.float32, device=device)
    optimizer = adam([q for q in net.parameters() if q.requires_grad], config.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5,
                                                           patience=config.patience)
    gen = torch.Generator().manual_seed(seed)
    train, val = rows["train"], rows["val"]
    # whole batches only (BatchNorm needs more than one face), as the full fine-tune's loader
    batch = min(config.batch, len(train))
    history, best, best_state = [], None, None
    for epoch in range(config.epochs):
        net.train()
        order = train[torch.randperm(len(train), generator=gen).numpy()]
        total = torch.zeros((), device=device)
        for step in range(len(train) // batch):
            idx = torch.as_tensor(order[step * batch:(step + 1) * batch], device=device)
            view = torch.randint(2, (len(idx),), generator=gen).to(device)
            with tail.compute.autocast():
                loss = F.cross_entropy(net(views[view, idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(idx)   # read once per epoch: no host sync per step
        probs = _tail_probabilities(net, views, val)
        target = y[torch.as_tensor(val, device=device)]
        metrics = {"train_loss": total.item() / (len(train) // batch * batch),
                   "val_loss": F.nll_loss(probs.clamp_min(1e-12).log(), target).item(),
                   "val_mae": (probs @ steps - target.float()).abs().mean().item(),
                   "lr": optimizer.param_groups[0]["lr"]}
        scheduler.step(metrics["val_loss"])
        history.append({"epoch": epoch + 1, **metrics})
        if best is None or metrics["val_mae"] < best[1]:
            best = (epoch + 1, metrics["val_mae"])
            best_state = copy.deepcopy(net.state_dict())
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)
    net.load_state_dict(best_state)
    return history, best[0], best[1], _tail_probabilities(net, views, rows["test"]).cpu()


# --- scores -------------------------------------------------------------------------------

def majority_class(train_labels: np.ndarray, groups: int) -> int:
    """The commonest class among the labels a fold learns from; a tie goes to the younger."""
    return int(np.bincount(train_labels, minlength=groups).argmax())


def score_fold(groups: int, true: np.ndarray, pred: np.ndarray, train_labels: np.ndarray) -> dict:
    """A fold's scores, beside those of the majority class of ``train_labels`` (the fold's
    training and validation rows); an 8-group fold is scored merged to 3 groups too (``as3_``),
    against the majority of the training labels merged likewise."""
    confusion = confusion_matrix(true, pred, groups)
    minors = confusion if groups == 3 else merge_to_3(confusion)
    majority = majority_class(train_labels, groups)
    constant = np.full_like(true, majority)
    scores = {"exact_acc": exact_accuracy(true, pred), "one_off_acc": one_off_accuracy(true, pred),
              "majority_class": GROUPINGS[groups][1][majority],
              "majority_exact_acc": exact_accuracy(true, constant),
              "majority_one_off_acc": one_off_accuracy(true, constant),
              "minors_recall": float(precision_recall(minors)[1][CHILD]),
              "confusion": confusion.tolist()}
    if groups == 8:
        true3 = MERGE_8_TO_3[true]
        majority3 = majority_class(MERGE_8_TO_3[train_labels], 3)
        scores |= {"as3_exact_acc": exact_accuracy(true3, MERGE_8_TO_3[pred]),
                   "as3_majority_class": GROUPS3[majority3],
                   "as3_majority_exact_acc": exact_accuracy(true3, np.full_like(true3, majority3))}
    return scores


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
    to_csv_atomic(table, folder / ROWS)


def _write_json(obj: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# --- the protocol -------------------------------------------------------------------------

class _Grouping:
    """One grouping's labels, and its tail (built on first need: reused folds never need it)."""

    def __init__(self, config: AdienceConfig, p: Protocol, groups: int) -> None:
        self.config, self.p, self.groups = config, p, groups
        self.labels = group_labels(p.manifest, groups, config.manifest)
        self._tail: Tail | None = None

    def train(self, rows: dict[str, np.ndarray], folder: Path, key: str, k: int,
              on_epoch: OnEpoch | None) -> tuple[list[dict], int, float, torch.Tensor]:
        if self.config.mode != "a" and not self.config.train_blocks:
            return train_full(self.config, self.p, self.labels, self.groups, rows, folder, key,
                              on_epoch)
        if self._tail is None:
            self._tail = make_tail(self.config, self.p, self.groups)
        return train_tail(self.config, self._tail, self.labels, self.groups, rows,
                          self.config.seed * 1_000 + k, on_epoch)


def run_grouping(config: AdienceConfig, p: Protocol, groups: int,
                 tracker: FoldTracker | None) -> tuple[list[dict], dict]:
    """Every fold of one grouping, reusing finished ones; (per-fold results, label counts)."""
    grouping = _Grouping(config, p, groups)
    folds, counts = grouping_folds(config, p, grouping)
    return [run_fold(config, p, grouping, k, tracker) for k in folds], counts


def grouping_folds(config: AdienceConfig, p: Protocol, grouping: _Grouping
                   ) -> tuple[list[int], dict]:
    """The test folds of one grouping, and the counts of the rows it leaves out."""
    groups, labels = grouping.groups, grouping.labels
    counts = {"n_no_group": int((labels < 0).sum()),
              "n_no_fold": int(((labels >= 0) & (p.folds < 0)).sum())}
    if counts["n_no_group"] or counts["n_no_fold"]:
        print(f"g{groups}: {counts['n_no_group']} rows without a {GROUPINGS[groups][0]} and "
              f"{counts['n_no_fold']} without a fold are left out (counted in metrics.json)")
    folds = sorted(set(p.folds[(labels >= 0) & (p.folds >= 0)].tolist()))
    if len(folds) < 2:
        raise UserError(f"{config.manifest}: {len(folds)} fold(s) with {GROUPINGS[groups][0]} "
                        "labels; cross-validation needs at least 2")
    return folds, counts


def share_folds(config: AdienceConfig, p: Protocol, world: distributed.World) -> None:
    """Under torchrun: this process's share of every grouping's folds (every WORLD_SIZE-th,
    from RANK), trained untracked and alone (no process group: each fold is its own run);
    then wait until every process's folds are finished on disk. Rank 0 then reuses them all
    (``FoldTracker.reused``). torchrun stops every process when one fails, so none waits for
    a fold that will never come."""
    groupings = {groups: _Grouping(config, p, groups) for groups in config.groups}
    jobs = [(groups, k) for groups, grouping in groupings.items()
            for k in grouping_folds(config, p, grouping)[0]]
    for groups, k in jobs[world.rank::world.size]:
        run_fold(config, p, groupings[groups], k, None)

    def missing() -> list[tuple[int, int]]:
        return [(groups, k) for groups, k in jobs if finished_result(
            fold_folder(config, groups, k) / RESULT, fold_key(config, p, groups, k)) is None]

    if waiting := missing():
        print(f"waiting for {len(waiting)} folds of the other processes")
    while missing():
        time.sleep(POLL_S)


def fold_folder(config: AdienceConfig, groups: int, k: int) -> Path:
    return config.out / "folds" / f"g{groups}" / f"fold{k}"


def fold_key(config: AdienceConfig, p: Protocol, groups: int, k: int) -> str:
    """What a finished fold's result depends on (see :meth:`AdienceConfig.settings`)."""
    return fingerprint(settings=config.settings(), data=p.key, groups=groups, fold=k)


def finished_result(done: Path, key: str) -> dict | None:
    """A fold's result on disk if it was finished with the settings ``key`` stands for."""
    try:
        result = json.loads(done.read_text())
    except FileNotFoundError:
        return None
    return result if result.get("fingerprint") == key else None


def run_fold(config: AdienceConfig, p: Protocol, grouping: _Grouping, k: int,
             tracker: FoldTracker | None) -> dict:
    """Test fold k's result: the finished one on disk when its fingerprint matches, else trained."""
    groups, labels = grouping.groups, grouping.labels
    folder = fold_folder(config, groups, k)
    folder.mkdir(parents=True, exist_ok=True)
    name, done = f"g{groups}-fold{k}", folder / RESULT
    key = fold_key(config, p, groups, k)
    if (result := finished_result(done, key)) is not None:
        print(f"{name}: finished earlier, reusing {done}")
        if not (folder / CONFUSION).exists():
            plot_fold(result, groups, folder, k)
        if tracker is not None and tracker.reused(result, folder, name):
            _write_json(result, done)
        return result
    rows = fold_rows(p, labels, k, config.val_fraction, config.seed)
    if len(rows["train"]) == 0 or len(rows["val"]) == 0:
        raise UserError(f"{config.manifest}: fold {k} leaves {len(rows['train'])} training and "
                        f"{len(rows['val'])} validation images; use more data")
    sizes = {f"n_{part}": int(len(r)) for part, r in rows.items()}
    print(f"{name}: training on {sizes['n_train']}, validating on {sizes['n_val']}, testing "
          f"{sizes['n_test']} ({sizes['n_excluded']} training rows share a subject or image "
          "with the test fold and are left out)")
    started = time.perf_counter()
    with tracker.fold(folder, name) if tracker else contextlib.nullcontext() as on_epoch:
        history, best_epoch, val_mae, probs = grouping.train(rows, folder, key, k, on_epoch)
        pred = probs.argmax(dim=1).numpy()
        to_csv_atomic(pd.DataFrame(history), folder / "history.csv")
        write_rows(folder, p, labels, groups, rows, pred)
        result = {"fingerprint": key, "fold": k, **sizes, "best_epoch": best_epoch,
                  "epochs": len(history), "val_group_mae": val_mae,
                  "seconds": round(time.perf_counter() - started, 2),
                  **score_fold(groups, labels[rows["test"]], pred,
                               labels[np.concatenate([rows["train"], rows["val"]])])}
        plot_fold(result, groups, folder, k)
        if tracker is not None:
            tracker.finished(result, folder)
    _write_json(result, done)
    clear_resume_point(folder)  # only now: a kill before result.json resumes from last.pt
    print(f"{name}: exact {result['exact_acc']:.3f} (majority class "
          f"{result['majority_exact_acc']:.3f})  1-off {result['one_off_acc']:.3f}  "
          f"minors recall {result['minors_recall']:.3f}")
    return result


def plot_fold(result: dict, groups: int, folder: Path, k: int) -> None:
    confusion_png(np.array(result["confusion"]), GROUPINGS[groups][1], folder / CONFUSION,
                  f"Adience, {groups} groups, test fold {k}")


def _mean_std(results: list[dict], key: str, prefix: str) -> dict[str, float]:
    mean, std, _ = fold_mean_std(np.array([r[key] for r in results]))
    return {f"{prefix}{key}": mean, f"{prefix}{key}_std": std}


def summarise(groups: int, results: list[dict], counts: dict) -> tuple[dict, pd.DataFrame]:
    """Flat metrics of one grouping (keys of the 3-group run start with g3_, the 8-group run
    merged to 3 groups with g8as3_) and its class table."""
    prefix = "" if groups == 8 else f"g{groups}_"
    pooled = np.sum([np.array(r["confusion"]) for r in results], axis=0)  # (G,G)
    metrics: dict[str, float | int] = {}
    for key in ("exact_acc", "one_off_acc", "majority_exact_acc", "majority_one_off_acc"):
        metrics |= _mean_std(results, key, prefix)
    if groups == 8:
        for key in ("exact_acc", "majority_exact_acc"):
            metrics |= {k.replace("as3_", "g8as3_", 1): v
                        for k, v in _mean_std(results, f"as3_{key}", "").items()}
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


def _pooled3(groups_run: dict[int, list[dict]]) -> tuple[int, np.ndarray]:
    """(grouping used, pooled 3-group confusion): the 3-group networks' when they ran, else the
    8-group predictions merged."""
    groups = 3 if 3 in groups_run else 8
    pooled = np.sum([np.array(r["confusion"]) for r in groups_run[groups]], axis=0)
    return groups, pooled if groups == 3 else merge_to_3(pooled)


def minors(groups_run: dict[int, list[dict]]) -> dict[str, float]:
    """The headline: recall of 0-12 over all test folds pooled (every child counts once); std
    over folds."""
    groups, confusion = _pooled3(groups_run)
    precision, recall = precision_recall(confusion)
    _, std, _ = fold_mean_std(np.array([r["minors_recall"] for r in groups_run[groups]]))
    # the majority class finds every child of the folds whose training majority is a child group
    children = [(np.array(r["confusion"])[MERGE_8_TO_3 == CHILD if groups == 8 else CHILD].sum(),
                 r["as3_majority_class" if groups == 8 else "majority_class"] == GROUPS3[CHILD])
                for r in groups_run[groups]]
    found = sum(n for n, hit in children if hit) / max(1, sum(n for n, _ in children))
    return {"minors_recall": float(recall[CHILD]), "minors_recall_std": std,
            "minors_precision": float(precision[CHILD]), "majority_minors_recall": float(found),
            "minors_from_groups": groups}


def child_teen_adult(groups_run: dict[int, list[dict]]) -> pd.DataFrame:
    """The pooled 3-group confusion counts (rows true, columns predicted), as thesis table 6."""
    _, confusion = _pooled3(groups_run)
    return pd.DataFrame(confusion, index=pd.Index(GROUPS3, name="true"), columns=GROUPS3)


def run(config: AdienceConfig, p: Protocol | None = None,
        tracker: FoldTracker | None = None) -> dict | None:
    """The protocol as ``config`` says; writes ``config.out``'s files, returns the flat metrics.
    Under torchrun the processes share the folds, and rank 0 alone goes on to the summary
    (None elsewhere)."""
    p = p or load_protocol(config)
    config.out.mkdir(parents=True, exist_ok=True)
    world = distributed.from_env()
    if world.size > 1:
        share_folds(config, p, world)
        if not world.main:
            return None
    done: dict[int, list[dict]] = {}
    metrics: dict = {"n_images": len(p.manifest)}
    tables, fold_table = [], []
    for groups in config.groups:
        done[groups], counts = run_grouping(config, p, groups, tracker)
        part, table = summarise(groups, done[groups], counts)
        metrics |= part
        tables.append(table)
        pooled = np.sum([np.array(r["confusion"]) for r in done[groups]], axis=0)
        confusion_png(pooled, GROUPINGS[groups][1], config.out / f"confusion_g{groups}.png",
                      f"Adience, {groups} groups, {len(done[groups])} test folds pooled")
        fold_table += [{"groups": groups, **{k: v for k, v in r.items()
                                            if k not in ("confusion", "fingerprint", "mlflow_parent")}}
                       for r in done[groups]]
    metrics |= minors(done)
    to_csv_atomic(child_teen_adult(done), config.out / "confusion_g3.csv", index=True)
    to_csv_atomic(pd.DataFrame(fold_table), config.out / "folds.csv")
    to_csv_atomic(pd.concat(tables, ignore_index=True), config.out / "classes.csv")
    metrics = {k: (v if _finite(v) else None) for k, v in metrics.items()}  # JSON has no NaN
    _write_json(metrics, config.out / "metrics.json")
    return metrics
