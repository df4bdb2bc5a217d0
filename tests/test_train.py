"""Training on a tiny prepared dataset on the CPU: the configs, learning, resume after kill -9,
grid, tracking."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agecascade.cli import main
from agecascade.config import from_args
from agecascade.data.manifest import make_row, to_frame
from agecascade.data.store import CROPS, MANIFEST, create_store
from agecascade.errors import UserError
from agecascade.nets import create_model
from agecascade.train import finetune
from agecascade.train.compute import Compute
from agecascade.train.calibration import coverage, fit_temperature, nll
from agecascade.train.data import LabelSpace, assign_split
from agecascade.train.degrade import Degrade, degrade_batch
from agecascade.train.finetune import FinetuneConfig, resume_key
from agecascade.train.tune import TuneConfig

REPO = Path(__file__).resolve().parents[1]

SIZE = 32


def write_prepared(folder: Path, n: int = 400, seed: int = 0) -> Path:
    """A prepared dataset whose images encode age as brightness: learnable in an epoch or two."""
    rng = np.random.default_rng(seed)
    ages = rng.integers(0, 60, n)
    folder.mkdir(parents=True)
    store = create_store(folder / CROPS, n, SIZE)
    for i, age in enumerate(ages):
        level = 40 + 3 * age
        store[i] = np.clip(rng.normal(level, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    store.flush()
    rows = [make_row(f"img{i}.jpg", "toy", age=float(a), subject=f"s{i // 2}") for i, a in enumerate(ages)]
    frame = to_frame(rows)
    frame["sha1"] = [f"{i:040x}" for i in range(n)]
    frame.to_parquet(folder / MANIFEST, index=False)
    return folder


def train_args(manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--manifest", str(manifest), "--backbone", "resnet18", "--input-size", str(SIZE),
            "--batch", "32", "--lr", "0.001", "--device", "cpu", "--no-track", "--out", str(out), *extra]


def parse(argv: list[str]):
    from agecascade.cli import build_parser

    return build_parser(argv[0]).parse_args(argv)


def config_of(argv: list[str]) -> FinetuneConfig:
    """The config `agecascade train ...` runs with."""
    from agecascade.pipelines import train

    return train.config_from(parse(argv))


# --- the configs ----------------------------------------------------------------------------

REQUIRED = {"manifest": Path("imdb"), "backbone": "vgg16", "out": Path("out")}


def test_train_parser_defaults_are_the_configs():
    """A default set in argparse alone, or a path or None lost in conversion, would differ."""
    args = parse(["train", "--manifest", "imdb", "--backbone", "vgg16", "--out", "out"])
    assert from_args(FinetuneConfig, args) == FinetuneConfig(**REQUIRED)
    assert args.hparams is None and not args.no_track


def test_tune_parser_defaults_are_the_configs():
    """The grid's defaults are TuneConfig's; every other setting is FinetuneConfig's."""
    from agecascade.pipelines import tune

    args = parse(["tune", "--manifest", "imdb", "--backbone", "vgg16", "--out", "out"])
    assert tune.config_from(args) == TuneConfig(trial=FinetuneConfig(**REQUIRED))
    assert TuneConfig(trial=FinetuneConfig(**REQUIRED)).lrs == (0.0001, 0.001, 0.01, 0.1)
    # a grid point sets the epochs (and lr and batch, which argparse reads as --lrs, --batches)
    for not_tune in ("--epochs", "--hparams"):
        with pytest.raises(SystemExit):
            parse(["tune", "--manifest", "imdb", "--backbone", "vgg16", "--out", "out",
                   not_tune, "1"])


@pytest.fixture(scope="module")
def dvc_commands() -> dict[str, list[str]]:
    """Each stage's command as DVC resolves it from params.yaml, split into words."""
    from dvc.repo import Repo

    return {s.addressing: shlex.split(s.cmd) for s in Repo(str(REPO)).index.stages if s.cmd}


@pytest.fixture(scope="module")
def params() -> dict:
    import yaml

    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("step, manifest", [("finetune_imdb", "imdb"), ("finetune_agedb", "agedb")])
def test_dvc_yaml_train_commands_parse_into_the_params(dvc_commands, params, step, manifest):
    from agecascade.pipelines import train

    for backbone, item in params["backbones"].items():
        argv = dvc_commands[f"{step}@{backbone}"]
        launcher = shlex.split(params["launcher"])   # `agecascade`, or torchrun ... -m agecascade
        assert argv[:len(launcher) + 1] == [*launcher, "train"], argv
        args = parse(argv[len(launcher):])
        config = from_args(FinetuneConfig, args)  # --hparams not read: it is tune's output
        wanted, shared = params[step], params["train"]
        assert args.stage == step
        assert config.manifest == Path(f"prepared/{manifest}")
        assert config.out == Path(f"models/{backbone}/{manifest}")
        assert (config.epochs, config.patience, config.val_fraction) == \
            (wanted["epochs"], wanted["patience"], wanted["val_fraction"])
        assert (config.input_size, config.seed, config.workers, config.device) == \
            (shared["input_size"], shared["seed"], shared["workers"], shared["device"])
        assert (config.degrade, config.blur_sigma, config.label_sigma) == \
            (shared["degrade"], shared["blur_sigma"], shared["label_sigma"])
        assert (config.mean_variance, config.precision) == \
            (shared["mean_variance"], shared["precision"])
        if step == "finetune_imdb":
            assert (config.pretrained, config.weights) == (item["pretrained"], item["weights"])
            assert config.init is None and config.mode == "b"
            assert args.hparams == Path(f"models/{backbone}/tune/best.json")
        else:
            assert config.init == Path(f"models/{backbone}/imdb/model.pt") and config.mode == "c"
            assert (config.lr, config.batch) == (item["agedb_lr"], wanted["batch"])
            assert train.config_from(args) == config  # no --hparams: the command's own lr


