"""ONNX export and its onnxruntime engine: PyTorch's ages, any batch, metadata that travels."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

from agecascade import cli  # noqa: E402
from agecascade.data.recipe import CropRecipe  # noqa: E402
from agecascade.errors import MissingInput, UserError  # noqa: E402
from agecascade.inference import onnx as agecascade_onnx  # noqa: E402
from agecascade.inference.onnx import (MAX_AGE_DIFF, OnnxEngine, OnnxParityError,  # noqa: E402
                                       export_onnx, probe_crops)
from agecascade.inference.predictor import Predictor  # noqa: E402
from agecascade.nets import create_model  # noqa: E402
from agecascade.nets.checkpoint import input_spec, load_checkpoint  # noqa: E402
from agecascade.nets.dex import dex_age  # noqa: E402
from agecascade.nets.weights import VGGFACE2_CAFFE  # noqa: E402
from agecascade.train.data import to_input  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
AGES = [float(a) for a in range(10, 70, 4)]
SIZE = 32
RECIPE = CropRecipe(margin=0.25, box_policy="image", size=40)


def write_checkpoint(path: Path, seed: int, crop: CropRecipe | None = RECIPE) -> Path:
    """An untrained resnet18 in the stage format, in the Caffe pixel convention (BGR, 0..255,
    mean-subtracted) so the graph's normalisation is not the ImageNet one of most tests. Its
    output layer is scaled down so that the softmax over those large inputs is neither
    saturated (every crop the same age, hiding any difference) nor flat."""
    torch.manual_seed(seed)
    model = create_model("resnet18", len(AGES))
    model.output_layer.weight.data.mul_(0.03)
    meta = {"arch": model.arch, "ages": AGES, "input_spec": asdict(VGGFACE2_CAFFE),
            "input_size": SIZE, "backbone": "resnet18", "mode": "b", "dataset": "agedb",
            "temperature": 1.7, "bias_line": [0.9, 8.0]}
    if crop is not None:
        meta["crop"] = asdict(crop)
    torch.save({"model": model.state_dict(), "meta": meta, "epoch": 0, "metrics": {}}, path)
    return path


def torch_ages(checkpoint: Path, crops: np.ndarray) -> np.ndarray:
    """The DEX ages of uint8 crops as the training code computes them, without the export."""
    model, meta = load_checkpoint(checkpoint)
    with torch.no_grad():
        x = to_input(torch.from_numpy(crops), meta["input_size"], False, input_spec(meta))
        return dex_age(model(x), torch.tensor(meta["ages"])).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("onnx")
    checkpoint = write_checkpoint(root / "model.pt", seed=0)
    out = root / "models" / "model.onnx"
    facts = export_onnx(checkpoint, out)
    return SimpleNamespace(root=root, checkpoint=checkpoint, out=out, facts=facts,
                           engine=OnnxEngine(out, threads=1))


def test_export_matches_pytorch_on_100_crops(exported):
    facts = exported.facts
    assert facts["n_checked"] == 100 and facts["opset"] == 18
    assert facts["max_abs_diff_age"] <= MAX_AGE_DIFF
    assert facts["size_bytes"] == exported.out.stat().st_size
    assert sorted(p.name for p in exported.out.parent.iterdir()) == ["model.onnx"]  # no temp left

    crops = probe_crops(SIZE, n=100, seed=7)  # other crops than the export checked itself on
    expected = torch_ages(exported.checkpoint, crops)
    got = exported.engine.probs(crops) @ exported.engine.ages
    assert np.ptp(expected) > 1.0, "the crops must get different ages for the check to mean much"
    assert np.abs(got - expected).max() <= MAX_AGE_DIFF


def test_graph_declares_uint8_nhwc_and_dynamic_batch(exported):
    model = onnx.load(str(exported.out), load_external_data=False)
    (crops,) = model.graph.input
    assert crops.name == "crops" and crops.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = crops.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [SIZE, SIZE, 3]
    assert [o.name for o in model.graph.output] == ["age", "probs"]


def test_any_batch_size_gives_the_same_rows(exported):
    crops = probe_crops(SIZE, n=8, seed=3)
    whole = exported.engine.probs(crops)
    assert exported.engine.probs(crops[:1]).shape == (1, len(AGES))
    np.testing.assert_allclose(exported.engine.probs(crops[:1]), whole[:1], atol=1e-6)
    np.testing.assert_allclose(exported.engine.probs(crops[1:]), whole[1:], atol=1e-6)  # 7
    assert exported.engine.probs(crops[:0]).shape == (0, len(AGES))
    np.testing.assert_allclose(whole.sum(axis=1), 1.0, atol=1e-5)


def test_metadata_round_trip(exported):
    engine = exported.engine
    assert engine.name == "onnx" and engine.size == SIZE and not engine.resizes
    assert engine.ages.dtype == np.float32 and engine.ages.tolist() == AGES
    assert engine.recipe == RECIPE
    assert (engine.arch, engine.backbone) == ("resnet18", "resnet18")
    assert engine.temperature == 1.7  # the interval is calibrated as the checkpoint's
    assert engine.bias_line == (0.9, 8.0)  # and its ages are read through the same line


def test_a_file_exported_before_calibration_reads_as_uncalibrated(exported, tmp_path):
    """Files exported before training fitted a temperature and a bias line lack both keys:
    the engine must read them as a checkpoint of that age is read, not fail on them."""
    model = onnx.load(str(exported.out))
    calibration = {agecascade_onnx.KEY + name for name in ("temperature", "bias_line")}
    kept = [p for p in model.metadata_props if p.key not in calibration]
    assert len(kept) == len(model.metadata_props) - 2
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(tmp_path / "old.onnx"))
    old = OnnxEngine(tmp_path / "old.onnx", threads=1)
    assert old.temperature == 1.0 and old.bias_line == (1.0, 0.0)


def test_the_graphs_age_is_the_bias_corrected_one_predict_gives(exported):
    crops = probe_crops(SIZE, n=6, seed=11)
    session = onnxruntime.InferenceSession(str(exported.out), providers=["CPUExecutionProvider"])
    age, probs = session.run(["age", "probs"], {"crops": crops})
    engine = exported.engine
    corrected = (engine.ages.astype(np.float64) - 8.0) / 0.9  # 2.2 .. 64.4: none clipped
    np.testing.assert_allclose(age, probs @ corrected, atol=1e-3)
    np.testing.assert_allclose(age, Predictor(engine, flip=False).estimate(crops)[0]["age"],
                               atol=1e-3)
    assert np.abs(age - probs @ engine.ages).min() > 1.0  # the raw DEX age is another number


def test_engine_refuses_crops_it_was_not_made_for(exported):
    with pytest.raises(UserError, match=r"\(B, 32, 32, 3\)"):
        exported.engine.probs(np.zeros((2, 40, 40, 3), np.uint8))
    with pytest.raises(UserError, match="uint8"):
        exported.engine.probs(np.zeros((2, SIZE, SIZE, 3), np.float32))


def test_foreign_and_broken_files_are_refused(tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "other",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    other = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]),
              str(other))
    with pytest.raises(UserError, match="not an agecascade ONNX model"):
        OnnxEngine(other)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        OnnxEngine(garbage)
    with pytest.raises(MissingInput):
        OnnxEngine(tmp_path / "absent.onnx")


def test_missing_runtime_names_the_extra(exported, monkeypatch):
    real = agecascade_onnx.importlib.import_module

    def without_onnxruntime(name: str, *args):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args)

    monkeypatch.setattr(agecascade_onnx.importlib, "import_module", without_onnxruntime)
    with pytest.raises(UserError, match=r"agecascade\[onnx\]"):
        OnnxEngine(exported.out)


def test_parity_failure_is_a_bug_and_writes_nothing(exported, monkeypatch, tmp_path):
    honest = agecascade_onnx._torch_outputs

    def off_by_a_year(graph, crops):
        ages, probs = honest(graph, crops)
        return ages + 1.0, probs

    monkeypatch.setattr(agecascade_onnx, "_torch_outputs", off_by_a_year)
    out = tmp_path / "bad.onnx"
    with pytest.raises(OnnxParityError, match="differ from PyTorch"):
        export_onnx(exported.checkpoint, out, check_crops=probe_crops(SIZE, n=4))
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary sibling


def test_opset_below_the_exporter_is_refused(exported, tmp_path):
    with pytest.raises(UserError, match="opset 17"):
        export_onnx(exported.checkpoint, tmp_path / "m.onnx", opset=17)


def test_engine_module_loads_neither_torch_nor_mlflow():
    """`predict --model x.onnx` must not pay for importing torch, torchvision and MLflow."""
    code = ("import sys, agecascade.inference.onnx; "
            "print(sorted(m for m in ('torch', 'mlflow', 'onnxruntime') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=REPO).stdout
    assert loaded.strip() == "[]"


def write_prepared(folder: Path, n: int, size: int) -> Path:
    """A `prepare`-shaped folder: a manifest and its crop store."""
    folder.mkdir(parents=True)
    pd.DataFrame({"path": [f"{i}.jpg" for i in range(n)], "age": 30.0}).to_parquet(
        folder / "manifest.parquet")
    np.save(folder / "crops.npy", probe_crops(size, n=n, seed=5))
    return folder


def test_export_command_end_to_end(tmp_path, capsys):
    """`agecascade export` on a checkpoint without a recipe, checked on a prepared folder's
    crops stored at another size than the network's."""
    checkpoint = write_checkpoint(tmp_path / "model.pt", seed=1, crop=None)
    prepared = write_prepared(tmp_path / "prepared", n=12, size=48)
    out = tmp_path / "model.onnx"
    with pytest.warns(UserWarning, match="no crop recipe"):
        code = cli.main(["export", "--model", str(checkpoint), "--format", "onnx", "--out",
                         str(out), "--check-crops", str(prepared)])
    assert code == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["n_checked"] == 12 and facts["max_abs_diff_age"] <= MAX_AGE_DIFF
    assert OnnxEngine(out).recipe == CropRecipe(size=SIZE)


def test_export_command_refuses_a_missing_model(tmp_path, capsys):
    code = cli.main(["export", "--model", str(tmp_path / "absent.pt"), "--out",
                     str(tmp_path / "m.onnx")])
    assert code == 2 and "no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_logged_onnx_model_loads_back_without_pickle(exported, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    import mlflow.onnx

    monkeypatch.chdir(tmp_path)  # artifacts land in ./mlruns
    previous_uri = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # set_tracking_uri sets it too: undone after
    try:
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run():
            info = agecascade_onnx.log_onnx_model(exported.checkpoint)
        loaded = mlflow.onnx.load_model(info.model_uri)
        assert {p.key: p.value for p in loaded.metadata_props}["agecascade.format"] == "1"
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
        assert "pickle" not in (local / "MLmodel").read_text()
        crops = probe_crops(SIZE, n=3, seed=9)
        served = mlflow.pyfunc.load_model(info.model_uri).predict(crops)
        np.testing.assert_allclose(served["probs"], exported.engine.probs(crops), atol=1e-6)
    finally:
        mlflow.set_tracking_uri(previous_uri)
