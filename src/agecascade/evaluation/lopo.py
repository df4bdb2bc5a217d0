"""FG-NET leave-one-person-out (LOPO): one model per held-out subject, all from one checkpoint.

The folds must not cost one full run each. So the crops are resized once and kept on the
training device as one uint8 tensor (batches are tensor indexing, no loader), the checkpoint is
read once, and every fold starts by loading the same starting weights into one network.
In mode a the trunk is frozen, so its features are computed once (plain and mirrored views) and
the heads of many folds train at the same time: one vmapped forward through stacked heads, in
which each fold's loss masks out its own held-out subject. Modes b and c can likewise fine-tune
only the trunk's last blocks (``train_blocks``): the frozen stem then also runs once per image.

Finished folds are kept in ``out/folds/`` with the settings that produced them, so a rerun after
an interruption trains only the folds that are missing.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from agecascade.nets import AgeNet, freeze_features
from agecascade.nets.split import split_trunk
from agecascade.nets.weights import InputSpec
from agecascade.train.data import Augment, LabelSpace, augment_batch, normalise, to_unit
from agecascade.train.engine import adam, autocast

FOLDS_DIR = "folds"


@dataclass(frozen=True)
class LopoConfig:
    mode: str = "b"              # a: frozen trunk, head trained; b, c: fine-tune per fold
    train_blocks: int = 0        # b, c: fine-tune only the trunk's last blocks (0 = all of it)
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 32
    input_size: int = 224
    seed: int = 0
    augment: Augment = field(default_factory=Augment)
    head_params_budget: int = 200_000_000  # mode a: stacked head parameters trained at once

    def __post_init__(self) -> None:
        if self.mode == "a" and self.train_blocks:
            raise ValueError("train_blocks (--train-blocks) is for modes b and c; mode a trains "
                             "the head only")


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
            raise ValueError("leave-one-person-out needs a subject for every image; "
                             f"{int(manifest['subject'].isna().sum())} rows have none")
        ages = manifest["age"].to_numpy(dtype=float)
        chunks = []
        for start in range(0, len(crops), 256):  # resize in pieces: the full-size store can be big
            unit = to_unit(torch.from_numpy(np.array(crops[start:start + 256])), size)
            chunks.append(unit.mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1))
        images = torch.cat(chunks).contiguous()
        return cls(images.to(device), torch.from_numpy(space.encode(ages)).to(device),
                   manifest["subject"].astype(str).to_numpy(), ages)


def settings_key(config: LopoConfig, start: Path | str, manifest: pd.DataFrame) -> str:
    """What a finished fold depends on: resumed folds must come from the same settings.
    ``start``: the starting checkpoint (its content counts) or the name of the weights."""
    digest = hashlib.sha1()
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    start_path = Path(start)
    digest.update(hashlib.sha1(start_path.read_bytes()).digest() if start_path.is_file()
                  else str(start).encode())
    digest.update(pd.util.hash_pandas_object(manifest[["path", "age", "subject"]]).to_numpy())
    return digest.hexdigest()


def _batch(data: FoldData, rows: torch.Tensor, spec: InputSpec, channels_last: bool) -> torch.Tensor:
    return normalise(to_unit(data.images[rows], data.images.shape[1]), spec, channels_last)


@torch.no_grad()
def _probabilities(net: torch.nn.Module, both_views: Callable[[torch.Tensor], torch.Tensor],
                   rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Softmax (len(rows), K), averaged over each image and its mirror image.
    ``both_views(idx)``: (2B, ...), the B inputs of rows ``idx``, then those of their mirrors."""
    net.eval()
    out = []
    for start in range(0, len(rows), 128):
        idx = torch.as_tensor(rows[start:start + 128], device=device)
        with autocast(device):
            logits = net(both_views(idx))
        out.append(logits.float().softmax(1).view(2, len(idx), -1).mean(0))
    return torch.cat(out)


