"""The `agecascade` command: one subcommand per job, expected errors as one line, not a traceback."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from agecascade.data.manifest import DatasetLayoutError


def _demo_data(args: argparse.Namespace) -> int:
    from agecascade.demo import write_demo_datasets

    counts = write_demo_datasets(args.out, seed=args.seed)
    for name, n in counts.items():
        print(f"{name:<8} {n:>5} files -> {args.out / name}")
    return 0


# subcommand -> (module with add_arguments/main, help). A stage imports only its own module:
# every DVC stage is a fresh process, and importing all of them (torch, mlflow, grad-cam, FLAML)
# would cost each stage seconds.
COMMANDS = {
    "prepare": ("agecascade.pipelines.prepare", "dataset root -> manifest, face crops, drop report"),
    "train": ("agecascade.pipelines.train", "fine-tune one backbone on one prepared dataset"),
    "tune": ("agecascade.pipelines.tune", "lr x batch grid (Optuna), one epoch per point"),
    "evaluate": ("agecascade.pipelines.evaluate", "MAE of a model file on a prepared manifest"),
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
    "promote": ("agecascade.pipelines.promote",
                "make a registered version, or a run's model, the champion"),
    "report": ("agecascade.pipelines.report",
               "the thesis's tables from this run's outputs (reports/summary.md)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand is listed; only ``command`` (all of them if None) gets its arguments."""
    parser = argparse.ArgumentParser(prog="agecascade", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, text) in COMMANDS.items():
        sub = commands.add_parser(name, help=text)
        if command in (None, name):
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.main)

    demo = commands.add_parser("demo-data", help="write small synthetic datasets in native layouts")
    demo.add_argument("--out", type=Path, required=True)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else "").parse_args(argv)
    try:
        return args.run(args)
    except (DatasetLayoutError, ValueError, OSError) as err:  # user errors: bad paths, values
        print(f"agecascade {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
