"""The `agecascade` command: one subcommand per job, expected errors as one line, not a traceback."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from agecascade.errors import UserError

# subcommand -> (module with add_arguments/main, help). A command imports only its own module:
# every DVC stage is a fresh process, and importing all of them (torch, mlflow, grad-cam, FLAML)
# would cost each stage seconds. For the same reason this file imports nothing else of the
# project: every stage's DVC deps include what it imports.
COMMANDS = {
    "prepare": ("agecascade.pipelines.prepare", "dataset root -> manifest, face crops, drop report"),
    "train": ("agecascade.pipelines.train", "fine-tune one backbone on one prepared dataset"),
    "tune": ("agecascade.pipelines.tune", "lr x batch grid (Optuna), one epoch per point"),
    "evaluate": ("agecascade.commands.evaluate", "MAE of a model file on a prepared manifest"),
    "lopo": ("agecascade.pipelines.lopo",
             "FG-NET leave-one-person-out from a cascade checkpoint (mode a, b or c)"),
    "adience": ("agecascade.pipelines.adience",
                "Adience 5-fold protocol from a cascade checkpoint (8 and 3 groups)"),
    "features": ("agecascade.pipelines.features",
                 "regressors on CNN features of FG-NET (thesis table 5)"),
    "automl-env": ("agecascade.features.automl_env",
                   "build auto-sklearn's isolated Python 3.9 environment"),
    "cam": ("agecascade.pipelines.cam", "Grad-CAM maps before/after fine-tuning (thesis figure 14)"),
    "register": ("agecascade.pipelines.register",
                 "log the lowest FG-NET MAE candidate as a pyfunc and make it the registry champion"),
    "promote": ("agecascade.commands.promote",
                "make a registered version, or a run's model, the champion"),
    "report": ("agecascade.pipelines.report",
               "the thesis's tables from this run's outputs (reports/summary.md)"),
    "predict": ("agecascade.commands.predict",
                "the age of every face in photos, folders and videos (JSON lines or CSV)"),
    "export": ("agecascade.commands.export", "a checkpoint as an ONNX graph, checked for parity"),
    "demo-data": ("agecascade.commands.demo_data",
                  "write small synthetic datasets in native layouts"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand is listed; only ``command`` (all of them if None) gets its arguments."""
    parser = argparse.ArgumentParser(prog="agecascade", description=__doc__, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, text) in COMMANDS.items():
        # allow_abbrev off: `tune --lr 0.01` must not be read as `--lrs 0.01`
        sub = commands.add_parser(name, help=text, allow_abbrev=False)
        if command in (None, name):
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.main)
    return parser


# Commands that share their work between torchrun's processes: train data-parallel (DDP,
# agecascade.train.distributed), lopo and adience their folds, tune its grid points. The
# others would run WORLD_SIZE copies writing the same outputs, so they refuse.
DATA_PARALLEL = ("train", "lopo", "tune", "adience")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else "").parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in DATA_PARALLEL:
        print(f"agecascade {args.command}: error: runs in one process; under torchrun "
              f"(WORLD_SIZE {os.environ['WORLD_SIZE']}) only {', '.join(DATA_PARALLEL)} share "
              "their work between processes", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except UserError as err:  # a mistake the user can fix; anything else keeps its traceback
        print(f"agecascade {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
