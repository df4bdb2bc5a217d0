"""FG-NET leave-one-person-out (LOPO): one model per held-out subject, all from one checkpoint.

The folds must not cost one full run each. So the crops are resized once and kept on the
training device as one uint8 tensor (batches are tensor indexing, no loader), the checkpoint is
read once, and every fold starts by loading the same starting weights into one network.
In mode a the trunk is frozen, so its features are computed once (plain and mirrored views) and
the heads of many folds train at the same time: one vmapped forward through stacked heads, in
which each fold's loss masks out its own held-out subject. Modes b and c can likewise fine-tune
only the trunk's last blocks (``train_blocks``): the frozen stem then also runs once per image.

Under ``torchrun`` (modes b and c) the folds are shared out: process RANK trains the missing
folds RANK, RANK + WORLD_SIZE, ... Each fold starts from the same weights with its own seed, so
its predictions do not depend on the world size. Rank 0 then trains the final model and
writes every output; the other processes write only their folds' CSVs.

Finished folds are kept in ``out/folds/`` with a fingerprint of what produced them (settings,
starting weights, crops, code; see :func:`settings_key`), so a rerun after an interruption
trains only the folds that are missing. A fold's CSV is written atomically: it exists only
whole, so its presence means the fold is finished.

:func:`run` is the `lopo` stage's computation: it writes into ``config.out`` predictions.csv
(every image, predicted by the fold that held its subject out), folds.csv (MAE per subject),
metrics.json (table 4's columns, beside the median predictor's MAE) and model.pt, the same
recipe trained on every subject: the model the registry deploys. It logs nothing: it reports
each finished fold to the caller's ``on_fold``.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from agecascade.atomic import to_csv_atomic, torch_save_atomic, write_text_atomic
from agecascade.cache import run_key
from agecascade.config import device_option, option
from agecascade.data.store import crop_recipe, load_prepared
from agecascade.errors import UserError
from agecascade.evaluation.baselines import median_baseline
from agecascade.nets import PRETRAINED, AgeNet, create_model, freeze_features
from agecascade.nets.split import split_trunk
from agecascade.nets.weights import InputSpec
from agecascade.train import distributed
from agecascade.train.cascade import (MODES, inherited_labels, inherited_meta, model_from_init,
                                      read_init)
from agecascade.train.data import (IMAGENET, Augment, LabelSpace, augment_batch, label_space_for,
                                   normalise, to_unit)
from agecascade.train.compute import Compute, choose_compute, precision_option
from agecascade.train.engine import adam, pick_device

FOLDS_DIR = "folds"
AUGMENT = Augment()  # modes b and c without train_blocks: the thesis's augmentation


@dataclass(frozen=True, kw_only=True)
class LopoConfig:
    """Every setting of the `lopo` stage and its default; the command line is built from it, so
    a default lives here only. The folds start from ``model`` (a cascade checkpoint) or from
    ``backbone``'s ``pretrained`` weights (the thesis's mode a), one of the two."""
    manifest: Path = option(help="a prepared FG-NET-style folder")
    model: Path | None = option(None, help="the checkpoint every fold starts from (mode b: "
                                           "after IMDB; c: after AgeDB)")
    backbone: str = option("", help="start from a backbone's pretrained weights instead (the "
                                    "thesis's mode a: the face-recognition network, no age "
                                    "training)")
    pretrained: str = option("none", choices=PRETRAINED, help="with --backbone: the weights' "
                                                              "source")
    weights: str = option("", help="with --backbone --pretrained vggface2: checkpoint file")
    mode: str = option(choices=tuple(MODES), help="a: frozen trunk, only the head trains; b, c: "
                                                  "fine-tune per fold")
    train_blocks: int = option(0, help="modes b, c: fine-tune only the trunk's last N blocks "
                                       "with weights, and the head; the frozen rest runs once "
                                       "per image (0 = everything)")
    epochs: int = option(3)
    lr: float = option(1e-4)
    batch: int = option(32, help="training images per step")
    input_size: int = option(0, help="0 = the checkpoint's own")
    seed: int = option(0)
    head_params_budget: int = option(200_000_000, help="mode a: head parameters trained at once "
                                                       "(the folds' heads train in groups that "
                                                       "fit)")
    device: str = device_option()
    precision: str = precision_option()
    out: Path = option(help="folder of predictions.csv, folds.csv, metrics.json and model.pt")

    def __post_init__(self) -> None:
        if (self.model is None) == (not self.backbone):
            raise UserError("give one of --model (a cascade checkpoint) and --backbone (its "
                            "pretrained weights)")
        if self.mode not in MODES:
            raise UserError(f"--mode {self.mode!r}: use one of {tuple(MODES)}")
        if self.mode == "a" and self.train_blocks:
            raise UserError("--train-blocks is for modes b and c; mode a trains the head only")
        if self.pretrained not in PRETRAINED:
            raise UserError(f"--pretrained {self.pretrained!r}: use one of {PRETRAINED}")
        if self.model is not None and (self.pretrained != "none" or self.weights):
            raise UserError("--pretrained and --weights go with --backbone; --model brings its "
                            "own weights")
        if self.backbone and (self.pretrained == "vggface2") != bool(self.weights):
            raise UserError("--weights goes with --pretrained vggface2, and only with it")
        if self.backbone and not self.input_size:
            raise UserError("--input-size is needed when starting from a backbone's weights")
        if min(self.epochs, self.batch, self.head_params_budget) < 1 or not self.lr > 0 \
                or min(self.train_blocks, self.input_size) < 0:
            raise UserError(f"--epochs, --batch and --head-params-budget must be >= 1, --lr > 0, "
                            f"--train-blocks and --input-size >= 0 (got {self.epochs}, "
                            f"{self.batch}, {self.head_params_budget}, {self.lr:g}, "
                            f"{self.train_blocks}, {self.input_size})")

    def settings(self) -> dict:
        """The settings that shape a result: all but the places of files (their content counts
        instead, see :func:`settings_key`) and the device's name."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("manifest", "model", "weights", "out", "device")}


