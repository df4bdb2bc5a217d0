"""One fine-tuning run, one step of the cascade: the `train` stage's settings and computation.

:func:`run` writes into ``config.out``: model.pt (lowest validation MAE), metrics.json,
history.csv (per-epoch curves for `dvc plots`), and while it runs last.pt, the resume point: a
rerun with the same starting weights, data, code and settings (see :func:`resume_key`) resumes
from it. The caller deletes last.pt (``engine.clear_resume_point``) once it has done its own
work with the results, so a kill before then resumes instead of retraining. Nothing here logs
to an experiment tracker: :func:`run` reports each epoch to the caller's ``on_epoch``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from agecascade.atomic import to_csv_atomic, torch_save_atomic, write_text_atomic
from agecascade.cache import run_key
from agecascade.config import device_option, option
from agecascade.data.store import crop_recipe, load_prepared
from agecascade.errors import MissingInput, UserError
from agecascade.nets import BACKBONES, PRETRAINED, AgeNet, InputSpec, create_model, freeze_features
from agecascade.nets.checkpoint import input_spec
from agecascade.nets.dex import dex_age
from agecascade.train.cascade import MODES, inherited_labels, model_from_init, read_init
from agecascade.train.data import (IMAGENET, LabelSpace, assign_split, balance_weights,
                                   label_space_for, make_loader)
from agecascade.train.degrade import Degrade
from agecascade.train import distributed
from agecascade.train.compute import Compute, choose_compute, precision_option
from agecascade.train.calibration import (
    IDENTITY, MIN_SLOPE, corrected_ages, coverage, fit_bias_line, fit_temperature)
from agecascade.train.engine import TrainConfig, adam, fit, pick_device, predict, scores

# The settings tune.py's best.json chooses (`agecascade train --hparams`).
HPARAMS = ("lr", "batch")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Every setting of the `train` stage and its default (the thesis's); the command line is
    built from it, so a default lives here only."""
    manifest: Path = option(help="a `prepare` output folder")
    backbone: str = option(help=f"{', '.join(BACKBONES)} or any torchvision classification model")
    pretrained: str = option("none", choices=PRETRAINED,
                             help="the backbone's starting weights (without --init)")
    weights: str = option("", help="checkpoint file for --pretrained vggface2")
    init: Path | None = option(None, help="model.pt of the previous cascade stage: it fixes the "
                                          "architecture and the starting weights")
    mode: str = option("b", choices=tuple(MODES),
                       help="; ".join(f"{k}: {v}" for k, v in MODES.items()))
    epochs: int = option(1)
    lr: float = option(1e-3)
    batch: int = option(32, help="training images per step and process (under torchrun the "
                                 "effective batch is this times the process count)")
    scale_lr: bool = option(False, help="under torchrun, multiply --lr by the process count "
                                        "(the linear scaling rule); off: the LR is as given")
    max_train_batches: int = option(0, help="cap batches per epoch (0 = whole epoch)")
    patience: int = option(5, help="halve the LR after this many epochs without a lower "
                                   "validation loss")
    degrade: float = option(0.0, help="probability of each old-photo effect (greyscale or sepia, "
                                      "blur, grain, JPEG) per training image; 0 = the thesis's "
                                      "geometric augmentation only")
    blur_sigma: float = option(Degrade.max_blur_sigma,
                               help="the strongest blur --degrade draws: a Gaussian sigma in "
                                    "pixels of a 112-pixel face, scaled with the input size "
                                    "(docs/zero-shot.md, item 21)")
    label_sigma: float = option(0.0, help="train on a Gaussian of this many years around each "
                                          "age instead of one class (0 = the thesis's one-hot "
                                          "cross-entropy)")
    mean_variance: float = option(0.0, help="add this weight x (half the squared error of the "
                                            "predicted mean + a quarter of the predicted "
                                            "variance, in years) to the loss: Pan et al.'s "
                                            "mean-variance loss (0 = off, as in the thesis)")
    ema: float = option(0.0, help="keep and validate an exponential moving average of the "
                                  "weights with this decay per step (0 = the weights as "
                                  "trained, as in the thesis)")
    balance: float = option(0.0, help="sample training images with weight (images of their "
                                      "age) ** -BALANCE: 0 = every image alike (the thesis), "
                                      "1 = every age alike")
    input_size: int = option(224, help="network input side in pixels")
    val_fraction: float = option(0.2, help="share of the subjects kept for validation")
    test_fraction: float = option(0.0, help="share of the subjects held out from training and "
                                            "validation, scored at the end")
    max_images: int = option(0, help="train on a seeded subsample of this many images (0 = all)")
    seed: int = option(0)
    workers: int = option(0, help="data-loader processes")
    device: str = device_option()
    precision: str = precision_option()
    compile: bool = option(False, help="run the training steps through torch.compile (opt-in: "
                                       "it compiles for minutes first; see the README's "
                                       "Benchmark)")
    out: Path = option(help="folder of model.pt, metrics.json and history.csv")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"--mode {self.mode!r}: use one of {tuple(MODES)}")
        if self.pretrained not in PRETRAINED:
            raise UserError(f"--pretrained {self.pretrained!r}: use one of {PRETRAINED}")
        if self.init is None and (self.pretrained == "vggface2") != bool(self.weights):
            raise UserError("--weights goes with --pretrained vggface2, and only with it "
                            f"(got --pretrained {self.pretrained}, --weights {self.weights!r})")
        if min(self.epochs, self.batch, self.input_size) < 1 or not self.lr > 0:
            raise UserError(f"--epochs, --batch and --input-size must be >= 1 and --lr > 0 (got "
                            f"{self.epochs}, {self.batch}, {self.input_size}, {self.lr:g})")
        if min(self.max_train_batches, self.patience, self.max_images, self.workers) < 0:
            raise UserError("--max-train-batches, --patience, --max-images and --workers must "
                            "be >= 0")
        if self.label_sigma < 0:
            raise UserError(f"--label-sigma {self.label_sigma:g}: years, >= 0")
        if self.mean_variance < 0:
            raise UserError(f"--mean-variance {self.mean_variance:g}: a weight, >= 0")
        if not 0 <= self.ema < 1:
            raise UserError(f"--ema {self.ema:g}: a decay per step, >= 0 and < 1")
        if not 0 <= self.balance <= 1:
            raise UserError(f"--balance {self.balance:g}: between 0 and 1")
        if not 0 <= self.degrade <= 1:
            raise UserError(f"--degrade {self.degrade:g}: a probability, between 0 and 1")
        if self.blur_sigma < Degrade.min_blur_sigma:
            raise UserError(f"--blur-sigma {self.blur_sigma:g}: pixels, >= "
                            f"{Degrade.min_blur_sigma:g} (the weakest blur drawn)")
        if not (0 < self.val_fraction and 0 <= self.test_fraction
                and self.val_fraction + self.test_fraction < 1):
            raise UserError(f"--val-fraction {self.val_fraction:g} and --test-fraction "
                            f"{self.test_fraction:g}: the first > 0, the second >= 0, and "
                            "together < 1 so that some subjects are left to train on")