def test_dvc_yaml_tune_command_parses_into_the_params(dvc_commands, params):
    from agecascade.pipelines import tune

    for backbone, item in params["backbones"].items():
        argv = dvc_commands[f"tune@{backbone}"]
        assert argv[:2] == ["agecascade", "tune"], argv
        config = tune.config_from(parse(argv[1:]))
        wanted, shared = params["tune"], params["train"]
        assert config.lrs == tuple(sorted(wanted["lrs"]))
        assert config.batches == tuple(sorted(wanted["batches"]))
        trial = config.trial
        assert trial.max_train_batches == wanted["max-train-batches"]
        assert (trial.backbone, trial.pretrained, trial.weights) == \
            (backbone, item["pretrained"], item["weights"])
        assert trial.val_fraction == params["finetune_imdb"]["val_fraction"]
        assert (trial.input_size, trial.seed, trial.workers, trial.device) == \
            (shared["input_size"], shared["seed"], shared["workers"], shared["device"])
        assert config.out == Path(f"models/{backbone}/tune")


@pytest.mark.parametrize("change, message", [
    ({"mode": "d"}, "--mode 'd'"),
    ({"pretrained": "faces"}, "--pretrained 'faces'"),
    ({"pretrained": "vggface2"}, "--weights goes with --pretrained vggface2"),
    ({"weights": "w.pth"}, "--weights goes with --pretrained vggface2"),
    ({"lr": 0.0}, "--lr > 0"),
    ({"batch": 0}, "--batch and --input-size must be >= 1"),
    ({"max_images": -1}, "--max-images"),
    ({"degrade": 1.5}, "--degrade 1.5"),
    ({"blur_sigma": 0.2}, "--blur-sigma 0.2"),
    ({"ema": 1.0}, "--ema 1: a decay per step"),
    ({"mean_variance": -0.1}, "--mean-variance -0.1: a weight"),
    ({"val_fraction": 0.0}, "--val-fraction 0"),
    ({"val_fraction": 0.6, "test_fraction": 0.4}, "together < 1"),
])
def test_bad_train_settings_are_refused_when_the_config_is_built(change, message):
    with pytest.raises(UserError, match=re.escape(message)):
        FinetuneConfig(**REQUIRED, **change)


def test_bad_grids_are_refused_and_a_grid_is_a_set():
    trial = FinetuneConfig(**REQUIRED)
    with pytest.raises(UserError, match="at least one value"):
        TuneConfig(lrs=(), trial=trial)
    with pytest.raises(UserError, match="--lrs must be > 0"):
        TuneConfig(lrs=(0.01, -1.0), trial=trial)
    grid = TuneConfig(lrs=(0.01, 0.001, 0.01), batches=(32, 16), trial=trial)
    assert grid.grid() == [(0.001, 16), (0.001, 32), (0.01, 16), (0.01, 32)]
    point = grid.point(0.01, 16)
    assert (point.lr, point.batch, point.epochs) == (0.01, 16, 1)
    assert point.out == Path("out/trials/lr0.01-batch16")


def test_hparams_set_lr_and_batch_and_a_missing_file_is_a_user_error(tmp_path, capsys):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"lr": 0.01, "batch": 48, "val_loss": 3.2}))
    config = config_of(train_args(Path("imdb"), tmp_path, "--hparams", str(best)))
    assert (config.lr, config.batch) == (0.01, 48)
    assert main(train_args(Path("imdb"), tmp_path, "--hparams", str(tmp_path / "none.json"))) == 2
    assert "run `agecascade tune` first" in capsys.readouterr().err


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("toy") / "prepared")


def test_split_is_by_subject_and_stable(toy):
    import pandas as pd

    manifest = pd.read_parquet(toy / MANIFEST)
    split = assign_split(manifest, 0.2, 0.1, seed=0)
    assert (split == assign_split(manifest.iloc[::-1], 0.2, 0.1, 0)[::-1]).all()  # order-free
    by_subject = pd.Series(split).groupby(manifest["subject"].to_numpy()).nunique()
    assert (by_subject == 1).all()  # a person never straddles two parts
    share = {p: (split == p).mean() for p in ("train", "val", "test")}
    assert 0.6 < share["train"] < 0.8 and 0.1 < share["val"] < 0.3 and 0.03 < share["test"] < 0.2


