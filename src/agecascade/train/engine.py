"""The epoch loop in the torchvision-references manner: `train_one_epoch`, `evaluate`, `fit`.

`fit` writes ``last.pt`` after every epoch, the last one included: the optimiser, scheduler and
RNG state, the history, and the best weights so far with their epoch and scores. ``dvc repro``
deletes a stage's outs (``model.pt``) before it reruns the stage, but ``last.pt`` is no out, so a
run killed at any moment resumes from its last finished epoch and restores ``model.pt`` from it.
The caller deletes ``last.pt`` (:func:`clear_resume_point`) once its own outputs are written.
All randomness is drawn from generators seeded by (seed, epoch) plus the saved global torch RNG
state, so on the CPU a resumed run ends with exactly the metrics of an uninterrupted one.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from agecascade.atomic import torch_save_atomic
from agecascade.cache import fingerprint
from agecascade.errors import UserError
from agecascade.nets.weights import InputSpec

from . import distributed
from .compute import Compute
from .data import IMAGENET, Augment, augment_batch, normalise, to_input, to_unit
from .degrade import Degrade, degrade_batch


@dataclass(kw_only=True)
class TrainConfig:
    """What the epoch loop needs. The settings a user chooses have no default here: each
    caller's config holds them (``FinetuneConfig`` for `train`), so a default lives in one place.
    The rest default to the thesis's augmentation, and no old-photo effects or batch cap."""
    epochs: int
    lr: float
    batch_size: int
    patience: int                # ReduceLROnPlateau: halve the LR after this many flat epochs
    input_size: int
    seed: int
    augment: Augment = field(default_factory=Augment)
    degrade: Degrade = field(default_factory=Degrade)  # old-photo looks; off in the thesis
    label_sigma: float = 0.0     # > 0: train on a Gaussian of this many years around the age
    input_spec: InputSpec = IMAGENET  # pixel convention of the pretrained weights
    max_train_batches: int = 0   # 0 = whole epoch; the grid may cap trial cost with it
    ema: float = 0.0             # > 0: validate and keep a moving average of the weights
    mean_variance: float = 0.0   # > 0: add this weight x mean_variance_penalty to the loss
    compile: bool = False        # torch.compile the network the training steps call


def mean_variance_penalty(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pan et al.'s mean-variance loss (CVPR 2018) in class steps (years in a one-year label
    space), (B, K) logits and (B,) class indices -> a scalar: half the squared error of the
    predicted distribution's mean plus a quarter of its variance (their weights 0.2 and 0.05,
    over a common 0.2). Cross-entropy alone never asks the DEX expected value to be right, and
    lets the distribution stay wide."""
    probs = logits.float().softmax(dim=1)
    k = torch.arange(probs.shape[1], device=probs.device, dtype=probs.dtype)
    mean = probs @ k                                   # (B,)
    variance = probs @ k ** 2 - mean ** 2              # (B,)
    return (0.5 * (mean - labels.float()) ** 2 + 0.25 * variance).mean()


def adam(params, lr: float) -> torch.optim.Adam:
    """The thesis's optimiser, with the fused kernel (CPU and CUDA): many times cheaper per step
    than the for-each one on the CPU, where the demo trains (see the README for figures)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError as err:  # torch's message names the device types it knows
        raise UserError(f"--device {name}: {err}") from None


