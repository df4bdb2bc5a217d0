"""The `agecascade` command: one subcommand per job, expected errors as one line, not a traceback."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agecascade.data.manifest import DatasetLayoutError


def _demo_data(args: argparse.Namespace) -> int:
    from agecascade.demo import write_demo_datasets

    counts = write_demo_datasets(args.out, seed=args.seed)
    for name, n in counts.items():
        print(f"{name:<8} {n:>5} files -> {args.out / name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from agecascade.features import automl_env
    from agecascade.pipelines import (adience, cam, evaluate, features, lopo, prepare, promote,
                                      register, report, train, tune)

    parser = argparse.ArgumentParser(prog="agecascade", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser("prepare", help="dataset root -> manifest, face crops, drop report")
    prepare.add_arguments(prep)
    prep.set_defaults(run=prepare.main)

    for name, module, text in (
            ("train", train, "fine-tune one backbone on one prepared dataset"),
            ("tune", tune, "lr x batch grid (Optuna), one epoch per point"),
            ("evaluate", evaluate, "MAE of a model file on a prepared manifest"),
            ("lopo", lopo, "FG-NET leave-one-person-out from a cascade checkpoint (mode a, b or c)"),
            ("adience", adience, "Adience 5-fold protocol from a cascade checkpoint (8 and 3 groups)"),
            ("features", features, "regressors on CNN features of FG-NET (thesis table 5)"),
            ("automl-env", automl_env, "build auto-sklearn's isolated Python 3.9 environment"),
            ("cam", cam, "Grad-CAM maps before/after fine-tuning (thesis figure 14)"),
            ("register", register,
             "log the lowest FG-NET MAE candidate as a pyfunc and make it the registry champion"),
            ("promote", promote, "make a registered version, or a run's model, the champion"),
            ("report", report, "the thesis's tables from this run's outputs (reports/summary.md)")):
        sub = commands.add_parser(name, help=text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)

    demo = commands.add_parser("demo-data", help="write small synthetic datasets in native layouts")
    demo.add_argument("--out", type=Path, required=True)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (DatasetLayoutError, ValueError, OSError) as err:  # user errors: bad paths, values
        print(f"agecascade {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
