"""Grad-CAM of the DEX age at 32 px: the target, the maps per backbone, hooks, the figure, its
config and stage."""
from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from agecascade import cli
from agecascade.config import from_args
from agecascade.data.manifest import make_row, to_frame
from agecascade.data.store import CROPS, MANIFEST, create_store
from agecascade.errors import UserError
from agecascade.explain.cam import (CELL_PX, TITLE_PX, DexAgeTarget, cam_maps, predict_ages,
                                    target_layer)
from agecascade.explain.figure import BEFORE, CamConfig, run, spread_over_ages
from agecascade.nets import create_model, dex_age, freeze_features
from agecascade.pipelines import cam as stage
from agecascade.train.data import IMAGENET, to_input

SIZE = 32
AGES = [10.0, 30.0, 50.0]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """32 px batches gain nothing from threads, and on a busy shared CPU OpenMP's waiting
    threads slow these tests down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def faces(n: int, seed: int = 0) -> np.ndarray:
    """Noisy uint8 RGB (n, SIZE, SIZE, 3) images with a bright square: some structure to locate."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 120, (n, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(n):
        top, left = rng.integers(0, SIZE // 2, 2)
        images[i, top:top + 12, left:left + 12] = 230
    return images


def network(backbone: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(backbone, len(AGES)).eval()


def hooks_left(model: torch.nn.Module) -> list[str]:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [f"{name or 'model'}.{kind}" for name, module in model.named_modules()
            for kind in kinds if getattr(module, kind, None)]


def test_target_is_the_dex_age_of_the_model_output():
    model = network("resnet18")
    images = faces(3)
    with torch.no_grad():
        logits = model(to_input(torch.from_numpy(images), SIZE, False))  # (3, K)
    target = DexAgeTarget(AGES)
    by_hand = torch.softmax(logits, 1) @ torch.tensor(AGES)
    per_sample = torch.stack([target(row) for row in logits])  # grad-cam calls it per sample
    assert per_sample.shape == (3,)
    torch.testing.assert_close(per_sample, by_hand)
    torch.testing.assert_close(per_sample, dex_age(logits, torch.tensor(AGES)))
    np.testing.assert_allclose(predict_ages(model, images, SIZE, IMAGENET, AGES, "cpu"),
                               by_hand.numpy(), rtol=1e-5)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2", "vgg16", "resnet50", "senet50"])
def test_maps_have_the_input_size_and_show_where(backbone):
    model = network(backbone)
    maps = cam_maps(model, faces(3), SIZE, IMAGENET, AGES, "cpu")
    assert maps.shape == (3, SIZE, SIZE) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    spread = np.ptp(maps.reshape(3, -1), axis=1)
    assert spread.max() > 0.5, f"{backbone}: every map is flat (a 1x1 layer?): {spread}"
    assert not hooks_left(model)


def test_the_last_block_is_1x1_at_32_px_so_an_earlier_one_is_explained():
    model = network("resnet18")
    blank = cam_maps(model, faces(3), SIZE, IMAGENET, AGES, "cpu", layer=model.cam_layer)
    assert (blank == 0).all()  # one cell, min-max scaled: no "where" at all
    assert target_layer(model, SIZE)[0] == "features.layer3"  # 2x2 at 32 px
    assert target_layer(model, 224)[0] == model.cam_layer_name == "features.layer4"  # 7x7
    assert target_layer(network("vgg16"), SIZE)[0] == "features.conv.29"  # conv5_3's ReLU
    with pytest.raises(UserError, match="no block before it reaches 64x64"):
        target_layer(model, SIZE, min_side=64)


def test_frozen_training_model_gets_maps_and_is_left_as_it_was():
    model = network("resnet18")
    freeze_features(model)
    model.train()
    maps = cam_maps(model, faces(3), SIZE, IMAGENET, AGES, "cpu")
    assert np.ptp(maps) > 0  # the input carries the gradient when the trunk's weights do not
    assert not hooks_left(model)
    norms = [m for m in model.features.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert model.training and not any(m.training for m in norms)  # frozen BatchNorm stays in eval
    assert not any(p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_errors_are_raised_and_leave_no_hooks():
    model = network("resnet18")
    with pytest.raises(ValueError, match="2 ages for a network with 3 outputs"):
        cam_maps(model, faces(2), SIZE, IMAGENET, AGES[:2], "cpu")
    with pytest.raises(ValueError, match="uint8 RGB"):
        cam_maps(model, faces(2).astype(np.float32), SIZE, IMAGENET, AGES, "cpu")
    with pytest.raises(ValueError, match="grads shape") as raised:  # a Linear has no map
        cam_maps(model, faces(2), SIZE, IMAGENET, AGES, "cpu", layer=model.head[0])
    # The traceback keeps the failed call's GradCAM alive, so its __del__ has not run: only an
    # explicit release removes the hooks from a model whose caller still holds the error.
    assert raised.traceback and not hooks_left(model)


# --- the stage --------------------------------------------------------------------------------

def write_prepared(folder: Path, ages: list[float]) -> Path:
    folder.mkdir(parents=True)
    store = create_store(folder / CROPS, len(ages), SIZE)
    store[:] = faces(len(ages), seed=1)
    store.flush()
    rows = [make_row(f"img{i:02d}.jpg", "toy", age=a, subject=f"s{i}") for i, a in enumerate(ages)]
    frame = to_frame(rows)
    frame["sha1"] = [f"{i:040x}" for i in range(len(ages))]
    frame.to_parquet(folder / MANIFEST, index=False)
    return folder


def write_checkpoint(path: Path, backbone: str, seed: int) -> Path:
    model = network(backbone, seed)
    meta = {"arch": model.arch, "backbone": backbone, "ages": AGES, "input_size": SIZE,
            "input_spec": asdict(IMAGENET), "mode": "b", "dataset": "toy"}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "meta": meta, "epoch": 0, "metrics": {}}, path)
    return path


def stage_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    stage.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cam")
    ages = [float(a) for a in (3, 70, 12, 25, 25, 40, 8, 55, 61, 33)]
    return (write_prepared(root / "toy", ages), write_checkpoint(root / "a.pt", "resnet18", 1),
            write_checkpoint(root / "b.pt", "resnet18", 2))


def test_stage_writes_a_png_of_the_fixed_grid_size(prepared, tmp_path):
    folder, first, second = prepared
    out = tmp_path / "reports" / "resnet18.png"
    args = stage_args("--manifest", str(folder), "--images", "4", "--backbone", "resnet18",
                      "--model", f"A={first}", "--model", f"A-B={second}", "--device", "cpu",
                      "--out", str(out), "--no-track")
    shown = run(from_args(CamConfig, args))
    with Image.open(out) as figure:
        assert figure.format == "PNG"
        assert figure.size == (4 * CELL_PX, 4 * (CELL_PX + TITLE_PX))  # face + before + A + A-B
    assert shown["true_ages"] == [3.0, 25.0, 55.0, 70.0]  # nearest to 3, 25.3, 47.7, 70
    assert [c["title"] for c in shown["columns"]] == [BEFORE, "A", "A-B"]
    assert shown["dataset"] == "toy"
    assert {c["layer"] for c in shown["columns"]} == {"features.layer3"}


def test_faces_are_spread_over_ages_whatever_the_row_order(prepared):
    manifest = pd.read_parquet(prepared[0] / MANIFEST)
    rows = spread_over_ages(manifest, 3, prepared[0])
    assert manifest["age"].iloc[rows].tolist() == [3.0, 33.0, 70.0]  # 3, 36.5, 70 asked
    shuffled = manifest.sample(frac=1.0, random_state=0).reset_index(drop=True)
    again = spread_over_ages(shuffled, 3, prepared[0])
    assert shuffled["path"].iloc[again].tolist() == manifest["path"].iloc[rows].tolist()
    twins = spread_over_ages(manifest, 10, prepared[0])  # both 25-year-olds, smaller path first
    assert sorted(manifest["path"].iloc[twins]) == sorted(manifest["path"])
    with pytest.raises(UserError, match="--images 11: .* has 10 faces with an age"):
        spread_over_ages(manifest, 11, prepared[0])


def test_stage_refuses_bad_models(prepared, tmp_path):
    folder, first, _ = prepared
    common = ("--manifest", str(folder), "--out", str(tmp_path / "x.png"), "--no-track",
              "--device", "cpu")
    with pytest.raises(UserError, match="expected TITLE=PATH"):
        stage.main(stage_args(*common, "--backbone", "resnet18", "--model", str(first)))
    with pytest.raises(UserError, match="no file"):
        stage.main(stage_args(*common, "--backbone", "resnet18", "--model", "A=missing.pt"))
    with pytest.raises(UserError, match="builds mobilenet_v2, but .* is a resnet18"):
        stage.main(stage_args(*common, "--backbone", "mobilenet_v2", "--model", f"A={first}"))
    assert not (tmp_path / "x.png").exists()


def test_tracked_stage_logs_the_figure_and_what_it_shows(prepared, tmp_path, monkeypatch):
    import mlflow

    folder, first, second = prepared
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "resnet18.png"
    assert stage.main(stage_args("--manifest", str(folder), "--images", "2", "--backbone",
                                 "resnet18", "--model", f"A={first}", "--model", f"B={second}",
                                 "--device", "cpu", "--out", str(out))) == 0
    mlflow.set_tracking_uri(uri)
    (logged,) = mlflow.search_runs(experiment_names=["cam"], output_format="list")
    assert logged.info.run_name == "resnet18-toy" and logged.data.tags["dataset"] == "toy"
    assert logged.data.params["models"] == f"A={first};B={second}"
    assert logged.data.params["input_size"] == str(SIZE)
    assert logged.data.params["cam_layer"] == "features.layer3"
    client = mlflow.MlflowClient()
    assert {f.path for f in client.list_artifacts(logged.info.run_id)} == {"resnet18.png", "cam.json"}
    shown = json.loads(Path(client.download_artifacts(logged.info.run_id, "cam.json",
                                                      str(tmp_path))).read_text())
    assert [c["title"] for c in shown["columns"]] == [BEFORE, "A", "B"]


# --- the config -------------------------------------------------------------------------------

REQUIRED = {"manifest": Path("fgnet"), "model": ("A=a.pt",), "backbone": "resnet18",
            "out": Path("cam.png")}


def test_parser_defaults_are_the_configs():
    """A default set in argparse alone, or a list or path lost in conversion, would differ."""
    args = stage_args("--manifest", "fgnet", "--model", "A=a.pt", "--backbone", "resnet18",
                      "--out", "cam.png")
    assert from_args(CamConfig, args) == CamConfig(**REQUIRED)


def test_dvc_yaml_command_keeps_every_model_column():
    """dvc.yaml names the columns with --model twice: both must arrive, in order (an option
    taking a list would keep only the last), with the params DVC resolves."""
    import yaml
    from dvc.repo import Repo

    (cmd,) = [s.cmd for s in Repo(str(REPO)).index.stages if s.addressing == "cam@vgg16"]
    argv = shlex.split(cmd)
    assert argv[:2] == ["agecascade", "cam"], cmd
    config = from_args(CamConfig, cli.build_parser("cam").parse_args(argv[1:]))
    assert config.columns == [("IMDB", Path("models/vgg16/imdb/model.pt")),
                              ("IMDB-AgeDB", Path("models/vgg16/agedb/model.pt"))]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert (config.images, config.min_map_side) == (params["cam"]["images"],
                                                    params["cam"]["min_map_side"])
    assert (config.backbone, config.seed) == ("vgg16", params["train"]["seed"])


@pytest.mark.parametrize("change, message", [
    ({"model": ()}, "at least one checkpoint"),
    ({"model": ("A=a.pt", "b.pt")}, "'b.pt': expected TITLE=PATH"),
    ({"images": 0}, "--images and --min-map-side must be >= 1"),
    ({"min_map_side": 0}, "--images and --min-map-side must be >= 1"),
    ({"input_size": -1}, "--input-size >= 0"),
    ({"pretrained": "faces"}, "--pretrained 'faces'"),
])
def test_bad_settings_are_refused_when_the_config_is_built(change, message):
    with pytest.raises(UserError, match=message):
        CamConfig(**(REQUIRED | change))
