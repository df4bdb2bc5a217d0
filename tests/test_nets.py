"""The age networks: shapes, DEX, parameter counts, init, mode (a) freezing, and weight loading.

Published weights files are not on CI machines, so each layout is rebuilt here as a synthetic
file with the real key names and shapes (written from the public layouts, not from our own
modules) and random values, then loaded through create_model and compared value by value.
"""
from __future__ import annotations

import math
import os
import pickle
import socket
import struct
import urllib.request

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from torch import nn

from agecascade.nets import AgeNet, create_model, dex_age, freeze_features
from agecascade.nets.weights import VGG_FACE_DAG, VGGFACE2_CAFFE, read_weights_file
from conftest import SHARED

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# Published layouts, written out independently of the package


def _bn(name: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.{p}": (channels,) for p in ("weight", "bias", "running_mean", "running_var")}


def vggface2_resnet_layout(se: bool) -> dict[str, tuple[int, ...]]:
    """Key -> shape of resnet50_ft / senet50_ft (cydonia999/VGGFace2-pytorch models/resnet.py,
    models/senet.py): SE gate convs ``conv4`` / ``conv5`` with bias; 8631-way ``fc``."""
    shapes = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        out = planes * 4
        for b in range(blocks):
            p = f"layer{stage}.{b}."
            shapes |= {p + "conv1.weight": (planes, inplanes, 1, 1), **_bn(p + "bn1", planes),
                       p + "conv2.weight": (planes, planes, 3, 3), **_bn(p + "bn2", planes),
                       p + "conv3.weight": (out, planes, 1, 1), **_bn(p + "bn3", out)}
            if se:
                shapes |= {p + "conv4.weight": (out // 16, out, 1, 1),
                           p + "conv4.bias": (out // 16,),
                           p + "conv5.weight": (out, out // 16, 1, 1),
                           p + "conv5.bias": (out,)}
            if b == 0:
                shapes |= {p + "downsample.0.weight": (out, inplanes, 1, 1),
                           **_bn(p + "downsample.1", out)}
            inplanes = out
    return shapes | {"fc.weight": (8631, 2048), "fc.bias": (8631,)}


# vgg_face_dag.py (Oxford VGG-Face, MatConvNet -> PyTorch): name, in, out; and where torchvision's
# vgg16().features holds the same conv.
VGG_FACE_CONVS = [("conv1_1", 3, 64), ("conv1_2", 64, 64), ("conv2_1", 64, 128),
                  ("conv2_2", 128, 128), ("conv3_1", 128, 256), ("conv3_2", 256, 256),
                  ("conv3_3", 256, 256), ("conv4_1", 256, 512), ("conv4_2", 512, 512),
                  ("conv4_3", 512, 512), ("conv5_1", 512, 512), ("conv5_2", 512, 512),
                  ("conv5_3", 512, 512)]
TORCHVISION_CONV_INDEX = dict(zip([c[0] for c in VGG_FACE_CONVS],
                                  (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)))
VGG_FACE_FC = {"fc6.weight": (4096, 25088), "fc6.bias": (4096,), "fc7.weight": (4096, 4096),
               "fc7.bias": (4096,), "fc8.weight": (2622, 4096), "fc8.bias": (2622,)}


def random_arrays(layout: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    arrays = {k: RNG.standard_normal(shape, dtype=np.float32) for k, shape in layout.items()}
    for key in arrays:
        if key.endswith("running_var"):
            arrays[key] = np.abs(arrays[key]) + 0.5
    return arrays


def placeholders(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Right shapes, one stored number each (stride 0): for tensors whose values never matter."""
    return {k: torch.zeros(1).expand(shape) for k, shape in layout.items()}


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` and numpy's pre-2.0 module name, as the published .pkl
    files (made with Python 2) do."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def write_python2_pkl(path, arrays: dict[str, np.ndarray]):
    with path.open("wb") as handle:
        Python2Pickler(handle, protocol=2).dump(arrays)
    data = path.read_bytes()
    assert b"cnumpy._core.multiarray\n" in data  # protocol 2 names globals as text lines
    path.write_bytes(data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    return path


@pytest.fixture(scope="module")
def resnet_arrays() -> dict[str, np.ndarray]:
    return random_arrays(vggface2_resnet_layout(se=False))


@pytest.fixture(scope="module")
def senet_arrays() -> dict[str, np.ndarray]:
    return random_arrays(vggface2_resnet_layout(se=True))


def assert_trunk_equals(model: AgeNet, arrays: dict[str, np.ndarray]) -> None:
    state = model.features.state_dict()
    for key, value in arrays.items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], torch.from_numpy(value)), key


# ---------------------------------------------------------------------------------------------
# Shapes, DEX, counts, init


@pytest.mark.parametrize("backbone, size, width", [
    ("vgg16", 32, 25088), ("resnet50", 32, 2048), ("senet50", 32, 2048),
    ("mobilenet_v2", 32, 1280)])
def test_forward_shapes(backbone, size, width):
    model = create_model(backbone, num_classes=7).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert model.features(x).shape == (2, width)
        assert model(x).shape == (2, 7)
    assert any(m is model.cam_layer for m in model.features.modules())
    assert model.load_report is None


def test_state_dict_has_no_duplicate_cam_keys():
    keys = list(create_model("resnet50", 7).state_dict())
    assert not any(k.startswith("cam_layer") for k in keys) and len(keys) == len(set(keys))


def test_dex_age_is_the_softmax_expectation():
    ages = torch.arange(0, 101, dtype=torch.float32)
    peaked = torch.full((2, 101), -1e4)
    peaked[0, 37], peaked[1, 80] = 0.0, 0.0
    assert torch.allclose(dex_age(peaked, ages), torch.tensor([37.0, 80.0]))
    assert torch.allclose(dex_age(torch.zeros(3, 101), ages), torch.full((3,), 50.0))
    two = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4) over ages (10, 30)
    assert torch.allclose(dex_age(two, torch.tensor([10.0, 30.0])), torch.tensor([25.0]))
    assert dex_age(peaked.half(), ages).dtype == torch.float32
    with pytest.raises(ValueError, match="logits"):
        dex_age(torch.zeros(2, 100), ages)


def test_vgg16_parameter_count_against_the_thesis():
    model = create_model("vgg16", num_classes=100)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    conv = count(model.features)
    hidden = count(model.head) - count(model.output_layer)
    assert conv == 14_714_688
    assert conv + hidden == 27_691_584  # conv + 25088x512 + 512 + 512x256 + 256
    assert count(model) == 27_717_284  # + 256x100 + 100
    # The thesis's 27,717,184 is ours minus the 100 output biases.
    assert count(model) - 100 == 27_717_184


@pytest.mark.parametrize("backbone, fan_ins", [("resnet50", [2048]), ("vgg16", [25088, 512, 256])])
def test_head_layers_are_he_initialised(backbone, fan_ins):
    torch.manual_seed(0)
    linears = [m for m in create_model(backbone, 100).head if isinstance(m, nn.Linear)]
    assert [m.in_features for m in linears] == fan_ins
    for layer in linears:
        std = math.sqrt(2.0 / layer.in_features)
        assert abs(layer.weight.std().item() / std - 1) < 0.05, layer
        assert abs(layer.weight.mean().item()) < 0.05 * std
        assert torch.count_nonzero(layer.bias) == 0


def test_resnet50_layout_follows_its_weights():
    model = create_model("resnet50", 7)
    assert model.arch == "resnet50-caffe"
    block = model.features.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert model.features.maxpool.ceil_mode and model.features.maxpool.padding == 0
    rebuilt = create_model("resnet50-torchvision", 7)  # how an ImageNet-started run is rebuilt
    assert rebuilt.arch == "resnet50-torchvision"
    assert rebuilt.features.layer2[0].conv2.stride == (2, 2)
    assert rebuilt.features.maxpool.padding == 1
    for arch in ("vgg16", "senet50", "resnet50-caffe", "mobilenet_v2"):
        assert create_model(arch, 7).arch == arch


# ---------------------------------------------------------------------------------------------
# Mode (a)


def test_freeze_features_trains_only_the_head():
    torch.manual_seed(0)
    model = create_model("senet50", 7)
    x, y = torch.randn(4, 3, 32, 32) * 3 + 1, torch.tensor([0, 3, 6, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}

    model.train()
    with torch.no_grad():
        model(x)  # control: unfrozen, a train-mode pass moves the running statistics
    moved = model.features.bn1.running_mean
    assert not torch.equal(moved, before["features.bn1.running_mean"])
    model.load_state_dict(before)

    freeze_features(model)
    model.train()
    assert not any(m.training for m in model.features.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.head.training
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()

    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"head.0.weight", "head.0.bias"}
    model.eval()
    assert not any(m.training for m in model.modules())


# ---------------------------------------------------------------------------------------------
# VGGFace2 / VGG-Face files


def test_resnet50_python2_pkl_loads(tmp_path, resnet_arrays):
    path = write_python2_pkl(tmp_path / "resnet50_ft_weight.pkl", resnet_arrays)
    model = create_model("resnet50", 7, pretrained="vggface2", weights=path)
    assert_trunk_equals(model, resnet_arrays)
    report = model.load_report
    assert sorted(report.skipped) == ["fc.bias", "fc.weight"]
    assert report.loaded == len(resnet_arrays) - 2 and report.input_spec == VGGFACE2_CAFFE
    assert model.arch == "resnet50-caffe"


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_senet50_file_loads(tmp_path, senet_arrays, suffix):
    path = tmp_path / f"senet50_ft_weight{suffix}"
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps(senet_arrays, protocol=5))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in senet_arrays.items()}, path)
    model = create_model("senet50", 7, pretrained="vggface2", weights=path)
    assert_trunk_equals(model, senet_arrays)
    assert sorted(model.load_report.skipped) == ["fc.bias", "fc.weight"]
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 7)  # the SE blocks run


def test_vgg_face_dag_maps_onto_torchvision_indices(tmp_path):
    convs = {}
    for name, c_in, c_out in VGG_FACE_CONVS:
        convs |= {f"{name}.weight": torch.randn(c_out, c_in, 3, 3),
                  f"{name}.bias": torch.randn(c_out)}
    path = tmp_path / "vgg_face_dag.pth"
    torch.save(convs | placeholders(VGG_FACE_FC), path)
    model = create_model("vgg16", 7, pretrained="vggface2", weights=path)
    conv_base = model.features.conv
    for name, index in TORCHVISION_CONV_INDEX.items():
        assert torch.equal(conv_base[index].weight, convs[f"{name}.weight"]), name
        assert torch.equal(conv_base[index].bias, convs[f"{name}.bias"]), name
    assert model.load_report.loaded == 26
    assert sorted(model.load_report.skipped) == sorted(VGG_FACE_FC)
    assert model.load_report.input_spec == VGG_FACE_DAG


def _resnet_file(tmp_path, se: bool, edit=lambda state: None):
    state = placeholders(vggface2_resnet_layout(se))
    edit(state)
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("backbone, se, edit, words", [
    ("resnet50", False, lambda s: s.pop("layer3.2.bn2.running_var"),
     ["1 missing", "layer3.2.bn2.running_var"]),
    ("resnet50", False, lambda s: s.update({"layer4.0.conv2.weight": torch.zeros(512, 512, 1, 1)}),
     ["shape-mismatched",
      "layer4.0.conv2.weight: file (512, 512, 1, 1) vs model (512, 512, 3, 3)"]),
    ("senet50", False, lambda s: None, ["64 missing", "layer1.0.conv4.weight"]),
    ("resnet50", True, lambda s: None, ["64 unexpected", "layer1.0.conv4.weight"]),
])
def test_wrong_vggface2_file_names_the_keys(tmp_path, backbone, se, edit, words):
    path = _resnet_file(tmp_path, se, edit)
    with pytest.raises(ValueError) as error:
        create_model(backbone, 7, pretrained="vggface2", weights=path)
    for word in words:
        assert word in str(error.value)
    assert str(path) in str(error.value)


def test_pkl_with_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"conv1.weight": Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        create_model("resnet50", 7, pretrained="vggface2", weights=path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pkl_reader_takes_numpy_dicts_of_any_protocol(tmp_path, protocol):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64)}
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps(arrays, protocol=protocol))  # 2: bytes via _codecs.encode
    state = read_weights_file(path)
    assert state.keys() == arrays.keys()
    assert all(torch.equal(state[k], torch.from_numpy(v)) for k, v in arrays.items())


def test_pkl_must_hold_numeric_arrays(tmp_path):
    path = tmp_path / "odd.pkl"
    path.write_bytes(pickle.dumps({"conv1.weight": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="conv1.weight"):
        create_model("resnet50", 7, pretrained="vggface2", weights=path)


# ---------------------------------------------------------------------------------------------
# ImageNet, offline


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to download fails the test instead of quietly succeeding or hanging."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _torch_home(tmp_path, monkeypatch):
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return checkpoints


def test_imagenet_mobilenet_v2_from_shared_file(tmp_path, monkeypatch, no_network):
    source = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
    if not source.is_file():
        pytest.skip(f"{source} not present (real-weights check runs only beside ../shared)")
    (_torch_home(tmp_path, monkeypatch) / source.name).symlink_to(source)
    model = create_model("mobilenet_v2", 7, pretrained="imagenet")
    published = torch.load(source, weights_only=True)
    assert torch.equal(model.features.features[0][0].weight, published["features.0.0.weight"])
    assert torch.equal(model.features.features[18][1].running_var,
                       published["features.18.1.running_var"])
    assert sorted(model.load_report.skipped) == ["classifier.1.bias", "classifier.1.weight"]
    assert model.load_report.input_spec.mean == (0.485, 0.456, 0.406)


def test_imagenet_without_the_file_fails_offline(tmp_path, monkeypatch, no_network):
    checkpoints = _torch_home(tmp_path, monkeypatch)
    with pytest.raises(FileNotFoundError) as error:
        create_model("mobilenet_v2", 7, pretrained="imagenet")
    message = str(error.value)
    assert str(checkpoints / "mobilenet_v2-b0353104.pth") in message
    assert "nothing is downloaded" in message
    assert not list(checkpoints.iterdir())


def _torchvision_layout(builder) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in builder().state_dict().items()}


def test_imagenet_vgg16_takes_only_the_conv_base(tmp_path, monkeypatch, no_network):
    layout = _torchvision_layout(tvm.vgg16)
    state = {k: torch.randn(s) for k, s in layout.items() if k.startswith("features.")}
    state |= placeholders({k: s for k, s in layout.items() if k.startswith("classifier.")})
    torch.save(state, _torch_home(tmp_path, monkeypatch) / "vgg16-397923af.pth")
    model = create_model("vgg16", 7, pretrained="imagenet")
    assert torch.equal(model.features.conv[28].weight, state["features.28.weight"])
    assert model.load_report.loaded == 26 and len(model.load_report.skipped) == 6


def test_imagenet_resnet50_keeps_torchvision_strides(tmp_path, monkeypatch, no_network):
    state = {k: torch.randn(s) if s else torch.tensor(0)
             for k, s in _torchvision_layout(tvm.resnet50).items()}
    torch.save(state, _torch_home(tmp_path, monkeypatch) / "resnet50-0676ba61.pth")
    model = create_model("resnet50", 7, pretrained="imagenet")
    assert model.arch == "resnet50-torchvision"
    assert model.features.layer2[0].conv2.stride == (2, 2)
    assert torch.equal(model.features.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])


# ---------------------------------------------------------------------------------------------
# Choices that must fail with a reason


@pytest.mark.parametrize("args, kwargs, words", [
    (("resnet51", 7), {}, "unknown backbone"),
    (("squeezenet1_0", 7), {}, "does not end in a Linear"),
    (("googlenet", 7), {}, "auxiliary"),
    (("resnet50", 7), {"pretrained": "imagenet1k"}, "pretrained must be one of"),
    (("resnet50", 7), {"pretrained": "vggface2"}, "weights file goes with"),
    (("senet50", 7), {"pretrained": "imagenet"}, "no ImageNet weights"),
    (("resnet50-caffe", 7), {"pretrained": "imagenet"}, "need resnet50-torchvision"),
    (("resnet50-torchvision", 7), {"pretrained": "vggface2", "weights": "x.pkl"},
     "need resnet50-caffe"),
    (("mobilenet_v2", 7), {"pretrained": "vggface2", "weights": "x.pkl"}, "VGGFace2 weights exist"),
    (("vgg16", 1), {}, "at least 2 classes"),
])
def test_bad_choices_fail_clearly(args, kwargs, words):
    with pytest.raises(ValueError, match=words):
        create_model(*args, **kwargs)