def age_distribution(labels: torch.Tensor, classes: int, sigma: float) -> torch.Tensor:
    """(B,) class indices -> (B, classes) soft targets: a Gaussian of ``sigma`` classes (years)
    around each label, renormalised over the label space. Unlike one-hot cross-entropy it
    tells the network that a one-year miss is nearly right (label-distribution learning)."""
    k = torch.arange(classes, device=labels.device, dtype=torch.float32)
    weights = torch.exp(-0.5 * ((k[None, :] - labels[:, None].float()) / sigma) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, updated
    after every step, in a copy of the model that can be evaluated and saved like it.

    Why: the weights of one epoch of a small-data fine-tune are a noisy point; their average
    sits in a flatter region that transfers better to photos unlike the training set (SWAD,
    Cha et al. 2021; "ensemble of averages", Arpit et al. 2022). The decay warms up as
    ``(1 + step) / (10 + step)``, so the first steps do not tie the average to the starting
    weights for long."""

    def __init__(self, model: nn.Module, decay: float):
        """``model``: the bare model being trained, which :meth:`update` follows."""
        self.decay, self.steps = decay, 0
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        # state_dict tensors share storage with the modules, and optimizer steps and
        # load_state_dict change them in place: paired once, they stay paired
        live, mine = model.state_dict(), self.module.state_dict()
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        self._floats = ([mine[k] for k in floats], [live[k] for k in floats])
        self._counts = [(mine[k], live[k]) for k, v in mine.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the trained model's weights, after a step."""
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(*self._floats, 1.0 - decay)
        for mine, live in self._counts:  # BatchNorm's batch counters: copied, not averaged
            mine.copy_(live)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.steps = state["steps"]


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    compute: Compute, config: TrainConfig, epoch: int,
                    world: distributed.World = distributed.World(),
                    average: WeightAverage | None = None) -> dict[str, float]:
    """One pass over ``loader``. The loss is summed on the device and read once at the end: a
    ``.item()`` per step would make the host wait for every step on a GPU.
    ``data_wait_fraction``: the share of the epoch the loop spent waiting for its next batch
    (near 0 when the loader keeps up with the device). Under torchrun
    ``model`` is the DDP wrapper, and each process draws its own augmentation (rank 0 draws
    what one process would). ``average``, if given, follows the weights after every step."""
    model.train()
    device = compute.device
    gen = torch.Generator().manual_seed(config.seed * 7_919 + epoch + 1_000_003 * world.rank)
    total = torch.zeros((), device=device)
    seen, waited, start = 0, 0.0, time.perf_counter()
    asked = start
    # islice, not a break: a break would fetch (and wait for) one batch past the limit
    for images, labels in islice(loader, config.max_train_batches or None):
        waited += time.perf_counter() - asked  # the host blocked on the loader, not the device
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = to_unit(images, config.input_size)
        if config.degrade.active:
            x = degrade_batch(x, config.degrade, gen)
        x = augment_batch(normalise(x, config.input_spec, compute.nhwc), config.augment, gen)
        with compute.autocast():
            logits = model(x)
        target = age_distribution(labels, logits.shape[1], config.label_sigma) \
            if config.label_sigma > 0 else labels
        loss = F.cross_entropy(logits.float(), target)
        if config.mean_variance > 0:
            loss = loss + config.mean_variance * mean_variance_penalty(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if average is not None:
            average.update()
        total += loss.detach() * len(labels)
        seen += len(labels)
        asked = time.perf_counter()
    if seen == 0:
        raise UserError("the training split is empty")
    # the one host sync of the epoch, before the clock stops; summed over the processes
    total, seen = distributed.all_sum(torch.stack([total.float(), total.new_tensor(float(seen))]),
                                      world)
    train_loss, elapsed = (total / seen).item(), time.perf_counter() - start
    return {"train_loss": train_loss, "train_images_per_s": seen.item() / elapsed,
            "data_wait_fraction": waited / elapsed}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, compute: Compute, input_size: int,
            ages: torch.Tensor, spec: InputSpec = IMAGENET
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N,K) float32, labels (N,), DEX ages (N,)) over a loader, in loader order."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        x = to_input(images.to(compute.device, non_blocking=True), input_size, compute.nhwc, spec)
        with compute.autocast():
            logits = model(x)
        all_logits.append(logits.float().cpu())
        all_labels.append(labels)
    if not all_logits:  # under torchrun a process can have no rows of a small split
        all_logits, all_labels = [torch.empty(0, len(ages))], [torch.empty(0, dtype=torch.long)]
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    return logits, labels, logits.softmax(dim=1) @ ages.cpu()


def scores(logits: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor,
           ages: torch.Tensor, world: distributed.World = distributed.World()
           ) -> tuple[float, float]:
    """(mean cross-entropy, MAE) of :func:`predict`'s outputs over every process of ``world``
    (each passes the outputs of its share)."""
    loss, error, count = distributed.all_sum(torch.stack([
        F.cross_entropy(logits, labels, reduction="sum"),
        (predicted - ages.cpu()[labels]).abs().sum(), torch.tensor(float(len(labels)))]), world)
    return (loss / count).item(), (error / count).item()


def evaluate(model: nn.Module, loader: DataLoader, compute: Compute, input_size: int,
             ages: torch.Tensor, spec: InputSpec = IMAGENET,
             world: distributed.World = distributed.World()) -> dict[str, float]:
    """Mean loss and MAE over the loader's rows, of every process of ``world`` (each passes
    the loader of its share)."""
    loss, mae = scores(*predict(model, loader, compute, input_size, ages, spec), ages, world)
    return {"val_loss": loss, "val_mae": mae}


LAST, BEST = "last.pt", "model.pt"


def clear_resume_point(out: Path) -> None:
    """Delete ``out/last.pt``: call it once every output that marks the run finished is written
    (earlier, a kill would leave neither the outputs nor a point to resume from)."""
    (out / LAST).unlink(missing_ok=True)