def test_the_label_distribution_is_a_gaussian_around_the_age_over_the_label_space():
    from agecascade.train.engine import age_distribution

    target = age_distribution(torch.tensor([0, 5, 9]), 10, sigma=2.0)
    np.testing.assert_allclose(target.sum(dim=1), 1.0, atol=1e-6)
    assert target.argmax(dim=1).tolist() == [0, 5, 9]
    np.testing.assert_allclose(target[1, 4], target[1, 6], atol=1e-7)  # symmetric inside
    assert target[0, 0] > target[1, 5]   # cut at the edge of the space, then renormalised


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_at():
    """Labels drawn from softmax(logits / 2.5): the NLL's minimum is at T = 2.5 give or take
    the sampling noise of 20,000 rows; the coverage of the interval rises with T."""
    generator = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(20_000, 12, generator=generator)
    labels = torch.multinomial(torch.softmax(logits / 2.5, dim=1), 1, generator=generator)[:, 0]
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(2.5, rel=0.04)
    assert nll(logits, labels, temperature) < min(nll(logits, labels, t) for t in (2.2, 2.8))
    ages = np.arange(12, dtype=float)
    truth = ages[labels.numpy()]
    assert coverage(logits, truth, ages, 1.0) < coverage(logits, truth, ages, temperature)
    with pytest.raises(ValueError, match="at least one"):
        fit_temperature(logits[:0], labels[:0])


def test_the_bias_line_is_fitted_on_predicted_against_true_ages_and_refused_when_flat():
    from agecascade.train.calibration import IDENTITY, fit_bias_line

    rng = np.random.default_rng(0)
    truth = rng.uniform(1, 80, 5000)
    predicted = 0.9 * truth + 3.0 + rng.normal(0, 4, truth.shape)  # pulled toward the middle
    slope, intercept = fit_bias_line(predicted, truth)
    assert slope == pytest.approx(0.9, abs=0.01) and intercept == pytest.approx(3.0, abs=0.3)
    assert fit_bias_line(0.2 * truth + 30, truth) == IDENTITY  # ages that barely follow the truth
    assert fit_bias_line(predicted[:1], truth[:1]) == IDENTITY
    assert fit_bias_line(predicted[:5], np.full(5, 30.0)) == IDENTITY  # one age: no line


def test_the_degrade_blur_draws_sigmas_up_to_the_configured_strongest():
    """FG-NET's softest scans need blur beyond the old 1.5 px (docs/zero-shot.md, item 21): an
    impulse blurred by every image of a batch spreads by sigma, up to ``blur_sigma``."""
    impulse = torch.zeros(400, 3, 112, 112)
    impulse[:, :, 56, 56] = 1.0
    blurred = degrade_batch(impulse, Degrade(blur=1.0, max_blur_sigma=3.0),
                            torch.Generator().manual_seed(0))
    row = blurred[:, 0, 56, :].double()                       # (B, 112) through the centre
    offsets = torch.arange(112, dtype=torch.float64) - 56
    sigma = ((row * offsets ** 2).sum(1) / row.sum(1)).sqrt()
    assert 2.5 < sigma.max() < 3.05  # beyond the old maximum of 1.5, never beyond 3


def test_the_stage_s_blur_sigma_and_degrade_reach_the_training_loop():
    """``--blur-sigma`` is only a number until ``loop_config`` hands it to the loop's Degrade;
    its default is Degrade's own strongest blur, written once."""
    config = FinetuneConfig(**REQUIRED, degrade=0.4, blur_sigma=2.0)
    degrade = finetune.loop_config(config, 1e-3, finetune.IMAGENET).degrade
    assert degrade.max_blur_sigma == 2.0 and degrade.blur == 0.4 and degrade.greyscale == 0.2
    default = FinetuneConfig(**REQUIRED, degrade=0.4)
    assert finetune.loop_config(default, 1e-3, finetune.IMAGENET).degrade.max_blur_sigma == \
        Degrade().max_blur_sigma


def test_the_mean_variance_penalty_is_the_mean_error_and_spread_of_the_distribution():
    from agecascade.train.engine import mean_variance_penalty

    certain = torch.full((1, 10), -1e4)
    certain[0, 7] = 0.0                       # all mass on class 7
    assert mean_variance_penalty(certain, torch.tensor([4])).item() == pytest.approx(0.5 * 3 ** 2)
    split = torch.full((1, 10), -1e4)
    split[0, [2, 6]] = 0.0                    # half on 2, half on 6: mean 4, variance 4
    assert mean_variance_penalty(split, torch.tensor([4])).item() == pytest.approx(0.25 * 4)


