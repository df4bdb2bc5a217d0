"""Decoding of every image kind real datasets contain, and the reason for each refusal."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agecascade.cli import main
from agecascade.data.imaging import BadImage, decode, orient_box, to_rgb, upright_rgb
from agecascade.data.store import crop_recipe, load_prepared
from agecascade.inference.faces import FaceSettings, analyse_file
from conftest import png_bomb, truncated_jpeg, write_image


def encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def test_greyscale_becomes_three_equal_channels():
    grey = Image.fromarray(np.full((10, 12), 77, np.uint8), "L")
    out = decode(encode(grey, "JPEG", quality=100), "x.jpg").image
    assert out.mode == "RGB" and out.size == (12, 10)
    pixels = np.asarray(out).astype(int)
    assert np.ptp(pixels, axis=2).max() == 0 and abs(pixels.mean() - 77) < 2


def test_cmyk_jpeg_converts_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(decode(encode(cmyk, "JPEG", quality=100), "x.jpg").image).astype(int)
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_alpha_is_composited_on_grey_not_black():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    out = np.asarray(decode(encode(rgba, "PNG"), "x.png").image)
    assert (out == 128).all()


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)  # mode I;16
    decoded = decode(encode(image, "PNG"), "x.png")
    assert np.asarray(decoded.image)[0, :, 0].tolist() == [0, 128, 255]
    assert [reason for reason, _ in decoded.notes] == ["high_bit_depth"]


def test_int32_mode_with_16_bit_values_is_scaled():
    image = Image.fromarray(np.array([[65535, 0]], dtype=np.int32), "I")
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [255, 0]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_and_box_follow_each_other(orientation):
    """A red box drawn on the stored pixels must land where orient_box says after decoding."""
    stored = np.zeros((60, 100, 3), np.uint8)
    box = (10, 5, 40, 25)  # x0, y0, x1, y1 in stored pixels
    stored[box[1]:box[3], box[0]:box[2]] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "PNG", exif=exif)
    decoded = decode(data, "x.png")
    assert decoded.orientation == orientation
    upright = np.asarray(decoded.image)
    ys, xs = np.nonzero(upright[..., 0] > 128)
    assert orient_box(box, orientation, decoded.raw_size) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    if orientation in (5, 6, 7, 8):
        assert decoded.image.size == (60, 100)


@pytest.mark.parametrize("make, reason", [
    (lambda p: truncated_jpeg(p).read_bytes(), "truncated_image"),
    (lambda p: b"", "empty_file"),
    (lambda p: b"just some text, not a picture\n", "not_an_image"),
    (lambda p: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "corrupt_image"),
    (lambda p: png_bomb(p).read_bytes(), "decompression_bomb"),
])
def test_bad_inputs_raise_a_named_reason(tmp_path, make, reason):
    with pytest.raises(BadImage) as caught:
        decode(make(tmp_path / "f.jpg"), "f.jpg")
    assert caught.value.reason == reason


def test_png_named_jpg_is_kept_and_flagged(tmp_path):
    data = write_image(tmp_path / "a.JPG", fmt="PNG").read_bytes()
    decoded = decode(data, "a.JPG")
    assert decoded.image.size == (96, 96)
    assert [reason for reason, _ in decoded.notes] == ["extension_mismatch"]


def test_bomb_limit_is_a_parameter():
    image = Image.new("RGB", (100, 100))
    with pytest.raises(BadImage, match="decompression_bomb"):
        decode(encode(image, "PNG"), "x.png", max_pixels=5_000)
    assert decode(encode(image, "PNG"), "x.png", max_pixels=10_000).image.size == (100, 100)


def exif_rotated_jpeg(path: Path) -> Path:
    """Noise stored sideways with EXIF orientation 6, as a phone writes a portrait photo."""
    pixels = np.random.default_rng(4).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif)
    return path


def sixteen_bit_png(path: Path) -> Path:
    """A 16-bit greyscale gradient; most values are above 255."""
    ramp = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)
    Image.fromarray(ramp).save(path, "PNG")
    return path


@pytest.mark.parametrize("make", [exif_rotated_jpeg, sixteen_bit_png])
def test_predict_sees_the_pixels_prepare_trained_on(tmp_path, make):
    """`predict --detector none` on a training image crops it as `prepare` did, byte for byte:
    one decode (EXIF rotation, 16 bits scaled) and one crop for both."""
    (tmp_path / "utk").mkdir()
    path = make(tmp_path / "utk" / "30_0_1_20170101000000001.jpg.chip.jpg")
    assert main(["prepare", "utkface", "--root", str(path.parent), "--out", str(tmp_path / "out"),
                 "--size", "48", "--box", "image", "--workers", "1"]) == 0
    _, crops = load_prepared(tmp_path / "out")
    settings = FaceSettings(crop_recipe(tmp_path / "out"), detector="none")
    served = analyse_file(str(path), settings).crops[0]
    assert served.dtype == np.uint8 and np.array_equal(served, crops[0])
    # The old serving conversion (no EXIF rotation, 16 bits clipped) fails this test.
    assert not np.array_equal(served, np.asarray(Image.open(path).convert("RGB")))


def paletted_with_transparency() -> Image.Image:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (0, 0, 4, 8))
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize("image, fmt", [
    (paletted_with_transparency(), "PNG"),
    (Image.new("LA", (8, 8), (200, 100)), "PNG"),
    (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"),
    (Image.new("1", (8, 8), 1), "PNG"),
    (Image.fromarray(np.full((8, 8), 40000, np.uint16)), "PNG"),
])
def test_decode_and_upright_rgb_agree_on_every_mode(image, fmt):
    """prepare decodes bytes, serving converts an opened image: the same function underneath."""
    data = encode(image, fmt)
    decoded = np.asarray(decode(data, f"x.{fmt.lower()}").image)
    opened = np.asarray(upright_rgb(Image.open(io.BytesIO(data))))
    assert decoded.shape == (8, 8, 3) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, opened)
