"""The age networks: a pretrained trunk (``features``) and the classifier layers (``head``).

The thesis compares VGG-16 (with a 512-256 head), ResNet-50 and SE-ResNet-50, all pretrained on
VGGFace2 faces. Any torchvision classification model can stand in for them by name.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch.nn.functional as F
import torchvision.models as tvm
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.resnet import Bottleneck, ResNet

from agecascade.errors import UserError
from agecascade.nets.weights import LoadReport, load_imagenet, load_vggface2

__all__ = ["BACKBONES", "PRETRAINED", "AgeNet", "create_model", "freeze_features"]

log = logging.getLogger(__name__)

BACKBONES = ("vgg16", "resnet50", "senet50")  # the thesis models; other torchvision names work too
PRETRAINED = ("none", "imagenet", "vggface2")
# torchvision models whose training-mode forward returns auxiliary outputs, not one tensor.
_AUX_OUTPUTS = ("googlenet", "inception_v3")


class AgeNet(nn.Module):
    """``head(features(x))``: image (B, 3, H, W) -> pooled features (B, C) -> logits (B, K).

    Training mode (a) trains only ``head``; see :func:`freeze_features`.
    """

    def __init__(self, features: nn.Module, head: nn.Sequential, cam_layer: str, arch: str,
                 load_report: LoadReport | None = None) -> None:
        super().__init__()
        self.features = features
        self.head = head
        # A name, not a second reference: registering the block twice would duplicate its keys in
        # the state dict.
        self.cam_layer_name = cam_layer
        # The backbone name that rebuilds this network: "resnet50-caffe" and "resnet50-torchvision"
        # have the same keys but different strides, so checkpoints must record which.
        self.arch = arch
        self.load_report = load_report
        self.features_frozen = False

    @property
    def cam_layer(self) -> nn.Module:
        """The last convolutional block, whose activations Grad-CAM weighs."""
        return self.get_submodule(self.cam_layer_name)

    @property
    def output_layer(self) -> nn.Linear:
        """The Linear that gives the logits; every head ends in it."""
        return self.head[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> AgeNet:
        """As nn.Module.train, except that frozen features keep their BatchNorm layers in eval."""
        super().train(mode)
        if mode and self.features_frozen:
            for layer in self.features.modules():
                if isinstance(layer, _BatchNorm):
                    layer.eval()
        return self


def freeze_features(model: AgeNet) -> None:
    """Training mode (a): only the classifier layers learn.

    ``requires_grad=False`` stops the weights, but not BatchNorm: in train mode it normalises with
    the batch's statistics and overwrites its running mean/variance with those of the age data.
    The frozen trunk would then compute different features at test time than the pretrained ones
    the head was fitted to. So frozen BatchNorm layers stay in eval mode (``AgeNet.train``).
    """
    for param in model.features.parameters():
        param.requires_grad_(False)
    model.features_frozen = True
    model.train(model.training)


def he_init(layer: nn.Linear) -> nn.Linear:
    """The thesis's "Gaussian He initialization": N(0, 2 / fan_in) weights, zero bias."""
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(layer.bias)
    return layer


# ---------------------------------------------------------------------------------------------
# VGG-16