def test_scores_are_the_mean_cross_entropy_and_the_mean_absolute_error_in_years():
    from agecascade.train.engine import scores

    ages = torch.tensor([10.0, 20.0, 30.0])
    logits = torch.log(torch.tensor([[0.5, 0.5, 1e-12], [0.25, 0.25, 0.5]]))
    labels = torch.tensor([0, 2])                 # true ages 10 and 30
    predicted = torch.softmax(logits, 1) @ ages   # 15 and 22.5
    loss, mae = scores(logits, labels, predicted, ages)
    assert loss == pytest.approx((np.log(2) + np.log(2)) / 2, rel=1e-5)
    assert mae == pytest.approx((5.0 + 7.5) / 2, rel=1e-5)


def test_balanced_sampling_draws_rare_ages_as_often_as_common_ones():
    from agecascade.train.data import BatchOrder, balance_weights

    labels = np.array([0] * 90 + [1] * 10)            # age 1 is rare
    rows = np.arange(100)
    order = BatchOrder(rows, 10, True, seed=0, weights=balance_weights(labels, 1.0))
    drawn = labels[np.concatenate([batch for batch in order])]
    assert len(drawn) == 100 and 0.35 < drawn.mean() < 0.65   # about half, not a tenth
    plain = BatchOrder(rows, 10, True, seed=0)
    assert sorted(np.concatenate(list(plain)).tolist()) == rows.tolist()  # a permutation
    np.testing.assert_allclose(balance_weights(labels, 0.0), 1.0)


def test_label_space_covers_the_data_range():
    import pandas as pd

    space = LabelSpace.from_ages(pd.Series([3.0, 7.0, 5.0]))
    assert space.values == (3.0, 4.0, 5.0, 6.0, 7.0)
    assert space.encode(np.array([3.0, 7.0, 9.0])).tolist() == [0, 4, 4]


@pytest.mark.parametrize("loss", [(), ("--label-sigma", "2"), ("--mean-variance", "0.2"),
                                  ("--precision", "bf16"), ("--compile",)],
                         ids=["one-hot", "label-sigma", "mean-variance", "bf16-autocast",
                              "compiled"])
def test_training_learns_and_writes_its_outputs(toy, tmp_path, loss):
    out = tmp_path / "run"
    assert main(train_args(toy, out, "--epochs", "3", "--test-fraction", "0.1", *loss)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_mae"] < 0.6 * metrics["val_mae_median_baseline"]
    assert "test_mae" in metrics and metrics["n_test"] > 0
    assert 0 <= metrics["val_coverage"] <= 1 and 0 <= metrics["test_coverage"] <= 1
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss") and len(history) == 4
    assert not (out / "last.pt").exists()  # a finished run leaves no resume point
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["meta"]["backbone"] == "resnet18" and len(state["meta"]["ages"]) == 60
    assert state["meta"]["temperature"] == metrics["temperature"] > 0  # fitted on the val split
    assert state["meta"]["bias_line"] == [metrics["bias_slope"], metrics["bias_intercept"]]
    assert metrics["bias_slope"] >= 0.5 and "test_mae_bias_corrected" in metrics
    assert state["model"].keys() == create_model("resnet18", 60).state_dict().keys()  # compiled too


def test_evaluate_scores_a_model_file(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(toy, out, "--epochs", "1", "--test-fraction", "0.1")) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "model.pt"), "--manifest", str(toy),
                 "--split", "test", "--device", "cpu"]) == 0
    scored = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert scored["n"] == metrics["n_test"] and abs(scored["mae"] - metrics["test_mae"]) < 1e-4
    assert scored["temperature"] == metrics["temperature"]
    assert scored["coverage"] == pytest.approx(metrics["test_coverage"])
    assert scored["bias_line"] == [metrics["bias_slope"], metrics["bias_intercept"]]
    assert scored["mae_bias_corrected"] == pytest.approx(metrics["test_mae_bias_corrected"],
                                                         abs=1e-4)
    # benchmarks/bias_line.py refits the line through predict's Predictor: the same line
    probe = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bias_line.py"), "--model",
                            str(out / "model.pt"), "--manifest", str(toy), "--json"],
                           capture_output=True, text=True, check=True)
    report = json.loads(probe.stdout)
    assert report["stored_line"] != [1.0, 0.0]  # a line was fitted, not refused
    np.testing.assert_allclose(report["line"], report["stored_line"], rtol=1e-3)
    assert report["test"]["n"] == metrics["n_test"]


# A tiny run whose best epoch is the first and no later one beats it: lr 0.03 overshoots (on the
# CPU, deterministic). So when a run is killed later, only last.pt can give model.pt back.
TINY = ("--epochs", "3", "--max-train-batches", "2", "--batch", "16", "--lr", "0.03")


class Killed(BaseException):
    """Stands for kill -9 in-process: not an Exception, so nothing handles it as a failure."""


def trained_epochs(stdout: str) -> list[int]:
    return [int(e) for e in re.findall(r"^epoch (\d+)/\d+ ", stdout, re.M)]


