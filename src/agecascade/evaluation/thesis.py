"""König (Leiden 2019): the published numbers that the report prints beside this run's.

Data only, keyed as the report looks them up; a missing key means the thesis has no such row.
"""
from __future__ import annotations

import numpy as np

BACKBONE_NAMES = {"vgg16": "VGG-16", "resnet50": "ResNet-50", "senet50": "SENet-50"}
MODE_NAMES = {"a": "pretrained, frozen", "b": "IMDB", "c": "IMDB-AgeDB"}

# Table 4, FG-NET leave-one-person-out: (backbone, mode) -> (MAE, median AE, upper quartile,
# lower quartile) in years; mode a is the thesis's "-Faces2".
TABLE4 = {("resnet50", "a"): (12.28, 12.02, 14.43, 10.18),
          ("senet50", "a"): (8.61, 7.21, 10.13, 5.95),
          ("vgg16", "a"): (4.78, 4.24, 5.54, 3.06),
          ("resnet50", "b"): (4.33, 3.46, 5.12, 2.71),
          ("senet50", "b"): (4.24, 3.20, 5.17, 2.28),
          ("vgg16", "b"): (2.77, 2.34, 3.47, 1.54),
          ("vgg16", "c"): (2.68, 2.24, 3.35, 1.58)}

# Table 5 (VGG-16 only): (extractor, feature set) -> (MAE, R^2).
TABLE5 = {("base", "last_conv_max"): (5.05, 0.40), ("cascade", "last_conv_max"): (3.98, 0.45),
          ("base", "first_conv"): (9.68, -1.43), ("cascade", "first_conv"): (9.53, -1.40),
          ("cascade", "last_conv_flat"): (9.98, -1.52)}

# Adience, 8 groups, 5 folds: metric -> (mean %, std %).
ADIENCE = {"exact_acc": (61.41, 4.37), "one_off_acc": (87.80, 2.22)}

# Table 6: the 3-group confusion on Adience fold 1 (rows true, columns predicted: 0-12, 15-20,
# 25-100).
TABLE6 = np.array([[1646, 12, 9], [12, 36, 104], [66, 143, 2362]])
