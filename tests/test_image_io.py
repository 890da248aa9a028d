"""Images of every PIL mode read as 8-bit RGB by one helper, and every reader of image files uses it.

The readers: image sources (training, ``precompute``), the classifier's transform and ``load_image`` (``explain``)
and the mask datasets (``evaluate``). ``precompute``'s and ``explain``'s own end-to-end checks are in their test
files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import cefam_lightning.data.transforms as transforms
import cefam_lightning.reporting.explanations as explain
from cefam_lightning.data.image_datamodule import ImageDataModule
from cefam_lightning.data.image_io import gray_to_uint8, read_rgb, to_rgb
from cefam_lightning.data.image_sources import ImageRecord, open_image, open_source
from cefam_lightning.data.mask_datasets import open_mask_dataset
from cefam_lightning.data.transforms import InputSpec, image_transform, load_image
from tests.test_image_datamodule import write_store

SPEC = InputSpec(crop=8, resize=8)


def gradient16(width: int = 256, height: int = 4) -> np.ndarray:
    """A 16-bit horizontal gradient over the whole range 0..65535, a different offset in each row."""
    ramp = np.linspace(0, 65535, width)
    return np.stack([np.clip(ramp + 37 * r, 0, 65535) for r in range(height)]).astype(np.uint16)


def expected8(values: np.ndarray) -> np.ndarray:
    """The 16-bit -> 8-bit mapping the full range calls for: round(v * 255 / 65535)."""
    return np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def png16(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)  # uint16 -> mode I;16, a 16-bit greyscale PNG
    return path


def rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def grey3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2)


# ---------------------------------------------------------------------------------------------------- the helper
def test_a_16_bit_png_maps_its_full_range_to_8_bit(tmp_path):
    values = gradient16()
    path = png16(tmp_path / "g.png", values)
    with Image.open(path) as im:
        assert im.mode == "I;16"
        assert (np.asarray(im.convert("RGB")) == 255).mean() > 0.99  # PIL's own conversion clips: all but white
    out = rgb(read_rgb(path))
    np.testing.assert_array_equal(out, grey3(expected8(values)))
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) == 256  # not blank: the whole gradient
    # An 8-bit image widened to 16 bits (v * 257) reads back exactly.
    k = np.arange(256, dtype=np.uint16).reshape(16, 16)
    np.testing.assert_array_equal(rgb(read_rgb(png16(tmp_path / "w.png", k * 257))), grey3(k.astype(np.uint8)))


def test_16_bit_big_endian_and_16_bit_pgm_scale_the_same_way(tmp_path):
    values = gradient16(64, 2)
    big = Image.frombytes("I;16B", (64, 2), values.astype(">u2").tobytes())
    assert big.mode == "I;16B"
    np.testing.assert_array_equal(rgb(to_rgb(big)), grey3(expected8(values)))
    pgm = tmp_path / "g.pgm"
    Image.fromarray(values).save(pgm)
    with Image.open(pgm) as im:  # PIL decodes a 16-bit PGM to mode I (32-bit integers)
        assert im.mode == "I"
    np.testing.assert_array_equal(rgb(read_rgb(pgm)), grey3(expected8(values)))


def test_mode_i_outside_16_bits_and_mode_f_scale_by_their_own_range():
    wide = np.array([[-1000, 0, 1000, 3000]], dtype=np.int32)  # signed: no 16-bit white level
    np.testing.assert_array_equal(gray_to_uint8(wide, "I"), [[0, 64, 128, 255]])
    assert to_rgb(Image.fromarray(wide, mode="I")).getpixel((2, 0)) == (128, 128, 128)
    unit = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)  # [0, 1]: 1.0 is white
    np.testing.assert_array_equal(rgb(to_rgb(Image.fromarray(unit, mode="F"))), grey3(np.array([[0, 64, 128, 255]])))
    dark = np.array([[0.0, 0.1]], dtype=np.float32)  # a dark [0, 1] image stays dark
    np.testing.assert_array_equal(gray_to_uint8(dark, "F"), [[0, 26]])
    other = np.array([[-2.0, 0.0, 2.0, np.nan, np.inf, -np.inf]], dtype=np.float32)
    np.testing.assert_array_equal(gray_to_uint8(other, "F"), [[0, 128, 255, 0, 255, 0]])
    np.testing.assert_array_equal(gray_to_uint8(np.full((2, 2), 7.0, dtype=np.float32), "F"), np.zeros((2, 2)))


def test_palette_cmyk_alpha_bilevel_and_grey_modes_become_rgb(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert rgb(to_rgb(palette)).tolist() == [[[0, 0, 0], [200, 30, 40]]]
    palette.info["transparency"] = 0  # index 0 transparent: white, whatever colour it stores
    path = tmp_path / "p.png"
    palette.save(path)
    assert rgb(read_rgb(path)).tolist() == [[[255, 255, 255], [200, 30, 40]]]
    gif = tmp_path / "p.gif"
    palette.save(gif, transparency=0)
    assert rgb(read_rgb(gif)).tolist() == [[[255, 255, 255], [200, 30, 40]]]

    cmyk = tmp_path / "c.tif"
    Image.frombytes("CMYK", (2, 1), bytes([0, 255, 255, 0, 10, 20, 30, 40])).save(cmyk)
    assert rgb(read_rgb(cmyk)).tolist() == [[[255, 0, 0], [207, 198, 190]]]  # R = (255 - C)(255 - K) / 255

    la = Image.frombytes("LA", (3, 1), bytes([100, 255, 100, 0, 100, 128]))
    # Over white: 100 opaque, fully transparent -> 255, half -> 100 a + 255 (1 - a).
    half = round(100 * 128 / 255 + 255 * (1 - 128 / 255))
    assert [p[0] for p in rgb(to_rgb(la))[0]] == [100, 255, half]
    rgba = tmp_path / "a.png"
    Image.frombytes("RGBA", (2, 1), bytes([0, 0, 0, 0, 10, 200, 30, 255])).save(rgba)
    assert rgb(read_rgb(rgba)).tolist() == [[[255, 255, 255], [10, 200, 30]]]
    grey_key = Image.frombytes("L", (2, 1), bytes([9, 90]))
    grey_key.info["transparency"] = 9  # a transparent grey level (PNG tRNS)
    assert rgb(to_rgb(grey_key)).tolist() == [[[255, 255, 255], [90, 90, 90]]]

    bilevel = Image.frombytes("1", (8, 1), bytes([0b10100000]))
    assert rgb(to_rgb(bilevel))[0, :3].tolist() == [[255] * 3, [0] * 3, [255] * 3]
    assert rgb(to_rgb(Image.frombytes("L", (1, 1), bytes([77])))).tolist() == [[[77, 77, 77]]]


def test_exif_orientation_is_applied_once(tmp_path):
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = tmp_path / "r.jpg"
    image.save(path, exif=exif, quality=100)
    upright = read_rgb(path)
    assert upright.size == (2, 3)
    assert np.array_equal(rgb(to_rgb(upright)), rgb(upright))  # the transform's to_rgb does not turn it again


# ---------------------------------------------------------------------------------------------------- every reader
def test_image_sources_and_the_datamodule_read_16_bit_images(tmp_path):
    values = gradient16(16, 16)
    png16(tmp_path / "folder" / "cat" / "g16.png", values)
    Image.fromarray(expected8(values)).save(tmp_path / "folder" / "cat" / "g8.png")
    source = open_source(tmp_path / "folder")
    records = {r.id: r for r in source}
    np.testing.assert_array_equal(rgb(open_image(records["cat/g16.png"])), grey3(expected8(values)))
    in_memory = ImageRecord("x", None, data=(tmp_path / "folder" / "cat" / "g16.png").read_bytes())  # tar shards
    np.testing.assert_array_equal(rgb(open_image(in_memory)), grey3(expected8(values)))

    write_store(tmp_path / "store", list(records))
    dm = ImageDataModule(tmp_path / "folder", tmp_path / "folder", store=tmp_path / "store", input_spec=SPEC)
    batch = next(iter(dm.val_dataloader()))
    by_id = dict(zip(batch["id"], batch["image"], strict=True))
    assert by_id["cat/g16.png"].std() > 0.1  # not blank
    torch.testing.assert_close(by_id["cat/g16.png"], by_id["cat/g8.png"], rtol=0, atol=0)


def test_the_classifier_transform_and_explains_reader_read_16_bit_images(tmp_path):
    values = gradient16(16, 16)
    path = png16(tmp_path / "g16.png", values)
    want = image_transform(SPEC)(Image.fromarray(grey3(expected8(values))))
    torch.testing.assert_close(load_image(path, SPEC), want, rtol=0, atol=0)
    with Image.open(path) as im:  # a PIL image handed to the transform in its own mode
        torch.testing.assert_close(image_transform(SPEC)(im), want, rtol=0, atol=0)
    assert explain.load_image is transforms.load_image  # explain reads its image files with it


def test_mask_datasets_read_16_bit_images_and_leave_masks_alone(tmp_path):
    root = tmp_path / "masks"
    values = gradient16(16, 16)
    png16(root / "images" / "a.png", values)
    (root / "concepts.csv").write_text("name,type\nsquare,shape\n")
    labels = np.zeros((16, 16), dtype=np.uint16)  # a 16-bit mask: non-zero is the concept, whatever its value
    labels[4:8, 4:8] = 1
    png16(root / "masks" / "a" / "square.png", labels)
    item = open_mask_dataset(root, InputSpec(crop=16, resize=16))[0]
    want = image_transform(InputSpec(crop=16, resize=16))(Image.fromarray(grey3(expected8(values))))
    torch.testing.assert_close(item["image"], want, rtol=0, atol=0)
    assert item["concepts"].tolist() == [0] and item["masks"][0].sum() == 16 and item["masks"][0, 4:8, 4:8].all()