def read_hparams(path: Path) -> dict:
    """The settings a grid chose (its best.json), as config fields: {"lr": ..., "batch": ...}."""
    if not Path(path).is_file():
        raise MissingInput(f"--hparams {path}: no such file; run `agecascade tune` first")
    chosen = json.loads(Path(path).read_text())
    missing = [name for name in HPARAMS if name not in chosen]
    if missing:
        raise UserError(f"--hparams {path}: lacks {missing}; not a best.json of `agecascade tune`")
    return {"lr": float(chosen["lr"]), "batch": int(chosen["batch"])}


# Settings that change no result: the places of files (their content counts instead, see
# resume_key), the loader's processes and the device's name (its type counts).
NOT_RESULT_SHAPING = ("manifest", "init", "weights", "out", "workers", "device")


def resume_key(config: FinetuneConfig, init: dict | None, device: torch.device,
               world_size: int = 1) -> str:
    """What decides whether ``out/last.pt`` may be resumed, by content: the --init checkpoint's
    tensors (not its path), else the pretrained weights; the crop store; the code; the device
    type; the process count (it sets the effective batch); and every setting that changes a
    result."""
    settings = {k: v for k, v in asdict(config).items() if k not in NOT_RESULT_SHAPING}
    settings["world_size"] = world_size
    return run_key(settings, config.manifest, device.type, init, config.pretrained,
                   config.weights)


