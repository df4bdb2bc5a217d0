"""Old-photo augmentation: greyscale, sepia, blur, grain and JPEG artefacts.

Why: FG-NET's young subjects are mostly greyscale or sepia scans of old prints, while the source
datasets (UTKFace, IMDB) are colour web photos. A network that never saw a grey face reads
greyscale as "old" (measured: greyscale alone adds about 3 years of error on UTKFace). Showing
the source stage such looks removes that shortcut. Grain matters most: a MobileNetV2 trained on
UTKFace chips without it reads pixel noise as wrinkles (noise of 0.05 added to its test crops
moves their predicted age by +39 years), and FG-NET's scans carry film grain and scanner
texture (see docs/zero-shot.md). Off by default: the thesis augments
geometrically only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

LUMA = (0.299, 0.587, 0.114)
SEPIA = ((0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131))


@dataclass(frozen=True)
class Degrade:
    """Per-image probabilities of each effect (greyscale and sepia exclude each other)."""
    greyscale: float = 0.0
    sepia: float = 0.0
    blur: float = 0.0
    jpeg: float = 0.0
    noise: float = 0.0
    max_noise_sigma: float = 0.06  # grain std in units of the [0, 1] pixel range
    min_blur_sigma: float = 0.3   # in pixels of a 112-pixel face; scaled with the input size
    max_blur_sigma: float = 3.0
    jpeg_quality: tuple[int, int] = (15, 60)

    @classmethod
    def each(cls, probability: float, max_blur_sigma: float) -> "Degrade":
        return cls(probability / 2, probability / 2, probability, probability, probability,
                   max_blur_sigma=max_blur_sigma)

    @property
    def active(self) -> bool:
        return max(self.greyscale, self.sepia, self.blur, self.jpeg, self.noise) > 0


def recolour(x: torch.Tensor, matrix: tuple[tuple[float, ...], ...]) -> torch.Tensor:
    return torch.einsum("oc,bchw->bohw", x.new_tensor(matrix), x).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with one sigma per image, as one grouped separable convolution."""
    b, c, h, w = x.shape
    radius = max(1, int(torch.ceil(2 * sigma.max()).item()))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.to(x)[:, None]) ** 2)   # (B, 2r+1)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 2r+1)
    flat = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)            # along width
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)            # along height
    return flat.reshape(b, c, h, w)


def add_grain(x: torch.Tensor, sigma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian grain, one std per image: mostly luminance (as film grain and scanner noise
    are), plus a weaker colour part. Drawn from ``gen`` on the CPU."""
    b, _, h, w = x.shape
    luma = torch.randn(b, 1, h, w, generator=gen)
    chroma = torch.randn(b, 3, h, w, generator=gen)
    grain = (luma + 0.5 * chroma) * sigma.view(b, 1, 1, 1) / (1.25 ** 0.5)
    return (x + grain.to(device=x.device, dtype=x.dtype)).clamp_(0, 1)


def jpeg_roundtrip(x: torch.Tensor, qualities: list[int]) -> torch.Tensor:
    """Encode and decode through libjpeg on the CPU (a small share of each batch)."""
    pixels = (x.detach() * 255).round_().clamp_(0, 255).to(torch.uint8).cpu()
    out = [decode_jpeg(encode_jpeg(img, quality=q)) for img, q in zip(pixels, qualities)]
    return torch.stack(out).to(device=x.device, dtype=x.dtype).div_(255)


def degrade_batch(x: torch.Tensor, degrade: Degrade, gen: torch.Generator) -> torch.Tensor:
    """x: RGB in [0, 1], (B,3,S,S) -> the same with random old-photo effects. Random numbers
    come from ``gen`` on the CPU so a run is reproducible whatever the device."""
    b = x.shape[0]
    u = torch.rand(b, 7, generator=gen)
    x = x.clone()
    grey = u[:, 0] < degrade.greyscale
    sepia = ~grey & (u[:, 0] < degrade.greyscale + degrade.sepia)
    if grey.any():
        x[grey] = recolour(x[grey], (LUMA,) * 3)
    if sepia.any():
        x[sepia] = recolour(x[sepia], SEPIA)
    blur = u[:, 1] < degrade.blur
    if blur.any():
        weakest, strongest = degrade.min_blur_sigma, degrade.max_blur_sigma
        sigma = (weakest + u[blur, 2] * (strongest - weakest)) * x.shape[-1] / 112
        x[blur] = gaussian_blur(x[blur], sigma)
    noise = u[:, 5] < degrade.noise
    if noise.any():
        x[noise] = add_grain(x[noise], u[noise, 6] * degrade.max_noise_sigma, gen)
    jpeg = u[:, 3] < degrade.jpeg
    if jpeg.any():
        low, high = degrade.jpeg_quality
        qualities = (low + u[jpeg, 4] * (high - low)).round().int().tolist()
        x[jpeg] = jpeg_roundtrip(x[jpeg], qualities)
    return x
