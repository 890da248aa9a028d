"""The shapes world (docs/method.md#the-shapes-world): a seeded synthetic world with exact concept masks and an
oracle VLM.

Each image shows 1-3 non-overlapping objects on a noisy background. Every object has a color, a shape and a
texture; every attribute value is a concept with an exact pixel mask. The class of an image is the
color-shape pair of its one *key object* (a fixed list of pairs); distractors use pairs outside that list,
so the key object's concepts are the ones that must drive the class score.

The oracle VLM stands in for CLIP: concept text embeddings are fixed orthonormal vectors, and an image's
embedding is ``normalize(sum_c sqrt(area_c) t_c) + noise``, written to the same embedding store that real
VLM precomputation writes.

Every image draws from its own random stream, seeded by ``(seed, split, index)``, so the same seed gives
byte-identical data and the first images of a split do not change when the split grows.

``world.shortcut`` plants a shortcut in the train split only: a texture tied to one class (:class:`Shortcut`,
:func:`shortcut_tie`), for testing whether a concept report finds what a classifier leans on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cefam_lightning.data.concepts import Concept, make_concepts
from cefam_lightning.data.embedding_store import EmbeddingStore, VLMInfo
from cefam_lightning.io_utils import atomic_dir, stable_hash

log = logging.getLogger(__name__)

# Bump when the generator's output changes, so old caches are not reused.
GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")

COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.80),
    "orange": (1.00, 0.55, 0.05),
    "cyan": (0.10, 0.85, 0.90),
}
SHAPES = ("circle", "square", "triangle", "diamond")
TEXTURES = ("plain", "striped", "dotted")
SHORTCUT_KEYS = ("class", "concept", "strength")
# An omitted (or null) strength: the tie holds in every train image. With 0.95 the demo classifier learns the key
# object's color and shape from the ~4 % of train images that break the tie and does not use the shortcut at all
# (docs/method.md#shortcut has the measurements).
SHORTCUT_STRENGTH = 1.0
# The fourth seed word of an image's shortcut draws (its other draws keep the 3-word stream).
_SHORTCUT_STREAM = 3000


@dataclass(frozen=True)
class Shortcut:
    """A texture tied to a class in the train split (``world.shortcut``, parsed and checked).

    An image of ``class_name`` draws its key object's texture as ``concept`` with probability ``strength`` (else
    one of the other textures); an image of any other class, with probability ``strength``, has no object of
    that texture (else its textures are drawn as usual).
    """

    class_name: str
    concept: str
    strength: float

    @classmethod
    def parse(cls, value: Any, spec: WorldSpec) -> Shortcut:
        """``world.shortcut``'s mapping ``{class, concept, strength}`` checked against ``spec``'s classes and
        textures; a ``ValueError`` names the offending key. ``strength`` may be left out: :data:`SHORTCUT_STRENGTH`."""
        if not isinstance(value, Mapping):
            raise ValueError(f"world.shortcut: expected a mapping {{class, concept, strength}} or null, got {value!r}")
        unknown = sorted(str(k) for k in value if k not in SHORTCUT_KEYS)
        if unknown:
            raise ValueError(f"world.shortcut: unknown key(s) {unknown}; its keys are {list(SHORTCUT_KEYS)}")
        missing = [k for k in ("class", "concept") if value.get(k) is None]
        if missing:
            raise ValueError(
                f"{', '.join(f'world.shortcut.{k}' for k in missing)}: missing (world.shortcut needs a class and a "
                "concept, and optionally a strength)"
            )
        klass, concept = value["class"], value["concept"]
        strength = SHORTCUT_STRENGTH if value.get("strength") is None else value["strength"]
        if klass not in spec.classes:
            raise ValueError(f"world.shortcut.class: {klass!r} is not one of the world's classes {list(spec.classes)}")
        if concept not in spec.textures:
            kind = "color" if concept in spec.colors else "shape" if concept in spec.shapes else None
            why = f"{concept!r} is a {kind}, but" if kind else f"{concept!r} is not one of the world's textures:"
            raise ValueError(
                f"world.shortcut.concept: {why} the shortcut is a texture, which can ride on the key object "
                f"without changing its class; one of world.textures {list(spec.textures)}"
            )
        if len(spec.textures) < 2:
            raise ValueError(
                "world.shortcut needs at least two world.textures: the tie is broken by drawing another texture"
            )
        number = isinstance(strength, int | float) and not isinstance(strength, bool)
        if not number or not 0 < strength <= 1:
            raise ValueError(f"world.shortcut.strength must be in (0, 1], got {strength!r}")
        return cls(str(klass), str(concept), float(strength))

    def as_config(self) -> dict[str, Any]:
        return {"class": self.class_name, "concept": self.concept, "strength": self.strength}

    def retexture(self, spec: WorldSpec, label: int, textures: list[str], rng: np.random.Generator) -> list[str]:
        """The textures of one train image's objects (key object first) under the tie, from the ones it drew
        without it; only those the tie changes are redrawn, each uniformly among the textures but ``concept``."""
        others = [t for t in spec.textures if t != self.concept]
        tied = rng.random() < self.strength
        if spec.classes[label] == self.class_name:
            if tied:
                return [self.concept, *textures[1:]]
            if textures[0] == self.concept:
                return [others[int(rng.integers(len(others)))], *textures[1:]]
            return list(textures)
        if tied:
            return [others[int(rng.integers(len(others)))] if t == self.concept else t for t in textures]
        return list(textures)


@dataclass
class WorldSpec:
    """Everything that determines the world's data; its hash keys the on-disk cache."""

    image_size: int = 64
    n_train: int = 4000
    n_val: int = 500
    n_test: int = 500
    seed: int = 0
    colors: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow"])
    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle"])
    textures: list[str] = field(default_factory=lambda: ["plain", "striped"])
    # Each class is the "color shape" pair of the key object.
    classes: list[str] = field(
        default_factory=lambda: [
            "red circle",
            "green square",
            "blue triangle",
            "yellow circle",
            "green triangle",
            "blue square",
        ]
    )
    min_objects: int = 1
    max_objects: int = 3
    # Object radius as a fraction of the image size.
    min_radius: float = 0.11
    max_radius: float = 0.19
    background_noise: float = 0.06
    embed_dim: int = 32
    embedding_noise: float = 0.05
    vlm_kind: str = "clip"
    logit_scale: float = 100.0
    logit_bias: float = 0.0
    # A texture tied to a class in the train split: {class: "red circle", concept: striped, strength: 1.0} (a
    # mapping, not a dataclass: its key ``class`` is a Python keyword; strength may be left out); None: no shortcut.
    # See Shortcut.
    shortcut: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.validate()
        if self.shortcut is not None:  # one spelling per shortcut, so that one world has one cache key
            self.shortcut = Shortcut.parse(self.shortcut, self).as_config()

    def validate(self) -> None:
        for c in self.colors:
            if c not in COLOR_RGB:
                raise ValueError(f"world.colors: unknown color {c!r}; known: {sorted(COLOR_RGB)}")
        for s in self.shapes:
            if s not in SHAPES:
                raise ValueError(f"world.shapes: unknown shape {s!r}; known: {list(SHAPES)}")
        for t in self.textures:
            if t not in TEXTURES:
                raise ValueError(f"world.textures: unknown texture {t!r}; known: {list(TEXTURES)}")
        names = self.colors + self.shapes + self.textures
        if len(set(names)) != len(names):
            raise ValueError("world: color, shape and texture names must be distinct")
        for pair in self.classes:
            parts = pair.split()
            if len(parts) != 2 or parts[0] not in self.colors or parts[1] not in self.shapes:
                raise ValueError(f"world.classes: {pair!r} is not a 'color shape' pair of the world's colors/shapes")
        if len(set(self.classes)) != len(self.classes) or len(self.classes) < 2:
            raise ValueError("world.classes: need at least two distinct classes")
        if self.max_objects > 1 and len(self.distractor_pairs) == 0:
            raise ValueError("world: every color-shape pair is a class, so there is none left for distractors")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError("world: need 1 <= min_objects <= max_objects <= 4")
        if self.embed_dim < self.num_concepts:
            raise ValueError(
                f"world.embed_dim={self.embed_dim} must be >= the number of concepts ({self.num_concepts}) "
                "for orthonormal concept embeddings"
            )
        if self.image_size < 16:
            raise ValueError("world.image_size must be >= 16")
        if self.shortcut is not None:
            Shortcut.parse(self.shortcut, self)

    @property
    def shortcut_rule(self) -> Shortcut | None:
        """``shortcut`` parsed (``None``: no shortcut)."""
        return None if self.shortcut is None else Shortcut.parse(self.shortcut, self)

    @property
    def concepts(self) -> list[Concept]:
        return make_concepts(
            [(c, "color") for c in self.colors]
            + [(s, "shape") for s in self.shapes]
            + [(t, "texture") for t in self.textures]
        )

    @property
    def num_concepts(self) -> int:
        return len(self.colors) + len(self.shapes) + len(self.textures)

    @property
    def distractor_pairs(self) -> list[tuple[str, str]]:
        classes = {tuple(p.split()) for p in self.classes}
        return [(c, s) for c in self.colors for s in self.shapes if (c, s) not in classes]

    def split_size(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    def as_dict(self) -> dict[str, Any]:
        """The spec as hashed and recorded: without ``shortcut`` when it is None, so that the worlds cached before
        the option existed keep their keys."""
        d = asdict(self)
        if d["shortcut"] is None:
            del d["shortcut"]
        return d

    def cache_key(self) -> str:
        return stable_hash({"spec": self.as_dict(), "version": GENERATOR_VERSION})


@dataclass
class WorldSplit:
    """One split's arrays (memory-mapped when loaded from the cache)."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    masks: np.ndarray  # bool (N, C, H, W), one mask per concept
    labels: np.ndarray  # int64 (N,)
    ids: list[str]

    @property
    def presence(self) -> np.ndarray:
        return self.masks.any(axis=(2, 3))

    def batches(
        self,
        batch_size: int,
        limit: int | None = None,
        device: torch.device | str = "cpu",
        images: range | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The split in order, ``(images, masks, labels)`` per batch, on ``device``: images ``(B, 3, H, W)`` float
        in ``[0, 1]``, masks ``(B, C, H, W)`` bool, labels ``(B,)`` int64; the first ``limit`` images (``None``:
        all), or of those the ``images`` range only (one process's part). The one way evaluation code reads a
        split."""
        n = len(self) if limit is None else min(int(limit), len(self))
        first, n = (0, n) if images is None else (max(images.start, 0), min(images.stop, n))
        for start in range(first, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            images = torch.from_numpy(np.array(self.images[sl])).to(device).permute(0, 3, 1, 2).float().div_(255)
            masks = torch.from_numpy(np.array(self.masks[sl])).to(device)
            labels = torch.from_numpy(np.asarray(self.labels[sl])).to(device)
            yield images, masks, labels

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------------------------- drawing
def _shape_mask(shape: str, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = r * 0.85
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # upright, inscribed in the circle of radius r
        top, base = -r, r * 0.6
        inside_y = (dy >= top) & (dy <= base)
        half_width = (dy - top) / (base - top) * r * 0.95
        return inside_y & (np.abs(dx) <= half_width)
    raise ValueError(shape)


def _texture_dark(texture: str, yy: np.ndarray, xx: np.ndarray, period: int, phase: int) -> np.ndarray:
    if texture == "plain":
        return np.zeros(yy.shape, dtype=bool)
    if texture == "striped":
        return ((xx + yy + phase) // max(period // 2, 1)) % 2 == 1
    if texture == "dotted":
        return ((xx + phase) % period < period // 2) & ((yy + phase) % period < period // 2)
    raise ValueError(texture)


def _place(rng: np.random.Generator, radii: list[float], size: int) -> list[tuple[float, float]] | None:
    centers: list[tuple[float, float]] = []
    for r in radii:
        for _ in range(100):
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 2) ** 2 for (x, y), q in zip(centers, radii, strict=False)):
                centers.append((float(cx), float(cy)))
                break
        else:
            return None
    return centers


def render_image(
    spec: WorldSpec, seed_words: tuple[int, ...], shortcut: Shortcut | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Draw one image from its own seeded stream: returns (uint8 HxWx3 image, bool CxHxW masks, label).

    With ``shortcut`` (the train split of a world with one), the objects' textures follow the tie
    (:meth:`Shortcut.retexture`), drawn from a stream of their own, ``(*seed_words, 3000)``: the image's own
    stream makes the same draws as without it, so everything but those textures is the image the world without
    the shortcut has.
    """
    rng = np.random.default_rng(np.random.SeedSequence(list(seed_words)))
    s = spec.image_size
    concept_index = {c.name: i for i, c in enumerate(spec.concepts)}
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)

    label = int(rng.integers(len(spec.classes)))
    n_obj = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    distractors = spec.distractor_pairs
    pairs = [tuple(spec.classes[label].split())]
    for _ in range(n_obj - 1):
        pairs.append(distractors[int(rng.integers(len(distractors)))])
    textures = [spec.textures[int(rng.integers(len(spec.textures)))] for _ in pairs]
    if shortcut is not None:
        tie_rng = np.random.default_rng(np.random.SeedSequence([*seed_words, _SHORTCUT_STREAM]))
        textures = shortcut.retexture(spec, label, textures, tie_rng)
    while True:
        radii = [float(rng.uniform(spec.min_radius, spec.max_radius) * s) for _ in pairs]
        centers = _place(rng, radii, s)
        if centers is not None:
            break

    level = rng.uniform(0.3, 0.65)
    img = level + rng.normal(0.0, spec.background_noise, size=(s, s, 3)).astype(np.float32)
    masks = np.zeros((spec.num_concepts, s, s), dtype=bool)
    period = max(4, s // 12)
    for (color, shape), texture, r, (cx, cy) in zip(pairs, textures, radii, centers, strict=True):
        m = _shape_mask(shape, cx, cy, r, yy, xx)
        rgb = np.asarray(COLOR_RGB[color], dtype=np.float32) * rng.uniform(0.85, 1.05)
        dark = _texture_dark(texture, yy, xx, period, int(rng.integers(period))) & m
        img[m] = rgb + rng.normal(0.0, 0.02, size=(int(m.sum()), 3))
        img[dark] *= 0.45
        for name in (color, shape, texture):
            masks[concept_index[name]] |= m
    return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8), masks, label


def generate_split(spec: WorldSpec, split: str) -> WorldSplit:
    """Generate a whole split in memory (the train split with ``spec.shortcut``'s tie, val and test without)."""
    n, s = spec.split_size(split), spec.image_size
    shortcut = spec.shortcut_rule if split == "train" else None
    images = np.empty((n, s, s, 3), dtype=np.uint8)
    masks = np.empty((n, spec.num_concepts, s, s), dtype=bool)
    labels = np.empty((n,), dtype=np.int64)
    sid = SPLITS.index(split)
    for i in range(n):
        images[i], masks[i], labels[i] = render_image(spec, (spec.seed, sid, i), shortcut)
    return WorldSplit(images=images, masks=masks, labels=labels, ids=[f"{split}/{i:06d}" for i in range(n)])


# ---------------------------------------------------------------------------------------------- oracle VLM
def oracle_text_embeddings(spec: WorldSpec) -> np.ndarray:
    """Fixed orthonormal text embedding per concept, (C, d) float32."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 1000]))
    q, _ = np.linalg.qr(rng.normal(size=(spec.embed_dim, spec.num_concepts)))
    return np.ascontiguousarray(q.T, dtype=np.float32)


def oracle_image_embeddings(spec: WorldSpec, split: str, masks: np.ndarray, text: np.ndarray) -> np.ndarray:
    """``normalize(sum_c sqrt(area fraction_c) t_c) + noise``, one row per image (raw, not re-normalized)."""
    area = masks.reshape(masks.shape[0], masks.shape[1], -1).mean(axis=2, dtype=np.float64)
    e = np.sqrt(area) @ text.astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 2000, SPLITS.index(split)]))
    e += rng.normal(0.0, spec.embedding_noise / np.sqrt(spec.embed_dim), size=e.shape)
    return e.astype(np.float32)


def oracle_vlm_info(spec: WorldSpec) -> VLMInfo:
    return VLMInfo(name="shapes-oracle", kind=spec.vlm_kind, logit_scale=spec.logit_scale, logit_bias=spec.logit_bias)


# ---------------------------------------------------------------------------------------------- the cached world
class ShapesWorld:
    """A generated world on disk: per-split arrays plus the oracle's embedding store.

    ``ShapesWorld.build(spec, cache_dir)`` generates the world once and reuses it on later calls with the same
    spec (the folder is named after the spec's hash and written atomically).
    """

    def __init__(self, root: Path, spec: WorldSpec):
        self.root = root
        self.spec = spec
        self.concepts = spec.concepts
        self.class_names = list(spec.classes)
        self._store: EmbeddingStore | None = None

    @property
    def store_path(self) -> Path:
        return self.root / "vlm_store"

    @property
    def store(self) -> EmbeddingStore:
        if self._store is None:
            self._store = EmbeddingStore.open(self.store_path)
        return self._store

    def split(self, name: str) -> WorldSplit:
        d = self.root / name
        return WorldSplit(
            images=np.load(d / "images.npy", mmap_mode="r"),
            masks=np.load(d / "masks.npy", mmap_mode="r"),
            labels=np.load(d / "labels.npy"),
            ids=[f"{name}/{i:06d}" for i in range(self.spec.split_size(name))],
        )

    @staticmethod
    def cache_path(spec: WorldSpec, cache_dir: str | Path) -> Path:
        return Path(cache_dir).expanduser() / "shapes_world" / spec.cache_key()

    @classmethod
    def build(cls, spec: WorldSpec, cache_dir: str | Path) -> ShapesWorld:
        """Return the cached world for ``spec``, generating it first if it is not on disk."""
        root = cls.cache_path(spec, cache_dir)
        if (root / "world.json").is_file():
            log.info("Reusing shapes world at %s", root)
            return cls(root, spec)
        log.info("Generating shapes world at %s", root)
        text = oracle_text_embeddings(spec)
        all_ids, all_emb = [], []
        with atomic_dir(root) as tmp:
            for split in SPLITS:
                data = generate_split(spec, split)
                (tmp / split).mkdir()
                np.save(tmp / split / "images.npy", data.images)
                np.save(tmp / split / "masks.npy", data.masks)
                np.save(tmp / split / "labels.npy", data.labels)
                all_ids += data.ids
                all_emb.append(oracle_image_embeddings(spec, split, data.masks, text))
            EmbeddingStore.write(
                tmp / "vlm_store",
                sample_ids=all_ids,
                image_embeddings=np.concatenate(all_emb),
                text_embeddings=text,
                concepts=spec.concepts,
                vlm=oracle_vlm_info(spec),
                extra={"source": "shapes world oracle", "world_key": spec.cache_key()},
            )
            # world.json last: its presence marks a complete world.
            (tmp / "world.json").write_text(
                json.dumps({"spec": spec.as_dict(), "version": GENERATOR_VERSION}, indent=2)
            )
        return cls(root, spec)


def key_object_concepts(spec: WorldSpec, masks: np.ndarray | torch.Tensor, labels) -> torch.Tensor:
    """Which present concepts belong to each image's key object: ``(B, C)`` bool.

    The key object is the only one with its class's color-shape pair (distractors use other pairs, and objects
    do not overlap), so its pixels are ``mask[color] & mask[shape]``, and its concepts are those whose masks
    cover any of them: its color, its shape and its texture.

    Args:
        spec: the world (its concept order and classes).
        masks: ``(B, C, H, W)`` concept masks.
        labels: ``(B,)`` class indices.
    """
    masks = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks).bool()
    return (masks & key_object_pixels(spec, masks, labels)[:, None]).flatten(2).any(dim=2)


def key_object_pixels(spec: WorldSpec, masks: np.ndarray | torch.Tensor, labels) -> torch.Tensor:
    """The key object's pixels, ``(B, H, W)`` bool: ``mask[color] & mask[shape]`` of each image's class pair.

    The one ground truth of a class map (L-CAM's, SIAM's, CE-FAM's fused one): the object that makes the class,
    not the other objects that share its color or shape.

    Args:
        spec: the world (its concept order and classes).
        masks: ``(B, C, H, W)`` concept masks.
        labels: ``(B,)`` class indices.
    """
    masks = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks).bool()
    labels = torch.as_tensor(labels, dtype=torch.long, device=masks.device)
    index = {c.name: i for i, c in enumerate(spec.concepts)}
    pairs = torch.tensor([[index[n] for n in cls.split()] for cls in spec.classes], device=masks.device)
    rows = torch.arange(len(labels), device=masks.device)
    return masks[rows, pairs[labels, 0]] & masks[rows, pairs[labels, 1]]


def shortcut_tie(spec: WorldSpec, masks: np.ndarray | torch.Tensor, labels) -> torch.Tensor:
    """Which images follow ``spec.shortcut``'s tie, ``(B,)`` bool: an image of the shortcut class whose key object
    carries the concept, or an image of another class with the concept on no object.

    On the train split the tie holds in about ``strength`` of the images; on val and test (drawn without it) at
    the base rate.

    Args:
        spec: a world with a shortcut (its concept order, classes and ``shortcut``).
        masks: ``(B, C, H, W)`` concept masks.
        labels: ``(B,)`` class indices.
    """
    rule = spec.shortcut_rule
    if rule is None:
        raise ValueError("shortcut_tie: the world has no shortcut (world.shortcut is null)")
    # A copy of an array: a split's memory-mapped masks are read-only, which torch warns about.
    masks = (masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.array(masks))).bool()
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    labels = labels.to(masks.device)
    c = [x.name for x in spec.concepts].index(rule.concept)
    on_key = key_object_concepts(spec, masks, labels)[:, c]
    anywhere = masks[:, c].flatten(1).any(dim=1)
    of_class = labels == spec.classes.index(rule.class_name)
    return torch.where(of_class, on_key, ~anywhere)