# Varies from run to run: kept out of model.pt, so the same training writes the same bytes and
# DVC sees no change in the stages that read it (history.csv and MLflow keep it).
TIMINGS = ("train_images_per_s", "data_wait_fraction")


def _save_best(out: Path, best: dict, meta: dict) -> None:
    scores = {k: v for k, v in best["metrics"].items() if k not in TIMINGS}
    # a plain dict whether the weights are live (an OrderedDict) or a copy: the same bytes
    torch_save_atomic({"model": dict(best["model"]), "meta": meta, "epoch": best["epoch"],
                       "metrics": scores}, out / BEST)


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, ages: torch.Tensor,
        optimizer: torch.optim.Optimizer, config: TrainConfig, compute: Compute, out: Path,
        meta: dict, on_epoch: Callable[[int, dict], None] | None = None,
        key: str | None = None, world: distributed.World = distributed.World()) -> list[dict]:
    """Train ``config.epochs`` epochs; keep the lowest-val-MAE weights in ``out/model.pt``.

    The LR schedule follows the validation loss, as in the thesis; the kept model follows the
    validation MAE, the number the thesis reports (cross-entropy over one class per year
    punishes a one-year miss as hard as a fifty-year one).

    ``meta`` (primitives only) is stored in every checkpoint so a model file says what it is.
    ``key`` decides whether an existing ``out/last.pt`` may be resumed: a fingerprint of the
    content the run depends on (starting weights, data, code, settings); without one, ``meta``
    and ``config`` decide. ``on_epoch`` sees the epochs trained in this call only.
    Under torchrun (``world``: this process's place) every process trains (through DDP) and
    evaluates its share; rank 0 alone writes files, prints and calls ``on_epoch``.
    With ``config.ema`` the moving average of the weights (:class:`WeightAverage`) is what is
    validated and kept in ``out/model.pt``; the raw weights only train.
    Returns the per-epoch history, restored epochs included.
    """
    writer = world.main
    out.mkdir(parents=True, exist_ok=True)
    key = key or fingerprint(meta=meta, config=config)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5,
                                                           patience=config.patience)
    average = WeightAverage(model, config.ema) if config.ema else None
    history: list[dict] = []
    start_epoch, best = 0, None
    state = torch.load(out / LAST, map_location=compute.device, weights_only=True) \
        if (out / LAST).exists() else None
    if state is not None and state.get("key") != key:
        print(f"{out / LAST} is from other weights, data, code or settings: training afresh")
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if average is not None:
            average.load_state_dict(state["average"])
        torch.set_rng_state(state["torch_rng"])
        history, start_epoch, best = state["history"], state["epoch"] + 1, state["best"]
        if writer:
            _save_best(out, best, meta)  # dvc repro deleted model.pt before rerunning the stage
            print(f"resuming from epoch {start_epoch} of {config.epochs} ({out / LAST})")

    trained = distributed.wrap(model, compute.device, world)
    if config.compile:  # the steps only: evaluation and state dicts use the plain module
        trained = torch.compile(trained)
    for epoch in range(start_epoch, config.epochs):
        train_loader.sampler.set_epoch(epoch)
        metrics = train_one_epoch(trained, train_loader, optimizer, compute, config, epoch, world,
                                  average)
        scored = average.module if average is not None else model
        metrics |= evaluate(scored, val_loader, compute, config.input_size, ages, config.input_spec,
                            world)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        scheduler.step(metrics["val_loss"])
        history.append({"epoch": epoch + 1, **metrics})
        live = model.state_dict()
        weights = live if scored is model else scored.state_dict()
        improved = best is None or metrics["val_mae"] < best["metrics"]["val_mae"]
        if improved:
            # the live tensors: torch.save stores tensors shared within one file once, so
            # last.pt holds these weights once although they are both "model" and "best"
            best = {"model": weights, "epoch": epoch, "metrics": metrics}
        if writer:
            if improved:
                _save_best(out, best, meta)
            torch_save_atomic({"model": live, "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(),
                               "torch_rng": torch.get_rng_state(), "epoch": epoch,
                               "history": history, "best": best, "key": key,
                               **({"average": average.state_dict()} if average else {})},
                              out / LAST)
            print(f"epoch {epoch + 1}/{config.epochs}  " + "  ".join(
                f"{k} {v:.4g}" for k, v in metrics.items()))
            if on_epoch is not None:
                on_epoch(epoch + 1, metrics)
        if improved:  # the next epochs change the live tensors: keep a copy of the best ones
            best = {**best, "model": {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}}
    return history