def dvc_deletes_outs(out: Path) -> None:
    """What `dvc repro` does before it reruns a stage: its outs go, last.pt (no out) stays."""
    for name in ("model.pt", "metrics.json", "history.csv"):
        (out / name).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("tiny") / "prepared", n=80)


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory) -> Path:
    """The uninterrupted run the resumed ones must end exactly like."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(train_args(tiny, out, *TINY)) == 0
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == 1  # TINY's premise
    return out


def assert_same_run(a: Path, b: Path) -> None:
    assert json.loads((b / "metrics.json").read_text()) == json.loads((a / "metrics.json").read_text())
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert wa["epoch"] == wb["epoch"]
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    # the same bytes (no timings inside), so DVC sees no change in the stages that read it
    assert (a / "model.pt").read_bytes() == (b / "model.pt").read_bytes()
    assert not (b / "last.pt").exists()  # finished: a later rerun must start from scratch


def killed_then_rerun(argv: list[str], epoch: int, capsys) -> str:
    """Train as ``argv`` says, killed right after ``epoch``; DVC deletes the outs; run the same
    command again. Returns what the rerun printed."""
    def kill(done: int, metrics: dict) -> None:
        if done == epoch:
            raise Killed

    with pytest.raises(Killed):
        finetune.run(config_of(argv), kill)
    dvc_deletes_outs(Path(argv[argv.index("--out") + 1]))
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def test_kill_9_then_dvc_rerun_resumes_after_the_last_finished_epoch(tiny, straight, tmp_path):
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "agecascade.cli", *train_args(tiny, killed, *TINY)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    k = torch.load(killed / "last.pt", weights_only=True)["epoch"] + 1
    assert k < 3 and not (killed / "metrics.json").exists()
    dvc_deletes_outs(killed)  # model.pt held epoch 1, the best one; no later epoch rewrites it
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from epoch {k} of 3" in rerun.stdout
    assert trained_epochs(rerun.stdout) == list(range(k + 1, 4))  # epochs 1..k not retrained
    assert_same_run(straight, killed)


def test_killed_after_the_last_epoch_resumes_without_training(tiny, straight, tmp_path, capsys):
    """Killed between the final epoch and the stage's outputs, then DVC deletes model.pt."""
    out = tmp_path / "run"
    printed = killed_then_rerun(train_args(tiny, out, *TINY), 3, capsys)
    assert "resuming from epoch 3 of 3" in printed and trained_epochs(printed) == []
    assert_same_run(straight, out)


