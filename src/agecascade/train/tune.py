"""The thesis's lr x batch-size grid: one `train` run of one epoch per point, lowest val loss wins.

The study lives in SQLite (``out/optuna.db``), and its name carries a fingerprint of the grid
and of everything a trial depends on (data, starting weights, code, settings). A rerun of the
same grid trains only the points that have no finished trial: an interrupted grid goes on where
it stopped, a point whose trial failed is trained again, and a changed grid or changed data
starts a study of its own. :func:`run` writes the winner to ``out/best.json``, which
`agecascade train --hparams` reads (:func:`agecascade.train.finetune.read_hparams`). Nothing
here logs to an experiment tracker: :func:`run` reports each trial to the caller's ``on_trial``.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from agecascade.atomic import write_text_atomic
from agecascade.cache import fingerprint
from agecascade.config import option
from agecascade.errors import UserError
from agecascade.train import finetune
from agecascade.train.finetune import FinetuneConfig

# The `train` settings a grid point sets: the two searched, and the one epoch each point gets.
POINT_SETTINGS = ("lr", "batch", "epochs")
TRIAL_EPOCHS = 1


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """The grid (its defaults are the thesis's), and the `train` settings every point runs
    with: ``trial`` holds them, so they and their defaults live in ``FinetuneConfig`` only. Its
    lr, batch and epochs are replaced by each point's (:data:`POINT_SETTINGS`)."""
    lrs: tuple[float, ...] = option((0.1, 0.01, 0.001, 0.0001), help="learning rates to try")
    batches: tuple[int, ...] = option((12, 32, 48, 64), help="batch sizes to try")
    trial: FinetuneConfig

    def __post_init__(self) -> None:
        if not self.lrs or not self.batches:
            raise UserError("--lrs and --batches each need at least one value")
        if min(self.lrs) <= 0 or min(self.batches) < 1:
            raise UserError(f"--lrs must be > 0 and --batches >= 1 (got {self.lrs}, "
                            f"{self.batches})")
        # a set, in order: the same grid written twice or in another order is the same study
        object.__setattr__(self, "lrs", tuple(sorted(set(self.lrs))))
        object.__setattr__(self, "batches", tuple(sorted(set(self.batches))))

    @property
    def out(self) -> Path:
        return self.trial.out

    def grid(self) -> list[tuple[float, int]]:
        """(lr, batch) points, by lr, then batch."""
        return [(lr, batch) for lr in self.lrs for batch in self.batches]

    def point(self, lr: float, batch: int) -> FinetuneConfig:
        """One grid point as a `train` run of one epoch, in its own folder under out/trials."""
        return replace(self.trial, lr=lr, batch=batch, epochs=TRIAL_EPOCHS,
                       out=self.out / "trials" / f"lr{lr:g}-batch{batch}")


def study_name(config: TuneConfig) -> str:
    """``backbone-dataset-fingerprint``: the grid, plus what a trial's resume key covers. The
    first point's key stands for every point's: they differ by the grid's values alone."""
    first = config.point(*config.grid()[0])
    key = fingerprint(grid={"lr": list(config.lrs), "batch": list(config.batches)},
                      trial=finetune.starting_point(first).key)
    return f"{config.trial.backbone}-{config.trial.manifest.name}-{key[:16]}"


def run(config: TuneConfig,
        on_trial: Callable[[float, int, dict], None] | None = None) -> dict:
    """Train every grid point that has no finished trial; write and return best.json's content
    ({"lr", "batch", "val_loss"}). ``on_trial(lr, batch, summary)`` sees each trained point."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    config.out.mkdir(parents=True, exist_ok=True)
    distributions = {"lr": CategoricalDistribution(config.lrs),
                     "batch": CategoricalDistribution(config.batches)}
    study = optuna.create_study(
        study_name=study_name(config), direction="minimize",
        storage=f"sqlite:///{(config.out / 'optuna.db').resolve()}", load_if_exists=True)
    # Only a COMPLETE trial counts: a FAIL one is tried again, and so is a point whose trial a
    # kill left RUNNING (trials are recorded once trained, so this code leaves none of those).
    done = {(t.params["lr"], t.params["batch"]) for t in study.trials
            if t.state == TrialState.COMPLETE}
    grid = config.grid()
    todo = [point for point in grid if point not in done]
    if len(todo) < len(grid):
        print(f"resuming study {study.study_name}: {len(grid) - len(todo)} of {len(grid)} "
              "grid points already trained")
    for lr, batch in todo:
        params = {"lr": lr, "batch": batch}
        try:
            loss = trial(config, lr, batch, on_trial)
        except Exception:
            study.add_trial(create_trial(params=params, distributions=distributions,
                                         state=TrialState.FAIL))
            raise
        study.add_trial(create_trial(params=params, distributions=distributions, value=loss))
    best = {**study.best_params, "val_loss": study.best_value}
    shutil.rmtree(config.out / "trials", ignore_errors=True)
    write_text_atomic(config.out / "best.json", json.dumps(best, indent=2) + "\n")
    return best


def trial(config: TuneConfig, lr: float, batch: int,
          on_trial: Callable[[float, int, dict], None] | None) -> float:
    """The objective: one point's validation loss (inf when training diverged)."""
    point = config.point(lr, batch)
    summary, _ = finetune.run(point)
    shutil.rmtree(point.out)  # a trial's weights are not worth keeping
    if on_trial is not None:
        on_trial(lr, batch, summary)
    loss = summary["val_loss"]
    return loss if math.isfinite(loss) else math.inf
