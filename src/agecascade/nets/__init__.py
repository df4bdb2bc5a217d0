"""Age-estimation networks (VGG-16, ResNet-50, SE-ResNet-50, torchvision models) and DEX."""
from agecascade.nets.backbones import BACKBONES, PRETRAINED, AgeNet, create_model, freeze_features
from agecascade.nets.dex import dex_age
from agecascade.nets.weights import InputSpec, LoadReport

__all__ = ["BACKBONES", "PRETRAINED", "AgeNet", "InputSpec", "LoadReport", "create_model",
           "dex_age", "freeze_features"]