@dataclass(frozen=True)
class Start:
    """What a run starts from, read once, so that the caller can log ``key`` before training."""
    init: dict | None        # the --init checkpoint as read_init returns it
    device: torch.device     # this process's
    key: str                 # resume_key
    world: distributed.World = distributed.World()


def starting_point(config: FinetuneConfig, alone: bool = False) -> Start:
    """Read the --init checkpoint and pick the device; under torchrun, join the process group
    (this process's GPU on CUDA), unless ``alone``: then this process trains by itself, on its
    own GPU (a `tune` worker's trial)."""
    init = read_init(config.init) if config.init else None
    if alone:
        world = distributed.World()
        device = distributed.own_device(pick_device(config.device), shared=True)
    else:
        world, device = distributed.join(pick_device(config.device))
    return Start(init, device, resume_key(config, init, device, world.size), world)


def loop_config(config: FinetuneConfig, lr: float, spec: InputSpec) -> TrainConfig:
    """The training loop's settings from the stage's: every recipe choice reaches the loop here."""
    return TrainConfig(epochs=config.epochs, lr=lr, batch_size=config.batch,
                       patience=config.patience, input_size=config.input_size, seed=config.seed,
                       max_train_batches=config.max_train_batches, input_spec=spec,
                       degrade=Degrade.each(config.degrade, config.blur_sigma),
                       label_sigma=config.label_sigma,
                       ema=config.ema, mean_variance=config.mean_variance,
                       compile=config.compile)


def run(config: FinetuneConfig, on_epoch: Callable[[int, dict], None] | None = None,
        start: Start | None = None) -> tuple[dict, AgeNet]:
    """Train as ``config`` says; return the summary (metrics.json) and the model holding the
    kept weights. ``start``: :func:`starting_point` of this config, if the caller has it."""
    start = start or starting_point(config)
    init, device, world = start.init, start.device, start.world
    lr = config.lr * world.size if config.scale_lr else config.lr
    if world.size > 1 and world.main:
        print(f"world size {world.size}: effective batch {world.size * config.batch} "
              f"({world.size} processes x {config.batch}), lr {lr:g}" +
              (" (--scale-lr)" if config.scale_lr else " (as given; --scale-lr multiplies it "
                                                        f"by {world.size})"))
    manifest, crops = load_prepared(config.manifest)
    if config.max_images and len(manifest) > config.max_images:
        keep = np.sort(np.random.default_rng(config.seed).choice(len(manifest), config.max_images,
                                                                 replace=False))
        manifest, crops = manifest.iloc[keep].reset_index(drop=True), crops[keep]
    space = label_space_for(manifest)
    if init is not None:
        space = inherited_labels(init, space)
    labels = space.encode(manifest["age"].to_numpy(dtype=float))
    split = assign_split(manifest, config.val_fraction, config.test_fraction, config.seed)
    rows = {part: np.flatnonzero(split == part) for part in ("train", "val", "test")}
    if len(rows["train"]) == 0 or len(rows["val"]) == 0:
        raise UserError(f"{config.manifest}: split left {len(rows['train'])} training and "
                        f"{len(rows['val'])} validation images; use more data")

    torch.manual_seed(config.seed)  # fresh layers (the output layer at least) start alike every run
    if init is not None:  # the previous stage fixes the architecture and the pixel convention
        model, spec, fresh = model_from_init(init, space.values)
        if world.main:
            print(f"initialised from {config.init}; re-initialised: {', '.join(fresh) or 'nothing'}")
    else:
        model = create_model(config.backbone, space.size, config.pretrained,
                             Path(config.weights) if config.weights else None)
        spec = model.load_report.input_spec if model.load_report else IMAGENET
    if config.mode == "a":
        freeze_features(model)
    compute = choose_compute(device, model.arch, config.precision)
    if world.main:
        print(f"computing on {compute.describe()}")
    model = model.to(device, memory_format=compute.memory_format)
    loop = loop_config(config, lr, spec)
    optimizer = adam([p for p in model.parameters() if p.requires_grad], lr)
    pin = device.type == "cuda"
    weights = balance_weights(labels[rows["train"]], config.balance) if config.balance else None
    train_loader = make_loader(crops, labels, rows["train"], config.batch, True, config.seed,
                               config.workers, pin, weights, world)
    val_loader = make_loader(crops, labels, rows["val"], max(config.batch, 64), False,
                             config.seed, config.workers, pin, world=world)
    ages = space.tensor(device)
    meta = {"backbone": config.backbone, "arch": model.arch, "input_spec": asdict(spec),
            "pretrained": config.pretrained, "mode": config.mode,
            "dataset": str(manifest["dataset"].iloc[0]), "ages": list(space.values),
            "input_size": config.input_size, "init": str(config.init or ""), "seed": config.seed,
            "val_fraction": config.val_fraction, "test_fraction": config.test_fraction,
            "world_size": world.size,
            "crop": asdict(crop_recipe(config.manifest, loop.augment.mean_zoom))}
    history = fit(model, train_loader, val_loader, ages, optimizer, loop, compute, config.out,
                  meta, on_epoch, start.key, world)
    if not world.main:  # rank 0 scores the kept weights and writes the summary
        return {}, model
    return finish(config, model, history, crops, labels, rows, ages, compute, space), model