_VGG16_WIDTHS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg16_conv_base() -> nn.Sequential:
    """VGG-16's 13 convs and 5 max-pools, indexed like torchvision's ``vgg16().features``."""
    layers: list[nn.Module] = []
    channels = 3
    for block in _VGG16_WIDTHS:
        for width in block:
            conv = nn.Conv2d(channels, width, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def vgg16(num_classes: int, pretrained: str, weights: Path | None) -> AgeNet:
    """VGG-16 conv base + the thesis's 512-256 head.

    Parameters for K classes: 14,714,688 (conv) + 12,845,568 (25088x512 + 512) + 131,328
    (512x256 + 256) + 257 * K. For K = 100 that is 27,717,284; the thesis quotes 27,717,184, exactly
    100 fewer: its count fits 100 outputs without bias. Ours keep the (zero-initialised) bias.
    """
    conv = vgg16_conv_base()
    report = None
    if pretrained == "imagenet":
        report = load_imagenet(conv, tvm.VGG16_Weights.IMAGENET1K_V1, drop=("classifier.",),
                               rename=lambda key: key.removeprefix("features."))
    elif pretrained == "vggface2":
        report = load_vggface2(conv, "vgg16", weights)
    features = nn.Sequential(OrderedDict(
        conv=conv,
        pool=nn.AdaptiveAvgPool2d((7, 7)),  # 7x7 at 224 px, so other input sizes work too
        flatten=nn.Flatten(),  # (B, 512 * 7 * 7) = (B, 25088)
    ))
    # No dropout: the thesis's head is just the two layers. With torchvision's Dropout(0.5)
    # after each, VGG-16 from random weights barely moved in the demo's 6 epochs (val MAE 20.4
    # against the median's 17.6); without it, 9.8.
    head = nn.Sequential(
        he_init(nn.Linear(512 * 7 * 7, 512)), nn.ReLU(inplace=True),
        he_init(nn.Linear(512, 256)), nn.ReLU(inplace=True),
        he_init(nn.Linear(256, num_classes)),
    )
    return AgeNet(features, head, "features.conv", "vgg16", report)


# ---------------------------------------------------------------------------------------------
# ResNet-50 and SE-ResNet-50 (VGGFace2 release layout)


class SEBottleneck(Bottleneck):
    """A ResNet bottleneck with a Squeeze-and-Excitation gate, named as the VGGFace2 release.

    cydonia999/VGGFace2-pytorch models/senet.py calls the gate's convs ``conv4`` (squeeze, C ->
    C/16) and ``conv5`` (excite, C/16 -> C), both with bias: the Caffe model's ``*_1x1_down`` and
    ``*_1x1_up``. The gate rescales the residual branch before the skip connection is added.
    """

    reduction = 16

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        channels = self.conv3.out_channels
        self.conv4 = nn.Conv2d(channels, channels // self.reduction, kernel_size=1)
        self.conv5 = nn.Conv2d(channels // self.reduction, channels, kernel_size=1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        squeezed = F.adaptive_avg_pool2d(out, 1)  # (B, C, 1, 1)
        gate = self.sigmoid(self.conv5(self.relu(self.conv4(squeezed))))  # (B, C, 1, 1)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out * gate + identity)


def caffe_layout(net: ResNet) -> ResNet:
    """Rearrange torchvision's ResNet into the Caffe layout the VGGFace2 weights were trained in.

    torchvision ("ResNet v1.5") downsamples in a stage's first 3x3 conv and max-pools with
    padding 1; the Caffe models downsample in the first 1x1 conv and pool with ``ceil_mode``,
    padding 0. Parameter names and shapes are the same, so only the strides move.
    """
    net.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
    for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
        first = stage[0]
        first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
    return net


def _resnet_agenet(trunk: ResNet, num_classes: int, arch: str, pretrained: str,
                   load: Callable[[nn.Module], LoadReport]) -> AgeNet:
    """Replace the ImageNet ``fc`` by our head; ``load`` fills the trunk when pretrained."""
    width = trunk.fc.in_features
    trunk.fc = nn.Identity()  # trunk(x): global average pool + flatten -> (B, 2048)
    report = None if pretrained == "none" else load(trunk)
    head = nn.Sequential(he_init(nn.Linear(width, num_classes)))
    return AgeNet(trunk, head, "features.layer4", arch, report)


def resnet50(num_classes: int, pretrained: str, weights: Path | None,
             layout: str | None = None) -> AgeNet:
    """ResNet-50 in the layout of its weights.

    ImageNet weights come from torchvision's ResNet-50 and need its stride placement; VGGFace2
    weights need the Caffe one (:func:`caffe_layout`). Without weights we build the Caffe layout,
    the thesis's network. ``AgeNet.arch`` ("resnet50-caffe" / "resnet50-torchvision") names the
    layout and is itself a backbone name: ``create_model(model.arch, K)`` rebuilds the same
    network for a checkpoint, whatever weights it started from.
    """
    layout = layout or ("torchvision" if pretrained == "imagenet" else "caffe")
    wanted = {"imagenet": "torchvision", "vggface2": "caffe"}.get(pretrained, layout)
    if layout != wanted:
        raise UserError(f"{pretrained} weights need resnet50-{wanted}, not resnet50-{layout}")
    if layout == "torchvision":
        return _resnet_agenet(
            tvm.resnet50(weights=None), num_classes, "resnet50-torchvision", pretrained,
            lambda trunk: load_imagenet(trunk, tvm.ResNet50_Weights.IMAGENET1K_V1, drop=("fc.",)))
    return _resnet_agenet(caffe_layout(tvm.resnet50(weights=None)), num_classes, "resnet50-caffe",
                          pretrained, lambda trunk: load_vggface2(trunk, "resnet50", weights))


def senet50(num_classes: int, pretrained: str, weights: Path | None) -> AgeNet:
    """SE-ResNet-50 as released with VGGFace2 (``senet50_ft`` / ``senet50_scratch``)."""
    if pretrained == "imagenet":
        raise UserError("senet50 has no ImageNet weights in torchvision; use "
                         "pretrained='vggface2' with a senet50_*_weight.pkl, or 'none'")
    trunk = caffe_layout(ResNet(SEBottleneck, [3, 4, 6, 3]))
    return _resnet_agenet(trunk, num_classes, "senet50", pretrained,
                          lambda trunk: load_vggface2(trunk, "senet50", weights))


# ---------------------------------------------------------------------------------------------
# Any torchvision classification model


def _final_linear(net: nn.Module, name: str) -> str:
    """Where the ImageNet classifier sits: the last child if it is a Linear (resnet, regnet,
    shufflenet, swin: ``fc`` / ``head``), else the last entry of a last Sequential child
    (mobilenet, efficientnet, mnasnet, vgg, alexnet, convnext: ``classifier[-1]``; vit:
    ``heads.head``). Hidden Linear layers before it (vgg, alexnet, mobilenet_v3) stay in the
    trunk."""
    child_name, child = list(net.named_children())[-1]
    if isinstance(child, nn.Linear):
        return child_name
    if isinstance(child, nn.Sequential) and len(child):
        last_name, last = list(child.named_children())[-1]
        if isinstance(last, nn.Linear):
            return f"{child_name}.{last_name}"
    raise UserError(f"torchvision model {name!r} does not end in a Linear classifier (its last "
                     f"part {child_name!r} is {type(child).__name__}); it cannot take an age head")


def _last_block(net: nn.Module, classifier: str) -> str:
    """The last parameterised child before the classifier: resnet ``layer4``, most others
    ``features``. For vit (``encoder``: tokens) and swin (``norm``: channels-last) Grad-CAM needs
    a reshape of that output."""
    top = classifier.split(".")[0]
    names = [n for n, child in net.named_children()
             if n != top and next(child.parameters(), None) is not None]
    return names[-1]


def torchvision_model(name: str, num_classes: int, pretrained: str) -> AgeNet:
    """A torchvision classifier: trunk = the model with its final Linear replaced by Identity."""
    if name in _AUX_OUTPUTS:
        raise UserError(f"{name} returns auxiliary classifier outputs while training; "
                         "AgeNet needs one logits tensor: choose another model")
    if pretrained == "vggface2":
        raise UserError(f"VGGFace2 weights exist only for {BACKBONES}, not {name!r}")
    net = tvm.get_model(name, weights=None)
    classifier = _final_linear(net, name)
    width = net.get_submodule(classifier).in_features
    net.set_submodule(classifier, nn.Identity())
    report = None
    if pretrained == "imagenet":
        available = tvm.get_model_weights(name)
        if "IMAGENET1K_V1" not in available.__members__:
            raise UserError(f"torchvision has no IMAGENET1K_V1 weights for {name}; it has "
                             f"{list(available.__members__)}")
        report = load_imagenet(net, available["IMAGENET1K_V1"], drop=(classifier + ".",))
    head = nn.Sequential(he_init(nn.Linear(width, num_classes)))
    return AgeNet(net, head, f"features.{_last_block(net, classifier)}", name, report)


_THESIS_BUILDERS = {
    "vgg16": vgg16, "resnet50": resnet50, "senet50": senet50,
    # the two ResNet-50 layouts by name, as AgeNet.arch records them
    "resnet50-caffe": partial(resnet50, layout="caffe"),
    "resnet50-torchvision": partial(resnet50, layout="torchvision"),
}


def create_model(backbone: str, num_classes: int, pretrained: str = "none",
                 weights: Path | None = None) -> AgeNet:
    """An age network with a fresh He-initialised head of ``num_classes`` outputs.

    ``pretrained``: "none" (random), "imagenet" (torchvision's file, which must already be in
    ``$TORCH_HOME/hub/checkpoints``), or "vggface2" (the file given as ``weights``).
    Nothing is ever downloaded. To rebuild a trained model for its checkpoint use
    ``create_model(model.arch, K)``: for resnet50 the layout depends on the weights it started from.
    """
    if pretrained not in PRETRAINED:
        raise UserError(f"pretrained must be one of {PRETRAINED}, not {pretrained!r}")
    if (pretrained == "vggface2") != (weights is not None):
        raise UserError("a weights file goes with pretrained='vggface2' and only with it "
                         f"(got pretrained={pretrained!r}, weights={weights})")
    if num_classes < 2:
        raise UserError(f"an age classifier needs at least 2 classes, not {num_classes}")
    if backbone in _THESIS_BUILDERS:
        model = _THESIS_BUILDERS[backbone](num_classes, pretrained, weights)
    elif backbone in tvm.list_models(module=tvm):
        model = torchvision_model(backbone, num_classes, pretrained)
    else:
        raise UserError(f"unknown backbone {backbone!r}: use one of {BACKBONES} or a torchvision "
                         "classification model name (torchvision.models.list_models)")
    if model.load_report is not None:
        log.info("%s: %s", model.arch, model.load_report)
    return model
