"""Stage `train`: fine-tune one backbone on one prepared dataset (one step of the cascade).

Writes into OUT: model.pt (lowest validation MAE), last.pt (resume point), metrics.json,
history.csv (per-epoch curves for `dvc plots`). Tracked in MLflow unless --no-track.
"""
from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from agecascade.data.store import MANIFEST, load_prepared
from agecascade.nets import BACKBONES, create_model, freeze_features
from agecascade.nets.checkpoint import input_spec
from agecascade.train.cascade import inherited_labels, model_from_init, read_init
from agecascade.train.data import IMAGENET, LabelSpace, assign_split, make_loader
from agecascade.train.degrade import Degrade
from agecascade.train.engine import TrainConfig, adam, evaluate, fit, pick_device

MODES = {"a": "frozen backbone, classifier layers trained",
         "b": "full fine-tune (IMDB -> target)",
         "c": "full fine-tune (IMDB -> AgeDB -> target)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, required=True, help="a `prepare` output folder")
    parser.add_argument("--backbone", required=True,
                        help=f"{', '.join(BACKBONES)} or any torchvision classification model")
    parser.add_argument("--pretrained", choices=["none", "imagenet", "vggface2"], default="none")
    parser.add_argument("--weights", default="", help="checkpoint file for --pretrained vggface2")
    parser.add_argument("--init", type=Path, help="model.pt of the previous cascade stage")
    parser.add_argument("--mode", choices=sorted(MODES), default="b",
                        help="; ".join(f"{k}: {v}" for k, v in MODES.items()))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hparams", type=Path, help="best.json of `agecascade tune`: sets lr, batch")
    parser.add_argument("--max-train-batches", type=int, default=0,
                        help="cap batches per epoch (0 = whole epoch)")
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--degrade", type=float, default=0.0,
                        help="probability of each old-photo effect (greyscale or sepia, blur, JPEG) "
                             "per training image; 0 = the thesis's geometric augmentation only")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--test-fraction", type=float, default=0.0,
                        help="held out from training and validation, scored at the end")
    parser.add_argument("--max-images", type=int, default=0, help="subsample (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="data-loader processes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", default="train", help="MLflow experiment (one per stage)")
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def label_space_for(manifest) -> LabelSpace:
    ages = manifest["age"].astype(float)
    if ages.isna().any():
        raise ValueError("this stage trains on ages; the manifest has rows without one")
    return LabelSpace.from_ages(ages)


def run(args: argparse.Namespace, on_epoch=None) -> tuple[dict, torch.nn.Module]:
    """Train as ``args`` says; return the summary and the model holding the kept weights."""
    if args.hparams:
        chosen = json.loads(args.hparams.read_text())
        args.lr, args.batch = float(chosen["lr"]), int(chosen["batch"])
        print(f"lr {args.lr:g} and batch {args.batch} from {args.hparams}")
    device = pick_device(args.device)
    manifest, crops = load_prepared(args.manifest)
    if args.max_images and len(manifest) > args.max_images:
        keep = np.sort(np.random.default_rng(args.seed).choice(len(manifest), args.max_images,
                                                               replace=False))
        manifest, crops = manifest.iloc[keep].reset_index(drop=True), crops[keep]
    init = read_init(args.init) if args.init else None
    space = label_space_for(manifest)
    if init is not None:
        space = inherited_labels(init, space)
    labels = space.encode(manifest["age"].to_numpy(dtype=float))
    split = assign_split(manifest, args.val_fraction, args.test_fraction, args.seed)
    rows = {part: np.flatnonzero(split == part) for part in ("train", "val", "test")}
    if len(rows["train"]) == 0 or len(rows["val"]) == 0:
        raise ValueError(f"{args.manifest}: split left {len(rows['train'])} training and "
                         f"{len(rows['val'])} validation images; use more data")

    torch.manual_seed(args.seed)  # fresh layers (the output layer at least) start the same every run
    if init is not None:  # the previous stage fixes the architecture and the pixel convention
        model, spec, fresh = model_from_init(init, space.values)
        print(f"initialised from {args.init}; re-initialised: {', '.join(fresh) or 'nothing'}")
    else:
        model = create_model(args.backbone, space.size, args.pretrained,
                             Path(args.weights) if args.weights else None)
        spec = model.load_report.input_spec if model.load_report else IMAGENET
    if args.mode == "a":
        freeze_features(model)
    model = model.to(device, memory_format=torch.channels_last if device.type == "cuda"
                     else torch.contiguous_format)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch,
                         patience=args.patience, input_size=args.input_size, seed=args.seed,
                         max_train_batches=args.max_train_batches, input_spec=spec,
                         degrade=Degrade.each(args.degrade))
    optimizer = adam([p for p in model.parameters() if p.requires_grad], args.lr)
    pin = device.type == "cuda"
    train_loader = make_loader(crops, labels, rows["train"], args.batch, True, args.seed,
                               args.workers, pin)
    val_loader = make_loader(crops, labels, rows["val"], max(args.batch, 64), False, args.seed,
                             args.workers, pin)
    ages = space.tensor(device)
    meta = {"backbone": args.backbone, "arch": model.arch, "input_spec": asdict(spec),
            "pretrained": args.pretrained, "mode": args.mode,
            "dataset": str(manifest["dataset"].iloc[0]), "ages": list(space.values),
            "input_size": args.input_size, "init": str(args.init or ""), "seed": args.seed,
            "val_fraction": args.val_fraction, "test_fraction": args.test_fraction}
    history = fit(model, train_loader, val_loader, ages, optimizer, config, device, args.out,
                  meta, on_epoch)
    return finish(args, model, history, crops, labels, rows, ages, device, space), model


def main(args: argparse.Namespace) -> int:
    if args.no_track:
        summary, _ = run(args)
    else:
        from agecascade import tracking

        dataset = pd.read_parquet(args.manifest / MANIFEST, columns=["dataset"])["dataset"].iloc[0]
        tags = {"backbone": args.backbone, "stage": args.stage, "mode": args.mode,
                "dataset": str(dataset), "pretrained": args.pretrained}
        params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if k not in ("run", "command", "no_track")}
        with tracking.tracked_run(args.stage, f"{args.backbone}-{dataset}", args.out, tags, params):
            summary, model = run(args, tracking.log_epoch)
            tracking.log_final(summary, args.out, model, args.input_size)
    print(json.dumps(summary, indent=2))
    return 0


def finish(args, model, history, crops, labels, rows, ages, device, space) -> dict:
    """Score the kept (lowest val MAE) weights; write metrics.json and history.csv."""
    best = torch.load(args.out / "model.pt", map_location=device, weights_only=True)
    model.load_state_dict(best["model"])
    values = np.asarray(space.values)
    median = np.median(values[labels[rows["train"]]])
    summary = {"best_epoch": best["epoch"] + 1, "epochs": len(history),
               "val_mae_median_baseline": float(np.abs(values[labels[rows["val"]]] - median).mean())}
    kept = best["metrics"]  # the kept epoch's validation scores, measured in fit
    summary |= {"val_loss": kept["val_loss"], "val_mae": kept["val_mae"],
                "n_val": int(len(rows["val"]))}
    if len(rows["test"]):
        loader = make_loader(crops, labels, rows["test"], 64, False, 0, 0, False)
        scores = evaluate(model, loader, device, args.input_size, ages,
                          input_spec(best["meta"]))
        summary |= {"test_loss": scores["val_loss"], "test_mae": scores["val_mae"],
                    "n_test": int(len(rows["test"]))}
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (args.out / "history.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    return summary
