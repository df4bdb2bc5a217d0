"""Stage `lopo`: FG-NET leave-one-person-out from one cascade checkpoint, in mode a, b or c.

Writes into OUT: predictions.csv (every image, predicted by the fold that held its subject
out), folds.csv (MAE per subject, for `dvc plots`), metrics.json (table 4's columns), and
model.pt: the same recipe trained on every subject, the model the registry deploys.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from agecascade.data.store import load_prepared
from agecascade.evaluation.lopo import FOLDS_DIR, LopoConfig, run_lopo, settings_key, summarise
from agecascade.nets import PRETRAINED, create_model
from agecascade.pipelines.train import MODES, label_space_for
from agecascade.train.data import IMAGENET
from agecascade.train.cascade import inherited_labels, model_from_init, read_init
from agecascade.train.engine import pick_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, required=True, help="a prepared FG-NET-style folder")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--model", type=Path,
                       help="the checkpoint every fold starts from (mode b: after IMDB; c: after AgeDB)")
    start.add_argument("--backbone", help="start from a backbone's pretrained weights instead "
                       "(the thesis's mode a: the face-recognition network, no age training)")
    parser.add_argument("--pretrained", choices=PRETRAINED, default="none",
                        help="with --backbone: the weights' source")
    parser.add_argument("--weights", default="", help="with --backbone: checkpoint file")
    parser.add_argument("--mode", choices=sorted(MODES), required=True,
                        help="a: frozen trunk, only the head trains; b, c: fine-tune per fold")
    parser.add_argument("--train-blocks", type=int, default=0,
                        help="modes b, c: fine-tune only the trunk's last N blocks with weights, "
                             "and the head; the frozen rest runs once per image (0 = everything)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=0, help="0 = the checkpoint's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", default="fgnet_lopo", help="MLflow experiment")
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def run(args: argparse.Namespace, on_fold=None) -> tuple[dict, pd.DataFrame]:
    device = pick_device(args.device)
    manifest, crops = load_prepared(args.manifest)
    space = label_space_for(manifest)
    torch.manual_seed(args.seed)  # a fresh output layer starts the same in every run and fold
    if args.model:
        init = read_init(args.model)
        space = inherited_labels(init, space)
        model, spec, fresh = model_from_init(init, space.values)
        print(f"{args.model}: {model.arch}, re-initialised: {', '.join(fresh) or 'nothing'}")
        meta = init["meta"]
    else:
        model = create_model(args.backbone, space.size, args.pretrained,
                             Path(args.weights) if args.weights else None)
        spec = model.load_report.input_spec if model.load_report else IMAGENET
        meta = {"backbone": args.backbone, "arch": model.arch, "input_spec": asdict(spec),
                "pretrained": args.pretrained, "seed": args.seed}
    if not (args.input_size or meta.get("input_size")):
        raise ValueError("--input-size is needed when starting from a backbone's weights")
    config = LopoConfig(mode=args.mode, train_blocks=args.train_blocks, epochs=args.epochs,
                        lr=args.lr, batch_size=args.batch,
                        input_size=args.input_size or int(meta["input_size"]), seed=args.seed)
    # a copy: state_dict() shares storage with the live weights, and every fold must start from
    # these, not from the previous fold's model (which saw this fold's subject)
    start = {k: v.detach().clone().to(device) for k, v in model.state_dict().items()}
    args.out.mkdir(parents=True, exist_ok=True)
    key = settings_key(config, args.model or args.weights or args.backbone, manifest)
    predictions, final = run_lopo(model, start, spec, space, manifest, crops, config, device,
                                  args.out, key, on_fold)

    summary = summarise(predictions) | {"mode": args.mode, "backbone": meta["backbone"],
                                        "model": str(args.out / "model.pt")}
    predictions.to_csv(args.out / "predictions.csv", index=False)
    error = (predictions["predicted"] - predictions["age"]).abs()
    folds = (predictions.assign(error=error).groupby("subject", sort=True)
             .agg(n=("age", "size"), mean_age=("age", "mean"), mae=("error", "mean")).reset_index())
    folds.to_csv(args.out / "folds.csv", index=False)
    (args.out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    meta = {**meta, "ages": list(space.values), "mode": args.mode,
            "dataset": str(manifest["dataset"].iloc[0]), "input_size": config.input_size,
            "init": str(args.model or f"{args.backbone}:{args.pretrained}"), "lopo": asdict(config)}
    torch.save({"model": {k: v.cpu() for k, v in final.state_dict().items()}, "meta": meta,
                "epoch": config.epochs - 1, "metrics": summary}, args.out / "model.pt")
    shutil.rmtree(args.out / FOLDS_DIR)  # finished: the resume cache has served its purpose
    return summary, folds


def main(args: argparse.Namespace) -> int:
    if args.no_track:
        summary, _ = run(args)
    else:
        from agecascade import tracking

        backbone = args.backbone or read_init(args.model)["meta"]["backbone"]
        tags = {"backbone": backbone, "stage": args.stage, "mode": args.mode, "dataset": "fgnet",
                "protocol": "leave-one-person-out"}
        params = {k: str(v) for k, v in vars(args).items() if k not in ("run", "command", "no_track")}

        def on_fold(subject: str, frame: pd.DataFrame) -> None:
            mae = float((frame["predicted"] - frame["age"]).abs().mean())
            tracking.log_child_run(f"fold-{subject}", {"mae": mae, "n_images": len(frame)},
                                   {"subject": subject, **tags})

        with tracking.tracked_run(args.stage, f"{backbone}-mode-{args.mode}", args.out, tags, params):
            summary, _ = run(args, on_fold)
            tracking.log_summary(summary, args.out, ("metrics.json", "folds.csv", "predictions.csv"))
    print(json.dumps(summary, indent=2))
    return 0