@dataclass
class FoldData:
    """Every image of the protocol, once, on the training device."""
    images: torch.Tensor     # uint8 (N, S, S, 3), already at the input size
    labels: torch.Tensor     # int64 (N,), class index of the age
    subjects: np.ndarray     # (N,) subject id per image
    ages: np.ndarray         # (N,) true age in years

    @classmethod
    def load(cls, manifest: pd.DataFrame, crops: np.ndarray, space: LabelSpace, size: int,
             device: torch.device) -> "FoldData":
        if manifest["subject"].isna().any():
            raise UserError("leave-one-person-out needs a subject for every image; "
                            f"{int(manifest['subject'].isna().sum())} rows have none")
        ages = manifest["age"].to_numpy(dtype=float)
        chunks = []
        for start in range(0, len(crops), 256):  # resize in pieces: the full-size store can be big
            unit = to_unit(torch.from_numpy(np.array(crops[start:start + 256])), size)
            chunks.append(unit.mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1))
        images = torch.cat(chunks).contiguous()
        return cls(images.to(device), torch.from_numpy(space.encode(ages)).to(device),
                   manifest["subject"].astype(str).to_numpy(), ages)


def settings_key(config: LopoConfig, init: Mapping | None, device: torch.device) -> str:
    """What a finished fold depends on, by content, so resumed folds come from the same run.

    The prepared folder counts by its manifest and crops, not its path. The folds start from
    ``init``, ``config.model`` as ``read_init`` returns it (its tensors count, not its file), or
    without one from ``config.backbone`` with its ``pretrained`` weights (the choice and the
    weights file's content count). The code version, the device type and every setting that
    shapes a result (:meth:`LopoConfig.settings`, input size resolved) count too.
    """
    return run_key(config.settings(), config.manifest, device.type, init, config.pretrained,
                   config.weights)


def _batch(data: FoldData, rows: torch.Tensor, spec: InputSpec, nhwc: bool) -> torch.Tensor:
    return normalise(to_unit(data.images[rows], data.images.shape[1]), spec, nhwc)


