"""Crop geometry: a square around the face box, grown by the margin on every side.

The thesis crops "around a face location with a 40% margin": 40% of the box side is added
on the left, right, top and bottom. Making the box square first keeps faces undistorted when
the crop is resized to ``size x size``. Parts of the crop outside the image are black.

The result is that of zero-padding the window and resizing it with Pillow's bilinear filter
(``reducing_gap=REDUCING_GAP``), but the window is never built: only the part of it that the
image covers, plus the few pixels of black the filter reaches, is resampled. So memory follows
the image, not the box, and an absurd box (1e5 px on a 100 px image) costs no more than a sane one.
Resampling a part instead of the whole shifts Pillow's float round-off, so a few pixels in a
thousand may differ from the padded window by a grey level (two where both passes round alike).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]
# Downscaling by more than this first averages whole blocks of pixels (Pillow's ``reduce``),
# then filters: a plain bilinear filter over a large factor would alias.
REDUCING_GAP = 3.0


def margin_box(box: Box, margin: float) -> tuple[int, int, int, int]:
    """Square crop window (x0, y0, x1, y1) in pixels; may extend past the image edges."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left, top = round(cx - side / 2.0), round(cy - side / 2.0)
    side = max(1, round(side))
    return left, top, left + side, top + side


def framed_box(box: Box, window: float, offset: tuple[float, float]) -> Box:
    """The square window of side ``window`` x the box's longer side, centred ``offset`` box
    sides (x, y) from the box centre: how a recipe frames a detected face (``CropRecipe.framing``)."""
    x0, y0, x1, y1 = box
    face = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2 + offset[0] * face, (y0 + y1) / 2 + offset[1] * face
    half = window * face / 2
    return cx - half, cy - half, cx + half, cy + half


def _span(start: int, side: int, extent: int, size: int,
          factor: int) -> tuple[int, int, int, int] | None:
    """Along one axis: the block range [k0, k1) of the window to resample, and the output
    pixels [u0, u1) they yield; None when the window misses the image.

    The window's pixel c (0 <= c < side) is image pixel start + c; block k averages window
    pixels [k * factor, (k + 1) * factor). Output pixels outside [u0, u1) only see black.
    """
    first, last = max(0, -start), min(side, extent - start)  # window pixels on the image
    if first >= last:
        return None
    blocks = math.ceil(side / factor)
    scale = side / factor / size                  # blocks per output pixel
    reach = math.ceil(2.0 * max(scale, 1.0)) + 2  # > the filter's width: black it must see
    k0 = max(0, first // factor - reach)
    k1 = min(blocks, math.ceil(last / factor) + reach)
    # Exact integer bounds: output pixel u spans blocks [u * scale, (u + 1) * scale).
    u0 = -(-k0 * factor * size // side)
    u1 = min(size, k1 * factor * size // side)
    return k0, k1, u0, u1


def _block_means(image: Image.Image, left: int, top: int, side: int, factor: int,
                 xs: tuple[int, int], ys: tuple[int, int]) -> np.ndarray:
    """Blocks [ys) x [xs) of the black-padded window as uint8, averaged ``factor x factor``.

    Only the image pixels are read; black blocks stay zeros, so memory is bounded by the image
    and by the (small) number of blocks, never by the window's area.
    """
    (kx0, kx1), (ky0, ky1) = xs, ys
    out = np.zeros((ky1 - ky0, kx1 - kx0, 3), np.uint8)
    # Window pixels covered by both the blocks and the image, in window coordinates.
    cx0, cx1 = max(kx0 * factor, -left), min(kx1 * factor, side, image.width - left)
    cy0, cy1 = max(ky0 * factor, -top), min(ky1 * factor, side, image.height - top)
    if cx0 >= cx1 or cy0 >= cy1:
        return out
    pixels = np.asarray(image.crop((left + cx0, top + cy0, left + cx1, top + cy1)))
    if factor == 1:
        out[cy0 - ky0:cy1 - ky0, cx0 - kx0:cx1 - kx0] = pixels
        return out
    # Whole blocks around the image part; the window's last block may be cut short.
    ax0, ay0 = cx0 // factor * factor, cy0 // factor * factor
    ax1, ay1 = min(-(-cx1 // factor) * factor, side), min(-(-cy1 // factor) * factor, side)
    bx0, by0 = ax0 // factor - kx0, ay0 // factor - ky0
    if (ax1 - ax0) * (ay1 - ay0) <= 4 * pixels.shape[0] * pixels.shape[1]:
        # The usual case: pad to whole blocks (a little black) and let Pillow average them.
        padded = np.zeros((ay1 - ay0, ax1 - ax0, 3), np.uint8)
        padded[cy0 - ay0:cy1 - ay0, cx0 - ax0:cx1 - ax0] = pixels
        means = np.asarray(Image.fromarray(padded).reduce(factor))
    else:
        # The image is small against a block (an absurd window): padding it to whole blocks
        # would cost the window's memory, so sum its pixels per block and divide by the area.
        cuts_x = np.r_[0, np.arange(ax0 + factor, cx1, factor) - cx0]
        cuts_y = np.r_[0, np.arange(ay0 + factor, cy1, factor) - cy0]
        sums = np.add.reduceat(np.add.reduceat(pixels, cuts_x, axis=1, dtype=np.uint64),
                               cuts_y, axis=0)
        starts_x, starts_y = np.arange(ax0, ax1, factor), np.arange(ay0, ay1, factor)
        widths = np.minimum(starts_x + factor, side) - starts_x
        heights = np.minimum(starts_y + factor, side) - starts_y
        area = (heights[:, None] * widths[None, :])[..., None].astype(np.uint64)
        means = (sums + area // 2) // area  # rounded half up, black counted
    out[by0:by0 + means.shape[0], bx0:bx0 + means.shape[1]] = means
    return out


def crop_face(image: Image.Image, box: Box, margin: float, size: int) -> np.ndarray:
    """RGB image + face box -> (size, size, 3) uint8 crop; off-image pixels are zero."""
    left, top, _, _ = window = margin_box(box, margin)
    side = window[2] - window[0]
    factor = int(side / size / REDUCING_GAP) or 1
    crop = np.zeros((size, size, 3), np.uint8)
    xs = _span(left, side, image.width, size, factor)
    ys = _span(top, side, image.height, size, factor)
    if xs is None or ys is None:
        return crop
    (kx0, kx1, ux0, ux1), (ky0, ky1, uy0, uy1) = xs, ys
    if ux0 >= ux1 or uy0 >= uy1:
        return crop
    blocks = Image.fromarray(_block_means(image, left, top, side, factor, (kx0, kx1), (ky0, ky1)))
    scale = side / factor / size
    # The output pixels' source area in block coordinates, clamped against float round-off.
    source = (max(0.0, ux0 * scale - kx0), max(0.0, uy0 * scale - ky0),
              min(float(kx1 - kx0), ux1 * scale - kx0), min(float(ky1 - ky0), uy1 * scale - ky0))
    part = blocks.resize((ux1 - ux0, uy1 - uy0), Image.BILINEAR, box=source)
    crop[uy0:uy1, ux0:ux1] = np.asarray(part)
    return crop


def whole_image_box(image: Image.Image) -> Box:
    return 0.0, 0.0, float(image.width), float(image.height)