def test_the_weight_average_follows_the_weights_with_a_warming_decay():
    from agecascade.train.engine import WeightAverage

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    average = WeightAverage(net, 0.5)
    expected = net[0].weight.detach().clone()
    for step in range(4):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        net[1].num_batches_tracked += 1
        average.update()
        decay = min(0.5, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * net[0].weight.detach()
    kept = average.module
    assert torch.allclose(kept[0].weight, expected)
    assert not torch.allclose(kept[0].weight, net[0].weight)  # an average, not a copy
    assert kept[1].num_batches_tracked.item() == 4  # counters are copied, not averaged
    assert not any(p.requires_grad for p in kept.parameters())


def test_an_averaged_run_keeps_the_average_and_resumes_exactly(tiny, tmp_path, capsys):
    """--ema: model.pt holds the averaged weights (not the trained ones), and a run killed after
    an epoch resumes to the same bytes, the average's own state included."""
    ema = (*TINY, "--ema", "0.9")
    plain, straight, out = tmp_path / "plain", tmp_path / "straight", tmp_path / "killed"
    assert main(train_args(tiny, plain, *TINY)) == 0
    assert main(train_args(tiny, straight, *ema)) == 0
    kept = torch.load(straight / "model.pt", weights_only=True)["model"]
    trained = torch.load(plain / "model.pt", weights_only=True)["model"]
    assert any(not torch.equal(kept[k], trained[k]) for k in kept)
    printed = killed_then_rerun(train_args(tiny, out, *ema), 1, capsys)
    assert "resuming from epoch 1 of 3" in printed and trained_epochs(printed) == [2, 3]
    assert_same_run(straight, out)


def test_a_resume_point_of_other_data_is_not_used(tiny, tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(tiny, data)

    def kill(epoch: int, metrics: dict) -> None:
        raise Killed

    with pytest.raises(Killed):
        finetune.run(config_of(train_args(data, out, *TINY, "--epochs", "2")), kill)
    crops = np.load(data / CROPS, mmap_mode="r+")  # `prepare` rewrote one crop at the same path
    crops[0] = 255 - crops[0]
    crops.flush()
    capsys.readouterr()
    assert main(train_args(data, out, *TINY, "--epochs", "2")) == 0
    printed = capsys.readouterr().out
    assert "training afresh" in printed and trained_epochs(printed) == [1, 2]


def test_resume_key_follows_content_not_paths(tiny, tmp_path):
    from agecascade.train.cascade import read_init

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    init = tmp_path / "a" / "model.pt"
    init.parent.mkdir()
    torch.save({"model": create_model("resnet18", 60).state_dict(),
                "meta": {"arch": "resnet18", "ages": list(range(60)), "init": "x/model.pt"}}, init)
    moved = tmp_path / "b" / "renamed.pt"
    moved.parent.mkdir()
    shutil.copy(init, moved)
    store = shutil.copytree(tiny, tmp_path / "store-copy")

    def key(manifest: Path, *extra: str, checkpoint: Path | None = init) -> str:
        config = config_of(train_args(manifest, tmp_path / "out", *extra))
        return resume_key(config, read_init(checkpoint) if checkpoint else None, cpu)

    base = key(tiny)
    # the same content elsewhere, and settings that change no result: the same key
    assert key(store, checkpoint=moved) == base
    assert key(tiny, "--workers", "2", "--out", str(tmp_path / "elsewhere")) == base
    # changed content or settings: a new key
    changed = read_init(moved)
    changed["model"]["head.0.bias"][0] += 1.0
    torch.save(changed, moved)
    assert key(tiny, checkpoint=moved) != base
    crops = np.load(store / CROPS, mmap_mode="r+")
    crops[5, 0, 0, 0] ^= 1
    crops.flush()
    assert key(store) != base
    assert key(tiny, "--lr", "0.01") != base
    assert key(tiny, "--max-images", "50") != base
    assert key(tiny, "--precision", "bf16") != base
    weights = tmp_path / "vggface2.pth"
    weights.write_bytes(b"face weights")
    fresh = key(tiny, checkpoint=None)
    with_file = key(tiny, "--pretrained", "vggface2", "--weights", str(weights), checkpoint=None)
    assert len({fresh, key(tiny, "--pretrained", "imagenet", checkpoint=None), with_file}) == 3
    weights.write_bytes(b"other face weights")
    assert key(tiny, "--pretrained", "vggface2", "--weights", str(weights), checkpoint=None) != with_file


def test_the_tracked_run_logs_the_resume_key(tiny, tmp_path, monkeypatch):
    """MLflow continues a run whose params match: with the key among them, it continues one
    exactly when last.pt is resumed (same weights, data, code and settings)."""
    from agecascade import tracking

    logged: dict = {}

    @contextlib.contextmanager
    def tracked_run(experiment, run_name, out, tags, params):
        logged.update(params)
        yield None

    monkeypatch.setattr(tracking, "tracked_run", tracked_run)
    monkeypatch.setattr(tracking, "log_epoch", lambda epoch, metrics: None)
    monkeypatch.setattr(tracking, "log_final", lambda *args: None)
    argv = [a for a in train_args(tiny, tmp_path / "run", *TINY, "--epochs", "1")
            if a != "--no-track"]
    assert main(argv) == 0
    assert logged["resume_key"] == resume_key(config_of(argv), None, torch.device("cpu"))
    assert (logged["lr"], logged["manifest"], logged["init"]) == (0.03, str(tiny), "None")


def study_trials(out: Path) -> dict[tuple[float, int], list[str]]:
    """(lr, batch) -> the states of its trials, over every study in out/optuna.db."""
    import optuna

    storage = f"sqlite:///{out / 'optuna.db'}"
    trials: dict[tuple[float, int], list[str]] = {}
    for name in optuna.get_all_study_names(storage):
        for t in optuna.load_study(study_name=name, storage=storage).trials:
            trials.setdefault((t.params["lr"], t.params["batch"]), []).append(t.state.name)
    return trials


def tune_args(toy: Path, out: Path, lrs=("0.01", "0.001"), batches=("16", "32"),
              *extra: str) -> list[str]:
    """`agecascade tune`: train_args less the settings each grid point sets."""
    argv = train_args(toy, out, *extra)[1:]
    for point_setting in ("--batch", "--lr"):
        at = argv.index(point_setting)
        del argv[at:at + 2]
    return ["tune", *argv, "--lrs", *lrs, "--batches", *batches]


def test_grid_runs_every_point_once_and_feeds_the_stage(toy, tmp_path):
    out = tmp_path / "tune"
    assert main(tune_args(toy, out, ("0.01", "0.001"), ("16", "32"),
                          "--max-train-batches", "2")) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["lr"] in (0.01, 0.001) and best["batch"] in (16, 32)
    import optuna

    storage = f"sqlite:///{out / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    assert name.startswith("resnet18-prepared-")
    study = optuna.load_study(study_name=name, storage=storage)
    points = {(t.params["lr"], t.params["batch"]) for t in study.trials}
    assert len(study.trials) == 4 and len(points) == 4
    assert best["val_loss"] == min(t.value for t in study.trials)
    assert not (out / "trials").exists()
    run = tmp_path / "run"
    assert main(train_args(toy, run, "--hparams", str(out / "best.json"))) == 0


@pytest.fixture
def fake_trials(monkeypatch):
    """Grid bookkeeping without training: a point's loss is a function of the point; a point
    put in ``plan`` raises the exception given there (a failure, or a kill)."""
    calls: list[tuple[float, int]] = []
    plan: dict[tuple[float, int], BaseException] = {}

    def fake_run(config, on_epoch=None, start=None):
        point = (config.lr, config.batch)
        assert config.epochs == 1
        calls.append(point)
        if point in plan:
            raise plan.pop(point)
        config.out.mkdir(parents=True)
        return {"val_loss": config.lr * 100 + config.batch / 1000}, None

    monkeypatch.setattr(finetune, "run", fake_run)
    return calls, plan


def test_interrupted_grid_resumes_and_failed_points_are_retried(toy, tmp_path, fake_trials):
    calls, plan = fake_trials
    out = tmp_path / "tune"
    plan[(0.01, 16)] = RuntimeError("out of memory")   # the grid is walked by lr, then batch
    with pytest.raises(RuntimeError):
        main(tune_args(toy, out))
    assert calls == [(0.001, 16), (0.001, 32), (0.01, 16)]
    calls.clear()
    plan[(0.01, 16)] = Killed()  # kill -9 while training it: its trial is left RUNNING
    with pytest.raises(Killed):
        main(tune_args(toy, out))
    # the point still queued, then the failed one again; the finished ones not again
    assert calls == [(0.01, 32), (0.01, 16)]
    assert study_trials(out) == {(0.001, 16): ["COMPLETE"], (0.001, 32): ["COMPLETE"],
                                 (0.01, 16): ["FAIL", "RUNNING"], (0.01, 32): ["COMPLETE"]}
    calls.clear()
    assert main(tune_args(toy, out)) == 0
    assert calls == [(0.01, 16)]  # its worker (this process) is gone: trained again at once
    assert json.loads((out / "best.json").read_text()) == {"lr": 0.001, "batch": 16,
                                                            "val_loss": 0.1 + 0.016}
    assert study_trials(out)[(0.01, 16)] == ["FAIL", "FAIL", "COMPLETE"]


def test_a_changed_grid_does_not_reuse_trials(toy, tmp_path, fake_trials):
    calls, _ = fake_trials
    out = tmp_path / "tune"
    assert main(tune_args(toy, out)) == 0
    calls.clear()
    assert main(tune_args(toy, out, lrs=("0.01", "0.0001"))) == 0
    assert calls == [(0.0001, 16), (0.0001, 32), (0.01, 16), (0.01, 32)]  # (0.01, x) again too
    calls.clear()
    assert main(tune_args(toy, out, lrs=("0.01", "0.0001"))) == 0
    assert calls == []  # the same grid again: nothing left to train


def test_cascade_stage_inherits_arch_and_carries_output_units_by_age(toy, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(train_args(toy, first, "--epochs", "1")) == 0
    older = write_prepared(tmp_path / "older", n=200, seed=1)
    import pandas as pd

    manifest = pd.read_parquet(older / MANIFEST)
    manifest["age"] = manifest["age"] + 10  # another label range: 10..69
    manifest.to_parquet(older / MANIFEST, index=False)
    second = tmp_path / "second"
    capsys.readouterr()
    assert main(train_args(older, second, "--epochs", "1", "--init", str(first / "model.pt"),
                           "--mode", "c")) == 0
    # ages 0..59 then 10..69: one class per year over both, the 10 new ages start fresh
    assert "head.0.weight (rows of 10 new labels)" in capsys.readouterr().out
    before = torch.load(first / "model.pt", weights_only=True)
    after = torch.load(second / "model.pt", weights_only=True)
    assert after["meta"]["arch"] == before["meta"]["arch"] == "resnet18"
    assert after["meta"]["ages"] == [float(a) for a in range(70)]
    assert after["model"]["head.0.weight"].shape[0] == 70


def test_output_units_are_matched_by_the_age_they_stand_for():
    from agecascade.nets import create_model
    from agecascade.train.cascade import load_init

    torch.manual_seed(0)
    old = create_model("resnet18", 5)           # ages 20..24
    new = create_model("resnet18", 4)           # ages 22..25
    fresh = load_init(new, old.state_dict(), (20.0, 21.0, 22.0, 23.0, 24.0), (22.0, 23.0, 24.0, 25.0))
    assert torch.equal(new.output_layer.weight[:3], old.output_layer.weight[2:])  # 22, 23, 24
    assert not torch.equal(new.output_layer.weight[3], old.output_layer.weight[4])
    assert torch.equal(new.features.conv1.weight, old.features.conv1.weight)
    assert sorted(fresh) == ["head.0.bias (rows of 1 new labels)",
                             "head.0.weight (rows of 1 new labels)"]
    # no label in common: the output layer keeps its own initialisation
    unrelated = create_model("resnet18", 4)
    kept = unrelated.output_layer.weight.clone()
    fresh = load_init(unrelated, old.state_dict(), (20.0, 21.0, 22.0, 23.0, 24.0), (1.0, 2.0, 3.0, 4.0))
    assert torch.equal(unrelated.output_layer.weight, kept)
    assert sorted(fresh) == ["head.0.bias", "head.0.weight"]


def test_mode_a_trains_only_the_head(toy, tmp_path):
    out = tmp_path / "a"
    assert main(train_args(toy, out, "--epochs", "1", "--mode", "a")) == 0
    torch.manual_seed(0)
    from agecascade.nets import create_model

    untouched = create_model("resnet18", 60).state_dict()
    trained = torch.load(out / "model.pt", weights_only=True)["model"]
    changed = {k for k in trained if not torch.equal(trained[k], untouched[k])}
    assert changed == {"head.0.weight", "head.0.bias"}


def test_tracked_run_lands_in_sqlite_mlflow_with_tags_curves_and_model(toy, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_STAGE", "finetune_toy")  # as `dvc repro` runs a stage
    args = [a for a in train_args(toy, tmp_path / "run", "--epochs", "2") if a != "--no-track"]
    assert main([*args, "--stage", "finetune_toy"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["finetune_toy"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert {k: run.data.tags[k] for k in ("backbone", "stage", "mode", "dataset")} == {
        "backbone": "resnet18", "stage": "finetune_toy", "mode": "b", "dataset": "toy"}
    assert run.data.tags["git_commit"]
    client = mlflow.MlflowClient()
    for key in ("train_loss", "val_loss", "val_mae", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2]
    # relative to the checkout, so a moved copy still finds its artifacts
    assert run.info.artifact_uri == f"mlruns/{run.info.experiment_id}/{run.info.run_id}/artifacts"
    # the run's model is the registry's pickle-free pyfunc (conftest forbids unpickling) ...
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    (mlmodel,) = tmp_path.glob("mlruns/*/models/*/artifacts/MLmodel")
    assert "pickle" not in mlmodel.read_text()
    import yaml

    flavors = yaml.safe_load(mlmodel.read_text())["flavors"]
    assert flavors.keys() == {"python_function"}
    assert flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    # ... that refers to the stage's model.pt, which DVC keeps, instead of storing it again
    from agecascade.registry import checkpoint_reference

    checkpoint = tmp_path / "run" / "model.pt"
    assert checkpoint_reference(f"runs:/{run.info.run_id}/model")["path"] == "run/model.pt"
    stored = [p.stat().st_size for p in mlmodel.parent.rglob("*") if p.is_file()]
    assert max(stored) < min(1 << 20, checkpoint.stat().st_size)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    # ... and predicts what the stage's model.pt predicts through the training code
    from agecascade.calibrated import bias_line_of
    from agecascade.nets.checkpoint import load_checkpoint
    from agecascade.train.calibration import corrected_ages
    from agecascade.train.data import make_loader
    from agecascade.train.engine import predict

    images = np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
    network, meta = load_checkpoint(checkpoint)
    ages, probs = torch.tensor(meta["ages"]), []
    for view in (images, np.ascontiguousarray(images[:, :, ::-1])):  # served with flip TTA
        loader = make_loader(view, np.zeros(6, dtype=np.int64), np.arange(6), 6, False, 0, 0, False)
        logits, _, _ = predict(network, loader, Compute(torch.device("cpu")), SIZE, ages)
        probs.append(logits.softmax(dim=1))
    # read as predict reads them: at the classes' ages through the run's bias line
    read = torch.from_numpy(corrected_ages(np.asarray(meta["ages"]), bias_line_of(meta))).float()
    expected = (probs[0] + probs[1]) / 2 @ read
    np.testing.assert_allclose(model.unwrap_python_model().predict_crops(images), expected.numpy(),
                               atol=1e-4)
    from agecascade.registry import aliases, promote

    # promoted, it becomes a self-contained version that no longer needs the checkout's file
    assert promote("t-train", run_id=run.info.run_id) == 1
    assert aliases("t-train") == {"champion": 1}
    assert checkpoint_reference("models:/t-train@champion") is None
    checkpoint.unlink()
    champion = mlflow.pyfunc.load_model("models:/t-train@champion")
    np.testing.assert_allclose(champion.unwrap_python_model().predict_crops(images),
                               expected.numpy(), atol=1e-4)


def test_an_epoch_capped_at_n_batches_reads_n_batches_and_no_more():
    """`max_train_batches` (the grid's cap on a trial's cost) stops the epoch before it asks
    the loader for batch N + 1: that batch's wait would be counted in `data_wait_fraction`."""
    from agecascade.nets import create_model
    from agecascade.train.engine import TrainConfig, adam, train_one_epoch

    fetched = []

    class Batches:  # a loader that counts what the loop asked of it
        def __iter__(self):
            for step in range(5):
                fetched.append(step)
                yield torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8), torch.arange(4)

    model = create_model("resnet18", num_classes=10)
    config = TrainConfig(epochs=1, lr=1e-3, batch_size=4, patience=1, input_size=32, seed=0,
                         max_train_batches=2)
    metrics = train_one_epoch(model, Batches(), adam(model.parameters(), 1e-3),
                              Compute(torch.device("cpu")), config, epoch=0)
    assert fetched == [0, 1] and np.isfinite(metrics["train_loss"])