@torch.no_grad()
def _probabilities(net: torch.nn.Module, both_views: Callable[[torch.Tensor], torch.Tensor],
                   rows: np.ndarray, compute: Compute) -> torch.Tensor:
    """Softmax (len(rows), K), averaged over each image and its mirror image.
    ``both_views(idx)``: (2B, ...), the B inputs of rows ``idx``, then those of their mirrors."""
    net.eval()
    out = []
    for start in range(0, len(rows), 128):
        idx = torch.as_tensor(rows[start:start + 128], device=compute.device)
        with compute.autocast():
            logits = net(both_views(idx))
        out.append(logits.float().softmax(1).view(2, len(idx), -1).mean(0))
    return torch.cat(out)


Inputs = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""A training batch for image rows ``idx``, drawn with ``gen``: augmented images, or cached
stem outputs of a random view."""


def train_fold(model: torch.nn.Module, start: dict, inputs: Inputs, labels: torch.Tensor,
               rows: np.ndarray, config: LopoConfig, compute: Compute, seed: int
               ) -> torch.nn.Module:
    """Fine-tune ``model`` from ``start`` on ``rows``: Adam, cosine-decayed LR, random batches.

    There is no validation split inside a fold (it would cost subjects the fold needs), so the
    LR decays to zero over a fixed number of epochs instead of following a plateau.
    """
    model.load_state_dict(start)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adam(params, config.lr)
    steps_per_epoch = max(1, len(rows) // config.batch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(config.epochs):
        order = rows[torch.randperm(len(rows), generator=gen).numpy()]
        for step in range(steps_per_epoch):  # whole batches only: BatchNorm needs more than one
            idx = torch.as_tensor(order[step * config.batch:(step + 1) * config.batch],
                                  device=compute.device)
            x = inputs(idx, gen)
            with compute.autocast():
                loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model


@torch.no_grad()
def _cached_views(fn: Callable[[torch.Tensor], torch.Tensor], data: FoldData, spec: InputSpec,
                  compute: Compute) -> torch.Tensor:
    """``fn`` (a frozen trunk or stem) of every image, plain and mirrored: (2, N, ...),
    computed once for all epochs and folds."""
    views = [], []
    for start in range(0, len(data.labels), 128):
        idx = torch.arange(start, min(start + 128, len(data.labels)), device=compute.device)
        x = _batch(data, idx, spec, compute.nhwc)
        with compute.autocast():
            views[0].append(fn(x).float())
            views[1].append(fn(x.flip(-1)).float())
    return torch.stack([torch.cat(v) for v in views])


def train_heads(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor,
                train_mask: torch.Tensor, config: LopoConfig, seed: int) -> list[torch.nn.Module]:
    """Train one copy of ``head`` per row of ``train_mask`` (F, N) at once; fold f learns only
    from the images its mask lets in. features: (V, N, D) views of the frozen trunk's output."""
    folds, n = train_mask.shape
    heads = [copy.deepcopy(head).train() for _ in range(folds)]
    params, buffers = stack_module_state(heads)          # each (F, *shape), leaf tensors
    skeleton = copy.deepcopy(head).to("meta")

    def forward(p, b, x):
        return functional_call(skeleton, (p, b), (x,))

    batched = torch.vmap(forward, in_dims=(0, 0, None), randomness="different")
    optimizer = adam(params.values(), config.lr)
    steps_per_epoch = max(1, n // config.batch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    weights = train_mask.float()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen).to(labels.device)
        view = torch.randint(features.shape[0], (n,), generator=gen).to(labels.device)
        for step in range(steps_per_epoch):
            idx = order[step * config.batch:(step + 1) * config.batch]
            logits = batched(params, buffers, features[view[idx], idx])   # (F, B, K)
            losses = F.cross_entropy(logits.flatten(0, 1), labels[idx].repeat(folds),
                                     reduction="none").view(folds, -1)
            w = weights[:, idx]                                            # (F, B)
            loss = ((losses * w).sum(1) / w.sum(1).clamp(min=1)).sum()     # folds independent
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    for f, trained in enumerate(heads):
        trained.load_state_dict({k: v[f].detach().clone() for k, v in {**params, **buffers}.items()})
        trained.eval()
    return heads


def _fold_frame(data: FoldData, rows: np.ndarray, probs: torch.Tensor, space: LabelSpace,
                paths: np.ndarray) -> pd.DataFrame:
    predicted = (probs @ space.tensor(probs.device)).cpu().numpy()
    return pd.DataFrame({"path": paths[rows], "subject": data.subjects[rows],
                         "age": data.ages[rows], "predicted": predicted})


def run_lopo(model: AgeNet, start: dict, spec: InputSpec, space: LabelSpace,
             manifest: pd.DataFrame, crops: np.ndarray, config: LopoConfig, compute: Compute,
             key: str, on_fold: Callable[[str, pd.DataFrame], None] | None = None,
             world: distributed.World = distributed.World()
             ) -> tuple[pd.DataFrame, AgeNet] | None:
    """Predictions for every image from the fold that held its subject out, and a final model
    trained the same way on every subject (the one to deploy); None on a rank other than 0.

    ``start`` is the state every fold begins from; ``key`` names the settings (see
    :func:`settings_key`) so that finished folds of other settings are not reused. The folds
    are kept in ``config.out / FOLDS_DIR``; ``config.input_size`` must be resolved (not 0).
    """
    folds_dir = config.out / FOLDS_DIR
    stamp = folds_dir / "settings.txt"
    if world.main:
        if folds_dir.exists() and (not stamp.exists() or stamp.read_text() != key):
            print(f"{folds_dir} holds folds of other settings: starting over")
            for stale in folds_dir.glob("*.csv"):
                stale.unlink()
        folds_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(stamp, key)
    distributed.barrier(world)

    model = model.to(compute.device, memory_format=compute.memory_format)
    data = FoldData.load(manifest, crops, space, config.input_size, compute.device)
    paths = manifest["path"].astype(str).to_numpy()
    subjects = sorted(set(data.subjects))
    fold_file = {s: folds_dir / f"{i:03d}.csv" for i, s in enumerate(subjects)}
    todo = [s for s in subjects if not fold_file[s].exists()]
    distributed.barrier(world)  # every process has read what is missing before one more is written
    if len(todo) < len(subjects) and world.main:
        print(f"resuming: {len(subjects) - len(todo)} of {len(subjects)} folds already done")
    mine = todo[world.rank::world.size]

    def finished(subject: str, frame: pd.DataFrame) -> None:
        to_csv_atomic(frame, fold_file[subject])  # whole or absent: present means finished
        if on_fold is not None:
            on_fold(subject, frame)

    def gathered() -> bool:
        """After every process's folds: on rank 0, report the others' to ``on_fold``; True
        where the run goes on (rank 0)."""
        distributed.barrier(world)
        if world.main and on_fold is not None:
            for subject in sorted(set(todo) - set(mine)):
                on_fold(subject, pd.read_csv(fold_file[subject], dtype={"subject": str}))
        return world.main

    if config.mode == "a":
        final = _lopo_heads(model, start, data, spec, space, config, compute, todo, paths, finished)
    else:
        final = _lopo_finetune(model, start, data, spec, space, config, compute, subjects, mine,
                               paths, finished, gathered)
        if final is None:
            return None
    predictions = pd.concat([pd.read_csv(fold_file[s], dtype={"subject": str}) for s in subjects],
                            ignore_index=True)
    return predictions, final.eval()


def _lopo_finetune(model: AgeNet, start: dict, data: FoldData, spec: InputSpec,
                   space: LabelSpace, config: LopoConfig, compute: Compute,
                   subjects: list[str], todo: list[str], paths: np.ndarray,
                   finished: Callable[[str, pd.DataFrame], None],
                   gathered: Callable[[], bool] = lambda: True) -> AgeNet | None:
    """Modes b and c: each fold fine-tunes from ``start``: the whole network on augmented
    images, or (``config.train_blocks``) only the trunk's last blocks and the head, on the
    frozen stem's outputs of each image and its mirror image, computed once for all folds.
    The final model follows the folds where ``gathered()`` says so (None elsewhere)."""
    device, nhwc = compute.device, compute.nhwc
    model.load_state_dict(start)
    if config.train_blocks:
        probe = _batch(data, torch.arange(min(8, len(paths)), device=device), spec, nhwc)
        stem, net = split_trunk(model, config.train_blocks, probe)
        views = _cached_views(stem, data, spec, compute)                 # (2, N, C, h, w)
        net_start = {k: start[k] for k in net.state_dict()}

        def inputs(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            view = torch.randint(2, (len(idx),), generator=gen).to(device)
            return views[view, idx]

        def both_views(idx: torch.Tensor) -> torch.Tensor:
            return views[:, idx].flatten(0, 1)
    else:
        net, net_start = model, start

        def inputs(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return augment_batch(_batch(data, idx, spec, nhwc), AUGMENT, gen)

        def both_views(idx: torch.Tensor) -> torch.Tensor:
            x = _batch(data, idx, spec, nhwc)
            return torch.cat([x, x.flip(-1)])

    for subject in todo:
        fold = subjects.index(subject)
        held_out = data.subjects == subject
        train_fold(net, net_start, inputs, data.labels, np.flatnonzero(~held_out), config,
                   compute, config.seed * 1_000 + fold)
        rows = np.flatnonzero(held_out)
        frame = _fold_frame(data, rows, _probabilities(net, both_views, rows, compute), space, paths)
        finished(subject, frame)
        print(f"fold {fold + 1}/{len(subjects)} ({subject}): "
              f"MAE {(frame['predicted'] - frame['age']).abs().mean():.2f}")
    if not gathered():
        return None
    train_fold(net, net_start, inputs, data.labels, np.arange(len(paths)), config, compute,
               config.seed * 1_000 + len(subjects))
    if net is not model:
        model.load_state_dict({**start, **net.state_dict()})
    return model


def _lopo_heads(model: AgeNet, start: dict, data: FoldData, spec: InputSpec, space: LabelSpace,
                config: LopoConfig, compute: Compute, todo: list[str], paths: np.ndarray,
                finished: Callable[[str, pd.DataFrame], None]) -> AgeNet:
    """Mode a: all folds' heads (plus the final all-subject head) in groups that fit memory."""
    model.load_state_dict(start)
    freeze_features(model)
    model.eval()
    features = _cached_views(model.features, data, spec, compute)
    head_size = sum(p.numel() for p in model.head.parameters())
    group = max(1, config.head_params_budget // (3 * head_size))  # weights + two Adam moments
    jobs: list[str | None] = [*todo, None]                          # None: the final head
    for first in range(0, len(jobs), group):
        chunk = jobs[first:first + group]
        mask = torch.stack([torch.as_tensor(data.subjects != s if s is not None
                                            else np.ones(len(paths), bool)) for s in chunk])
        heads = train_heads(model.head, features, data.labels, mask.to(compute.device), config,
                            config.seed * 1_000 + first)
        for subject, head in zip(chunk, heads):
            if subject is None:
                model.head.load_state_dict(head.state_dict())
                continue
            rows = np.flatnonzero(data.subjects == subject)
            with torch.no_grad():
                logits = torch.stack([head(features[v, rows]) for v in range(features.shape[0])])
            probs = logits.float().softmax(-1).mean(0)
            finished(subject, _fold_frame(data, rows, probs, space, paths))
        print(f"mode a: {min(first + group, len(jobs))}/{len(jobs)} heads trained")
    return model


def summarise(predictions: pd.DataFrame) -> dict[str, float]:
    """The thesis's table 4 columns, plus a 95% interval around the MAE from the errors' spread,
    and ``mae_median_baseline``: the MAE of predicting for each held-out subject the median age
    of the other subjects' images, the trivial predictor the MAE must beat."""
    errors = (predictions["predicted"] - predictions["age"]).abs()
    ages = predictions["age"].to_numpy(dtype=float)
    baseline = median_baseline(ages, predictions["subject"].astype(str).to_numpy())
    fold_mae = errors.groupby(predictions["subject"]).mean()
    half_width = 1.96 * errors.std(ddof=1) / math.sqrt(len(errors)) if len(errors) > 1 else 0.0
    return {"mae": float(errors.mean()), "median_ae": float(errors.median()),
            "fold_mae_lower_quartile": float(fold_mae.quantile(0.25)),
            "fold_mae_median": float(fold_mae.median()),
            "fold_mae_upper_quartile": float(fold_mae.quantile(0.75)),
            "mae_ci95_low": float(errors.mean() - half_width),
            "mae_ci95_high": float(errors.mean() + half_width),
            "mae_median_baseline": float(np.abs(ages - baseline).mean()),
            "n_folds": int(len(fold_mae)), "n_images": int(len(errors)),
            "mean_signed_error": float((predictions["predicted"] - predictions["age"]).mean())}


def run(config: LopoConfig, on_fold: Callable[[str, pd.DataFrame], None] | None = None,
        init: Mapping | None = None) -> tuple[dict, pd.DataFrame] | None:
    """The protocol as ``config`` says; write its outputs (see the module's docstring) and
    return (metrics.json's content, MAE per subject), or None on a torchrun rank other than 0.
    ``init``: ``config.model`` already read, if the caller has it. ``on_fold(subject,
    predictions)`` sees each newly finished fold."""
    if distributed.from_env().size > 1 and config.mode == "a":
        raise UserError("mode a trains every fold's head at once in one process: run it "
                        "without torchrun")
    world, device = distributed.join(pick_device(config.device), shared=True)
    try:
        return _run(config, on_fold, init, world, device)
    finally:
        distributed.leave()


def _run(config: LopoConfig, on_fold: Callable[[str, pd.DataFrame], None] | None,
         init: Mapping | None, world: distributed.World, device: torch.device
         ) -> tuple[dict, pd.DataFrame] | None:
    manifest, crops = load_prepared(config.manifest)
    space = label_space_for(manifest)
    torch.manual_seed(config.seed)  # a fresh output layer starts the same in every run and fold
    if config.model is not None:
        init = init if init is not None else read_init(config.model)
        space = inherited_labels(init, space)
        model, spec, fresh = model_from_init(init, space.values)
        print(f"{config.model}: {model.arch}, re-initialised: {', '.join(fresh) or 'nothing'}")
        meta = inherited_meta(init)
    else:
        model = create_model(config.backbone, space.size, config.pretrained,
                             Path(config.weights) if config.weights else None)
        spec = model.load_report.input_spec if model.load_report else IMAGENET
        meta = {"backbone": config.backbone, "arch": model.arch, "input_spec": asdict(spec),
                "pretrained": config.pretrained, "seed": config.seed}
    config = replace(config, input_size=config.input_size or int(meta["input_size"]))
    # a copy: state_dict() shares storage with the live weights, and every fold must start from
    # these, not from the previous fold's model (which saw this fold's subject)
    start = {k: v.detach().clone().to(device) for k, v in model.state_dict().items()}
    config.out.mkdir(parents=True, exist_ok=True)
    compute = choose_compute(device, model.arch, config.precision)
    if world.main:
        print(f"computing on {compute.describe()}" +
              (f"; {world.size} processes share the folds" if world.size > 1 else ""))
    done = run_lopo(model, start, spec, space, manifest, crops, config, compute,
                    settings_key(config, init, device), on_fold, world)
    if done is None:
        return None
    predictions, final = done

    # only the whole-network modes zoom (AUGMENT); cached views (mode a, train_blocks) do not
    zoom = AUGMENT.mean_zoom if config.mode != "a" and not config.train_blocks else 1.0
    out = config.out
    summary = summarise(predictions) | {"mode": config.mode, "backbone": meta["backbone"],
                                        "model": str(out / "model.pt")}
    to_csv_atomic(predictions, out / "predictions.csv")
    error = (predictions["predicted"] - predictions["age"]).abs()
    folds = (predictions.assign(error=error).groupby("subject", sort=True)
             .agg(n=("age", "size"), mean_age=("age", "mean"), mae=("error", "mean")).reset_index())
    to_csv_atomic(folds, out / "folds.csv")
    write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    meta |= {"ages": list(space.values), "mode": config.mode,
             "dataset": str(manifest["dataset"].iloc[0]), "input_size": config.input_size,
             "init": str(config.model or f"{config.backbone}:{config.pretrained}"),
             "lopo": config.settings(), "crop": asdict(crop_recipe(config.manifest, zoom))}
    torch_save_atomic({"model": {k: v.cpu() for k, v in final.state_dict().items()},
                       "meta": meta, "epoch": config.epochs - 1, "metrics": summary},
                      out / "model.pt")
    shutil.rmtree(out / FOLDS_DIR)  # only now: every output is written
    return summary, folds
