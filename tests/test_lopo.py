"""FG-NET leave-one-person-out on a tiny synthetic FG-NET-style store, on the CPU."""
from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import agecascade.evaluation.lopo as lopo
from agecascade.cli import build_parser, main
from agecascade.config import from_args
from agecascade.data.manifest import make_row, to_frame
from agecascade.data.store import CROPS, MANIFEST, create_store, load_prepared
from agecascade.errors import UserError
from agecascade.evaluation.lopo import LopoConfig, run_lopo, settings_key, summarise, train_heads
from agecascade.nets import create_model
from agecascade.nets.checkpoint import load_checkpoint
from agecascade.train.compute import Compute
from agecascade.train.data import IMAGENET, LabelSpace

SIZE = 32
SUBJECTS = 8
REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def recipe(out: Path = Path("out"), manifest: Path = Path("fgnet"), **settings) -> LopoConfig:
    """A config for the library functions: starting from a backbone, unless ``model`` is given."""
    start = {} if "model" in settings else {"backbone": "resnet18"}
    return LopoConfig(manifest=manifest, out=out, **({"input_size": SIZE} | start | settings))


def write_fgnet_like(folder: Path, per_subject: int = 6, seed: int = 0) -> Path:
    """Subjects photographed at several ages; brightness encodes age, so a head can learn it."""
    rng = np.random.default_rng(seed)
    rows, pixels = [], []
    for s in range(SUBJECTS):
        for k, age in enumerate(np.sort(rng.integers(0, 60, per_subject))):
            level = 40 + 3 * age
            pixels.append(np.clip(rng.normal(level, 10, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8))
            rows.append(make_row(f"{s:03d}A{age:02d}_{k}.JPG", "fgnet", age=float(age), subject=f"{s:03d}"))
    folder.mkdir(parents=True)
    store = create_store(folder / CROPS, len(rows), SIZE)
    store[:] = np.stack(pixels)
    store.flush()
    to_frame(rows).to_parquet(folder / MANIFEST, index=False)
    return folder


def write_init(path: Path, ages: tuple[float, ...]) -> Path:
    """A stage checkpoint as `agecascade train` writes it, from an untrained resnet18."""
    torch.manual_seed(0)
    model = create_model("resnet18", len(ages))
    meta = {"arch": model.arch, "backbone": "resnet18", "ages": list(ages),
            "input_spec": {"channels": "RGB", "value_range": 1.0, "mean": list(IMAGENET.mean),
                           "std": list(IMAGENET.std)},
            "input_size": SIZE, "mode": "b", "dataset": "toy",
            "temperature": 2.0, "bias_line": [0.8, 5.0]}  # fitted on the toy run's own split
    torch.save({"model": model.state_dict(), "meta": meta, "epoch": 0, "metrics": {}}, path)
    return path


@pytest.fixture(scope="module")
def fgnet(tmp_path_factory) -> Path:
    return write_fgnet_like(tmp_path_factory.mktemp("fgnet") / "prepared")


@pytest.fixture(scope="module")
def init(tmp_path_factory) -> Path:
    return write_init(tmp_path_factory.mktemp("init") / "model.pt", tuple(float(a) for a in range(100)))


def lopo_args(fgnet: Path, init: Path, out: Path, mode: str, *extra: str) -> list[str]:
    return ["lopo", "--manifest", str(fgnet), "--model", str(init), "--mode", mode,
            "--device", "cpu", "--no-track", "--out", str(out), "--batch", "8", *extra]


@pytest.mark.parametrize("train_blocks", ["0", "2"])
def test_no_fold_trains_on_its_own_subject(fgnet, init, tmp_path, monkeypatch, train_blocks):
    seen: list[np.ndarray] = []
    real = lopo.train_fold
    subject_of = pd.read_parquet(fgnet / MANIFEST)["subject"].astype(str).to_numpy()
    starts: list[float] = []

    def spy(model, start, inputs, labels, rows, *args, **kwargs):
        seen.append(set(subject_of[rows]))
        starts.append(sum(float(v.double().sum()) for v in start.values()))
        return real(model, start, inputs, labels, rows, *args, **kwargs)

    monkeypatch.setattr(lopo, "train_fold", spy)
    assert main(lopo_args(fgnet, init, tmp_path / "b", "b", "--epochs", "1",
                          "--train-blocks", train_blocks)) == 0
    predictions = pd.read_csv(tmp_path / "b" / "predictions.csv", dtype={"subject": str})
    subjects = sorted(predictions["subject"].unique())
    assert len(seen) == SUBJECTS + 1  # one model per held-out subject, then the final one
    for subject, trained_on in zip(subjects, seen):
        assert subject not in trained_on and len(trained_on) == SUBJECTS - 1
    assert seen[-1] == set(subjects)  # the deployable model sees everyone
    # every fold starts from the checkpoint, never from the previous fold's model (which was
    # trained on this fold's subject)
    assert len(set(starts)) == 1
    assert len(predictions) == SUBJECTS * 6 and predictions["path"].is_unique


def test_mode_a_learns_and_writes_a_loadable_model(fgnet, init, tmp_path):
    out = tmp_path / "a"
    assert main(lopo_args(fgnet, init, out, "a", "--epochs", "30", "--lr", "0.01")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ages = pd.read_parquet(fgnet / MANIFEST)["age"]
    baseline = (ages - ages.median()).abs().mean()
    assert metrics["n_folds"] == SUBJECTS and metrics["n_images"] == len(ages)
    assert metrics["mae"] < 0.6 * baseline, (metrics["mae"], baseline)
    assert metrics["mae_ci95_low"] < metrics["mae"] < metrics["mae_ci95_high"]
    folds = pd.read_csv(out / "folds.csv")
    assert len(folds) == SUBJECTS and (folds["n"] == 6).all()
    assert not (out / lopo.FOLDS_DIR).exists()  # the resume cache goes once the run is complete
    model, meta = load_checkpoint(out / "model.pt")
    assert meta["mode"] == "a" and meta["dataset"] == "fgnet" and len(meta["ages"]) == 100
    assert not {"temperature", "bias_line"} & meta.keys()  # the init's calibration is not its own
    assert main(["evaluate", "--model", str(out / "model.pt"), "--manifest", str(fgnet),
                 "--device", "cpu"]) == 0


def test_partial_fine_tune_learns_and_changes_only_the_last_blocks(fgnet, init, tmp_path):
    out = tmp_path / "b-last-block"
    assert main(lopo_args(fgnet, init, out, "b", "--train-blocks", "1", "--epochs", "30",
                          "--lr", "0.01")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ages = pd.read_parquet(fgnet / MANIFEST)["age"]
    assert metrics["mae"] < 0.6 * (ages - ages.median()).abs().mean()
    start = torch.load(init, weights_only=True)["model"]
    final = torch.load(out / "model.pt", weights_only=True)["model"]
    changed = {k.split(".")[1] for k in start if not torch.equal(start[k], final[k])}
    assert changed == {"layer4", "0"}, changed  # resnet18's last block and the head's Linear


def test_heads_trained_together_equal_heads_trained_alone():
    """The vmapped multi-fold trainer is an optimisation, not a different algorithm."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    features = torch.randn(2, 40, 6)
    labels = torch.randint(0, 4, (40,))
    masks = torch.rand(3, 40) > 0.3
    config = recipe(mode="a", epochs=3, lr=0.01, batch=8)
    together = train_heads(head, features, labels, masks, config, seed=5)
    for f in range(3):
        alone = train_heads(head, features, labels, masks[f:f + 1], config, seed=5)[0]
        for (name, a), b in zip(alone.state_dict().items(), together[f].state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)


def test_an_interrupted_run_trains_only_the_missing_folds(fgnet, init, tmp_path):
    manifest, crops = load_prepared(fgnet)
    space = LabelSpace(tuple(float(a) for a in range(100)))
    config = recipe(tmp_path, fgnet, mode="b", epochs=1, batch=8)
    model = create_model("resnet18", space.size)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    done: list[str] = []

    def crash_after_three(subject, frame):
        done.append(subject)
        if len(done) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_lopo(model, start, IMAGENET, space, manifest, crops, config, Compute(CPU), "settings-1",
                 crash_after_three)
    first = list(done)
    predictions, _ = run_lopo(model, start, IMAGENET, space, manifest, crops, config, Compute(CPU),
                              "settings-1", lambda subject, frame: done.append(subject))
    assert done[3:] == sorted(set(predictions["subject"]) - set(first))  # no fold trained twice
    # other settings must not reuse those folds
    again: list[str] = []
    run_lopo(model, start, IMAGENET, space, manifest, crops, config, Compute(CPU), "settings-2",
             lambda subject, frame: again.append(subject))
    assert len(again) == SUBJECTS


def test_summary_matches_hand_computed_figures():
    predictions = pd.DataFrame({"subject": ["a", "a", "b", "c"], "age": [10.0, 20.0, 30.0, 40.0],
                                "predicted": [12.0, 20.0, 24.0, 41.0]})
    summary = summarise(predictions)
    assert summary["mae"] == pytest.approx(9 / 4)
    assert summary["median_ae"] == pytest.approx(1.5)
    assert summary["fold_mae_median"] == pytest.approx(1.0)  # folds: a 1, b 6, c 1
    assert summary["mean_signed_error"] == pytest.approx(-3 / 4)
    assert summary["n_folds"] == 3
    # the median of the other subjects' images per held-out subject: a gets median(30, 40) = 35
    # (errors 25, 15), b median(10, 20, 40) = 20 (10), c median(10, 20, 30) = 20 (20)
    assert summary["mae_median_baseline"] == pytest.approx((25 + 15 + 10 + 20) / 4)
    # not the median of all images (25), which would have seen the held-out subject's ages
    everyone = (predictions["age"] - predictions["age"].median()).abs().mean()
    assert everyone == pytest.approx(10.0) != summary["mae_median_baseline"]


def test_a_manifest_without_subjects_is_refused(fgnet, init, tmp_path, capsys):
    broken = tmp_path / "prepared"
    broken.mkdir()
    manifest = pd.read_parquet(fgnet / MANIFEST)
    manifest.loc[0, "subject"] = None
    manifest.to_parquet(broken / MANIFEST, index=False)
    (broken / CROPS).symlink_to(fgnet / CROPS)
    assert main(lopo_args(broken, init, tmp_path / "out", "b")) == 2
    assert "needs a subject for every image" in capsys.readouterr().err


def test_train_blocks_in_mode_a_is_refused(fgnet, init, tmp_path, capsys):
    assert main(lopo_args(fgnet, init, tmp_path / "out", "a", "--train-blocks", "2")) == 2
    assert "is for modes b and c" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_settings_key_follows_content_not_paths(fgnet, init, tmp_path):
    from agecascade.train.cascade import read_init

    def key(start: dict | None = None, **settings) -> str:
        config = recipe(**({"out": tmp_path / "out", "manifest": fgnet, "model": init,
                            "mode": "b", "epochs": 1, "batch": 8} | settings))
        return settings_key(config, start if start is not None else read_init(config.model), CPU)

    store = shutil.copytree(fgnet, tmp_path / "store")
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(init, moved)
    base = key()
    # copies (the same content), and settings that change no result: the same key
    assert key(manifest=store, model=moved) == base
    assert key(out=tmp_path / "other", device="cpu") == base
    assert key(epochs=2) != base
    assert key(head_params_budget=1000) != base  # mode a trains heads in groups of this size
    changed = read_init(moved)
    changed["model"]["features.conv1.weight"][0, 0, 0, 0] += 1.0
    assert key(changed) != base
    assert settings_key(recipe(tmp_path, fgnet, model=init, mode="b", epochs=1, batch=8),
                        read_init(init), torch.device("meta")) != base  # another device type
    crops = np.load(store / CROPS, mmap_mode="r+")
    crops[0, 0, 0, 0] ^= 1
    crops.flush()
    assert key(manifest=store) != base
    # mode a starts from a backbone's pretrained weights: the choice and the file's content count
    weights = tmp_path / "vggface2.pth"
    weights.write_bytes(b"face weights")

    def mode_a(pretrained: str = "none", weights: Path | str = "") -> str:
        return settings_key(recipe(tmp_path, fgnet, mode="a", pretrained=pretrained,
                                   weights=str(weights)), None, CPU)

    plain, face = mode_a(), mode_a("vggface2", weights)
    assert len({plain, face, mode_a("imagenet")}) == 3
    shutil.copy(weights, tmp_path / "copy.pth")
    assert mode_a("vggface2", tmp_path / "copy.pth") == face
    weights.write_bytes(b"other face weights")
    assert mode_a("vggface2", weights) != face


def test_a_fold_whose_csv_write_failed_is_trained_again(fgnet, tmp_path, monkeypatch):
    """A fold file is whole or absent: a write cut short must not count as a finished fold."""
    manifest, crops = load_prepared(fgnet)
    space = LabelSpace(tuple(float(a) for a in range(100)))
    config = recipe(tmp_path, fgnet, mode="a", epochs=1, batch=8)
    torch.manual_seed(0)
    model = create_model("resnet18", space.size)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    real_to_csv = pd.DataFrame.to_csv
    writes: list[str] = []

    def cut_short(self, target=None, *args, **kwargs):
        writes.append(str(getattr(target, "name", target)))
        if len(writes) == 3:  # the third fold: half a file, then the disk is full
            text = real_to_csv(self, None, *args, **kwargs)
            handle = target if hasattr(target, "write") else open(target, "w")
            handle.write(text[: len(text) // 2].encode() if "b" in getattr(handle, "mode", "")
                         else text[: len(text) // 2])
            handle.flush()
            raise OSError("No space left on device")
        return real_to_csv(self, target, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", cut_short)
    with pytest.raises(OSError):
        run_lopo(model, start, IMAGENET, space, manifest, crops, config, Compute(CPU), "key", None)
    monkeypatch.setattr(pd.DataFrame, "to_csv", real_to_csv)
    assert len(list((tmp_path / lopo.FOLDS_DIR).glob("*.csv"))) == 2
    retrained: list[str] = []
    predictions, _ = run_lopo(model, start, IMAGENET, space, manifest, crops, config, Compute(CPU), "key",
                              lambda subject, frame: retrained.append(subject))
    subjects = sorted(predictions["subject"].unique())
    assert retrained == subjects[2:]  # the cut-short fold among them
    assert len(predictions) == SUBJECTS * 6 and predictions["path"].is_unique


# --- the config -----------------------------------------------------------------------------

def test_parser_defaults_are_the_configs():
    """A default set in argparse alone, or a path or None lost in conversion, would differ."""
    args = build_parser("lopo").parse_args(["lopo", "--manifest", "fgnet", "--model", "m.pt",
                                            "--mode", "b", "--out", "out"])
    assert from_args(LopoConfig, args) == LopoConfig(manifest=Path("fgnet"), model=Path("m.pt"),
                                                     mode="b", out=Path("out"))
    assert args.stage == "fgnet_lopo" and not args.no_track


def test_dvc_yaml_commands_parse_into_the_params():
    """Each `lopo_*` command as DVC resolves it from params.yaml: every option still exists
    and carries the value params.yaml gives it."""
    import yaml
    from dvc.repo import Repo

    commands = {s.addressing: s.cmd for s in Repo(str(REPO)).index.stages if s.cmd}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    shared = params["train"]
    for backbone, item in params["backbones"].items():
        for mode, start in (("a", None), ("b", "imdb"), ("c", "agedb")):
            argv = shlex.split(commands[f"lopo_{mode}@{backbone}"])
            assert argv[:2] == ["agecascade", "lopo"], argv
            config = from_args(LopoConfig, build_parser("lopo").parse_args(argv[1:]))
            wanted = params["lopo"]["a" if mode == "a" else "finetune"]
            assert config.mode == mode and config.manifest == Path("prepared/fgnet")
            assert config.out == Path(f"models/{backbone}/fgnet_{mode}")
            assert (config.epochs, config.batch) == (wanted["epochs"], wanted["batch"])
            assert (config.input_size, config.seed, config.device) == \
                (shared["input_size"], shared["seed"], shared["device"])
            if mode == "a":
                assert (config.backbone, config.pretrained, config.weights, config.lr) == \
                    (backbone, item["pretrained"], item["weights"], wanted["lr"])
                assert config.model is None
            else:
                assert config.model == Path(f"models/{backbone}/{start}/model.pt")
                assert (config.lr, config.train_blocks) == (item["target_lr"],
                                                            wanted["train_blocks"])


@pytest.mark.parametrize("change, message", [
    ({"model": Path("m.pt"), "backbone": "resnet18"}, "give one of --model"),
    ({"backbone": ""}, "give one of --model"),
    ({"mode": "d"}, "--mode 'd'"),
    ({"mode": "a", "train_blocks": 2}, "is for modes b and c"),
    ({"input_size": 0}, "--input-size is needed"),
    ({"pretrained": "vggface2"}, "--weights goes with --pretrained vggface2"),
    ({"batch": 0}, "--batch and --head-params-budget must be >= 1"),
    ({"train_blocks": -1}, "--train-blocks and --input-size >= 0"),
])
def test_bad_settings_are_refused_when_the_config_is_built(change, message):
    with pytest.raises(UserError, match=re.escape(message)):
        recipe(**({"mode": "b"} | change))


def test_a_checkpoint_brings_its_own_weights_and_input_size(init):
    with pytest.raises(UserError, match="--pretrained and --weights go with --backbone"):
        LopoConfig(manifest=Path("fgnet"), model=init, pretrained="imagenet", mode="b",
                   out=Path("out"))
    assert LopoConfig(manifest=Path("fgnet"), model=init, mode="b", out=Path("out")).input_size == 0
