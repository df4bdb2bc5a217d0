"""params.yaml is the Hydra composition of conf/ (demo profile); the paper profile is the thesis's."""
from __future__ import annotations

import configparser
from pathlib import Path

import yaml
from dvc.utils.hydra import compose_and_dump

REPO = Path(__file__).resolve().parents[1]


def compose(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(REPO / "conf"), None, "config", "", list(overrides))
    return yaml.safe_load(out.read_text())


def test_dvc_composes_params_with_hydra():
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    assert config.get("hydra", "enabled") == "true"  # else `dvc exp run -S profile=...` is a no-op


def test_committed_params_are_the_demo_profile(tmp_path):
    # `dvc repro` uses params.yaml as committed; it must not drift from conf/
    assert yaml.safe_load((REPO / "params.yaml").read_text()) == compose(tmp_path)
    assert compose(tmp_path, "profile=demo") == compose(tmp_path)


def test_paper_profile_has_the_thesis_values(tmp_path):
    paper = compose(tmp_path, "profile=paper")
    assert paper["train"]["input_size"] == 224 and paper["prepare"]["size"] == 224
    assert paper["tune"]["lrs"] == [0.1, 0.01, 0.001, 0.0001]
    assert paper["tune"]["batches"] == [12, 32, 48, 64]
    assert (paper["finetune_imdb"]["epochs"], paper["finetune_imdb"]["patience"]) == (60, 5)
    assert paper["finetune_agedb"] | {} == {"epochs": 30, "batch": 32, "patience": 3,
                                             "val_fraction": 0.2}
    assert {k: v["agedb_lr"] for k, v in paper["backbones"].items()} == \
        {"vgg16": 0.0001, "resnet50": 0.0001, "senet50": 0.0001}
    assert {k: v["target_lr"] for k, v in paper["backbones"].items()} == \
        {"vgg16": 0.0001, "resnet50": 0.001, "senet50": 0.01}
    assert all(b["pretrained"] == "vggface2" for b in paper["backbones"].values())
    assert paper["lopo"]["a"] == {"epochs": 20, "lr": 0.001, "batch": 48}
    assert paper["lopo"]["finetune"] == {"train_blocks": 0, "epochs": 20, "batch": 16}
    # every section of the demo exists in the paper profile: a switch changes values, not shape
    demo = compose(tmp_path)
    assert set(paper) == set(demo)
    assert all(set(paper[k]) == set(demo[k]) for k in demo if isinstance(demo[k], dict))


def test_adience_defaults_are_the_paper_profile(tmp_path):
    """One place per setting: the stage's defaults are the thesis's, as the paper profile says."""
    from agecascade.evaluation.adience import AdienceConfig

    paper = compose(tmp_path, "profile=paper")
    defaults = AdienceConfig(manifest=tmp_path, init=tmp_path, out=tmp_path)
    assert {k: paper["adience"][k] for k in ("mode", "train_blocks", "epochs", "batch",
                                              "patience", "val_fraction")} == \
        {k: getattr(defaults, k) for k in ("mode", "train_blocks", "epochs", "batch", "patience",
                                           "val_fraction")}
    assert tuple(int(g) for g in paper["adience"]["groups"].split()) == defaults.groups
    assert {b["adience_lr"] for b in paper["backbones"].values()} == {defaults.lr}
