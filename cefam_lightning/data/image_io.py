"""Every image file becomes 8-bit RGB here, whatever its PIL mode: the one reader of training data, ``precompute``,
``explain`` and the evaluation datasets.

``Image.convert("RGB")`` alone is wrong for several modes: it clips 16-bit and 32-bit grey values to 255 (a
16-bit PNG turns all white, and a model then explains a blank image with confidence), and it drops an alpha
channel, revealing whatever colour transparent pixels happen to store. :func:`to_rgb` converts each mode as
follows (after applying the EXIF orientation):

- ``RGB``: unchanged. ``1``, ``L``, ``P`` (without transparency), ``CMYK``, ``YCbCr``, ``RGBX`` and other modes
  PIL converts to RGB itself: PIL's conversion. An embedded ICC profile is not applied (as before, and as
  torchvision's and timm's loaders do).
- **Transparency** (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, and ``P``/``L``/``RGB`` with a
  transparent colour or palette entry): composited over white, as a viewer shows the image on a white page, so
  that fully transparent pixels look the same whatever colour they store.
- **16-bit grey** (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): the type's full range, ``0..65535`` -> ``0..255``
  (``round(v / 257)``: a 16-bit value that is an 8-bit value times 257 maps back to that 8-bit value exactly).
  A dark 16-bit image stays dark: its white is 65535, not its brightest pixel.
- **32-bit integer grey** (``I``): PIL decodes 16-bit PGM files (and, in older versions, 16-bit PNGs) to this
  mode, so values within ``0..65535`` are scaled as 16-bit. Values outside it (a 32-bit or signed integer TIFF)
  have no standard white level; such an image is scaled from its own minimum (0) to its maximum (255).
- **32-bit float grey** (``F``): values within ``[0, 1]``, the usual range of float images, map ``1.0`` to 255.
  Other float images have no standard range and are scaled from their own minimum to maximum; NaN becomes 0,
  ``-inf`` 0 and ``+inf`` 255. An image of one constant value outside the standard range becomes black.
"""

from __future__ import annotations

import os
from typing import IO

import numpy as np
from PIL import Image, ImageOps

WHITE = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def read_rgb(src: str | os.PathLike | IO[bytes]) -> Image.Image:
    """Open and decode an image file (a path or a binary file object) as 8-bit RGB, see :func:`to_rgb`.

    PIL's own errors propagate (``OSError``, ``ValueError``, ``Image.DecompressionBombError``, ...): each caller
    names the file in its own error type.
    """
    with Image.open(src) as image:
        image.load()
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in any PIL mode as 8-bit RGB, turned upright by its EXIF orientation (see the module docstring).

    A mode PIL cannot convert to RGB raises PIL's ``ValueError``.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return Image.fromarray(gray_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        if mode == "La":  # PIL converts premultiplied grey only to straight grey-alpha
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def gray_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """The 8-bit grey levels of a 16-bit, 32-bit integer or float image's values (``mode``: its PIL mode)."""
    if mode in _SIXTEEN_BIT:
        return _sixteen_bit(values)
    if mode == "I":
        if values.size == 0 or (values.min() >= 0 and values.max() <= 65535):
            return _sixteen_bit(values)
        return _stretch(values.astype(np.float64))
    if mode == "F":
        values = values.astype(np.float64)
        finite = np.isfinite(values)
        if finite.all() and (values.size == 0 or (values.min() >= 0.0 and values.max() <= 1.0)):
            return np.rint(values * 255.0).astype(np.uint8)
        out = _stretch(np.where(finite, values, np.nan))
        out[np.isposinf(values)] = 255
        return out
    raise ValueError(f"not a 16-bit, 32-bit integer or float mode: {mode}")


def _sixteen_bit(values: np.ndarray) -> np.ndarray:
    # round(v * 255 / 65535) = round(v / 257), in integers: exact, and 257 * k maps back to k.
    return ((values.astype(np.int64) + 128) // 257).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Finite values from their minimum (0) to their maximum (255); NaN to 0; a constant image to 0."""
    finite = values[np.isfinite(values)]
    out = np.zeros(values.shape, dtype=np.uint8)
    if finite.size == 0:
        return out
    lo, hi = float(finite.min()), float(finite.max())
    if hi > lo:
        scaled = np.rint((values - lo) * (255.0 / (hi - lo)))
        out = np.where(np.isfinite(scaled), scaled, 0).astype(np.uint8)
    return out