def finish(config: FinetuneConfig, model: AgeNet, history: list[dict], crops: np.ndarray,
           labels: np.ndarray, rows: dict[str, np.ndarray], ages: torch.Tensor,
           compute: Compute, space: LabelSpace) -> dict:
    """Score the kept (lowest val MAE) weights; fit the interval's temperature and the
    age-bias line on the validation split (calibration.py) and store them in model.pt; write
    metrics.json and history.csv. test_mae is the network's own DEX age (what the thesis
    reports); test_mae_bias_corrected and the coverages are of the ages `predict` gives."""
    best = torch.load(config.out / "model.pt", map_location=compute.device, weights_only=True)
    model.load_state_dict(best["model"])
    values = np.asarray(space.values)
    median = np.median(values[labels[rows["train"]]])
    summary = {"best_epoch": best["epoch"] + 1, "epochs": len(history),
               "val_mae_median_baseline": float(np.abs(values[labels[rows["val"]]] - median).mean())}
    kept = best["metrics"]  # the kept epoch's validation scores, measured in fit
    summary |= {"val_loss": kept["val_loss"], "val_mae": kept["val_mae"],
                "n_val": int(len(rows["val"]))}

    def scored(part: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loader = make_loader(crops, labels, rows[part], 64, False, 0, 0, False)
        return predict(model, loader, compute, config.input_size, ages, input_spec(best["meta"]))

    val_logits, val_labels, val_predicted = scored("val")
    val_truth = values[val_labels.numpy()]
    temperature = fit_temperature(val_logits, val_labels)
    line = fit_bias_line(val_predicted.numpy(), val_truth)
    if line == IDENTITY:
        print("the validation ages fit no line with a slope of at least "
              f"{MIN_SLOPE}: predict reads this model's ages without a bias correction")
    best["meta"] |= {"temperature": temperature, "bias_line": list(line)}
    torch_save_atomic(best, config.out / "model.pt")
    read = corrected_ages(values, line)
    summary |= {"temperature": temperature, "bias_slope": line[0], "bias_intercept": line[1],
                "val_coverage": coverage(val_logits, val_truth, read, temperature)}
    if len(rows["test"]):
        logits, test_labels, predicted = scored("test")
        test_loss, test_mae = scores(logits, test_labels, predicted, ages)
        test_truth = values[test_labels.numpy()]
        corrected = dex_age(logits, torch.from_numpy(read)).numpy()
        summary |= {"test_loss": test_loss, "test_mae": test_mae,
                    "test_mae_bias_corrected": float(np.abs(corrected - test_truth).mean()),
                    "test_coverage": coverage(logits, test_truth, read, temperature),
                    "n_test": int(len(rows["test"]))}
    write_text_atomic(config.out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    to_csv_atomic(pd.DataFrame(history), config.out / "history.csv")
    return summary
