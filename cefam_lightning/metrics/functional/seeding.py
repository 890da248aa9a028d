"""Per-image random streams: an image's random draws (its random map, its ROAD imputation noise) depend on the
evaluation's seed and the image's index only, not on its batch or on the process that evaluates it."""

from __future__ import annotations

# torch seeds its CPU generator with the low 32 bits of a seed (a Mersenne Twister): ``seed * 2**32 + image``
# would drop the evaluation's seed. An odd multiplier near 2**32 / golden ratio keeps the streams of one seed's
# images apart from another seed's for any realistic number of images; seed 0 gives image i the seed i.
_STRIDE = 0x9E3779B1
_MASK = 2**32 - 1


def image_seed(seed: int, image: int) -> int:
    """The 32-bit generator seed of image ``image`` (its index among the evaluated images) under ``seed``."""
    return (int(image) + int(seed) * _STRIDE) & _MASK