Inputs = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""A training batch for image rows ``idx``, drawn with ``gen``: augmented images, or cached
stem outputs of a random view."""


def train_fold(model: torch.nn.Module, start: dict, inputs: Inputs, labels: torch.Tensor,
               rows: np.ndarray, config: LopoConfig, device: torch.device, seed: int
               ) -> torch.nn.Module:
    """Fine-tune ``model`` from ``start`` on ``rows``: Adam, cosine-decayed LR, random batches.

    There is no validation split inside a fold (it would cost subjects the fold needs), so the
    LR decays to zero over a fixed number of epochs instead of following a plateau.
    """
    model.load_state_dict(start)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adam(params, config.lr)
    steps_per_epoch = max(1, len(rows) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(config.epochs):
        order = rows[torch.randperm(len(rows), generator=gen).numpy()]
        for step in range(steps_per_epoch):  # whole batches only: BatchNorm needs more than one
            idx = torch.as_tensor(order[step * config.batch_size:(step + 1) * config.batch_size],
                                  device=device)
            x = inputs(idx, gen)
            with autocast(device):
                loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model


@torch.no_grad()
def _cached_views(fn: Callable[[torch.Tensor], torch.Tensor], data: FoldData, spec: InputSpec,
                  device: torch.device) -> torch.Tensor:
    """``fn`` (a frozen trunk or stem) of every image, plain and mirrored: (2, N, ...),
    computed once for all epochs and folds."""
    views = [], []
    for start in range(0, len(data.labels), 128):
        idx = torch.arange(start, min(start + 128, len(data.labels)), device=device)
        x = _batch(data, idx, spec, device.type == "cuda")
        with autocast(device):
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
    steps_per_epoch = max(1, n // config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    weights = train_mask.float()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen).to(labels.device)
        view = torch.randint(features.shape[0], (n,), generator=gen).to(labels.device)
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
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
             manifest: pd.DataFrame, crops: np.ndarray, config: LopoConfig, device: torch.device,
             out: Path, key: str, on_fold: Callable[[str, pd.DataFrame], None] | None = None
             ) -> tuple[pd.DataFrame, AgeNet]:
    """Predictions for every image from the fold that held its subject out, and a final model
    trained the same way on every subject (the one to deploy).

    ``start`` is the state every fold begins from; ``key`` names the settings (see
    :func:`settings_key`) so that finished folds of other settings are not reused.
    """
    folds_dir = out / FOLDS_DIR
    stamp = folds_dir / "settings.txt"
    if folds_dir.exists() and (not stamp.exists() or stamp.read_text() != key):
        print(f"{folds_dir} holds folds of other settings: starting over")
        for stale in folds_dir.glob("*.csv"):
            stale.unlink()
    folds_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)

    model = model.to(device, memory_format=torch.channels_last if device.type == "cuda"
                     else torch.contiguous_format)
    data = FoldData.load(manifest, crops, space, config.input_size, device)
    paths = manifest["path"].astype(str).to_numpy()
    subjects = sorted(set(data.subjects))
    fold_file = {s: folds_dir / f"{i:03d}.csv" for i, s in enumerate(subjects)}
    todo = [s for s in subjects if not fold_file[s].exists()]
    if len(todo) < len(subjects):
        print(f"resuming: {len(subjects) - len(todo)} of {len(subjects)} folds already done")

    def finished(subject: str, frame: pd.DataFrame) -> None:
        frame.to_csv(fold_file[subject], index=False)
        if on_fold is not None:
            on_fold(subject, frame)

    if config.mode == "a":
        final = _lopo_heads(model, start, data, spec, space, config, device, todo, paths, finished)
    else:
        final = _lopo_finetune(model, start, data, spec, space, config, device, subjects, todo,
                               paths, finished)
    predictions = pd.concat([pd.read_csv(fold_file[s], dtype={"subject": str}) for s in subjects],
                            ignore_index=True)
    return predictions, final.eval()


def _lopo_finetune(model: AgeNet, start: dict, data: FoldData, spec: InputSpec,
                   space: LabelSpace, config: LopoConfig, device: torch.device,
                   subjects: list[str], todo: list[str], paths: np.ndarray,
                   finished: Callable[[str, pd.DataFrame], None]) -> AgeNet:
    """Modes b and c: each fold fine-tunes from ``start``: the whole network on augmented
    images, or (``config.train_blocks``) only the trunk's last blocks and the head, on the
    frozen stem's outputs of each image and its mirror image, computed once for all folds."""
    channels_last = device.type == "cuda"
    model.load_state_dict(start)
    if config.train_blocks:
        probe = _batch(data, torch.arange(min(8, len(paths)), device=device), spec, channels_last)
        stem, net = split_trunk(model, config.train_blocks, probe)
        views = _cached_views(stem, data, spec, device)                  # (2, N, C, h, w)
        net_start = {k: start[k] for k in net.state_dict()}

        def inputs(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            view = torch.randint(2, (len(idx),), generator=gen).to(device)
            return views[view, idx]

        def both_views(idx: torch.Tensor) -> torch.Tensor:
            return views[:, idx].flatten(0, 1)
    else:
        net, net_start = model, start

        def inputs(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return augment_batch(_batch(data, idx, spec, channels_last), config.augment, gen)

        def both_views(idx: torch.Tensor) -> torch.Tensor:
            x = _batch(data, idx, spec, channels_last)
            return torch.cat([x, x.flip(-1)])

    for subject in todo:
        fold = subjects.index(subject)
        held_out = data.subjects == subject
        train_fold(net, net_start, inputs, data.labels, np.flatnonzero(~held_out), config,
                   device, config.seed * 1_000 + fold)
        rows = np.flatnonzero(held_out)
        frame = _fold_frame(data, rows, _probabilities(net, both_views, rows, device), space, paths)
        finished(subject, frame)
        print(f"fold {fold + 1}/{len(subjects)} ({subject}): "
              f"MAE {(frame['predicted'] - frame['age']).abs().mean():.2f}")
    train_fold(net, net_start, inputs, data.labels, np.arange(len(paths)), config, device,
               config.seed * 1_000 + len(subjects))
    if net is not model:
        model.load_state_dict({**start, **net.state_dict()})
    return model


def _lopo_heads(model: AgeNet, start: dict, data: FoldData, spec: InputSpec, space: LabelSpace,
                config: LopoConfig, device: torch.device, todo: list[str], paths: np.ndarray,
                finished: Callable[[str, pd.DataFrame], None]) -> AgeNet:
    """Mode a: all folds' heads (plus the final all-subject head) in groups that fit memory."""
    model.load_state_dict(start)
    freeze_features(model)
    model.eval()
    features = _cached_views(model.features, data, spec, device)
    head_size = sum(p.numel() for p in model.head.parameters())
    group = max(1, config.head_params_budget // (3 * head_size))  # weights + two Adam moments
    jobs: list[str | None] = [*todo, None]                          # None: the final head
    for first in range(0, len(jobs), group):
        chunk = jobs[first:first + group]
        mask = torch.stack([torch.as_tensor(data.subjects != s if s is not None
                                            else np.ones(len(paths), bool)) for s in chunk])
        heads = train_heads(model.head, features, data.labels, mask.to(device), config,
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
    """The thesis's table 4 columns, plus a 95% interval around the MAE from the errors' spread."""
    errors = (predictions["predicted"] - predictions["age"]).abs()
    fold_mae = errors.groupby(predictions["subject"]).mean()
    half_width = 1.96 * errors.std(ddof=1) / math.sqrt(len(errors)) if len(errors) > 1 else 0.0
    return {"mae": float(errors.mean()), "median_ae": float(errors.median()),
            "fold_mae_lower_quartile": float(fold_mae.quantile(0.25)),
            "fold_mae_median": float(fold_mae.median()),
            "fold_mae_upper_quartile": float(fold_mae.quantile(0.75)),
            "mae_ci95_low": float(errors.mean() - half_width),
            "mae_ci95_high": float(errors.mean() + half_width),
            "n_folds": int(len(fold_mae)), "n_images": int(len(errors)),
            "mean_signed_error": float((predictions["predicted"] - predictions["age"]).mean())}
