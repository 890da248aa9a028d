"""The planted shortcut (``world.shortcut``): the default world is untouched, the tie holds in train only, bad
values are named, and the reliance report counts what it says."""

import hashlib

import numpy as np
import pytest
import torch

from cefam_lightning.config_rules import ConfigError
from cefam_lightning.data.shapes_world import ShapesWorld, WorldSpec, generate_split, key_object_concepts, shortcut_tie
from cefam_lightning.metrics.shortcut import classifier_shortcut_reliance, shortcut_reliance
from cefam_lightning.training.config import CONFIG_DIR, load_config, world_spec
from tests.conftest import TINY_WORLD

SHORTCUT = {"class": "red circle", "concept": "striped", "strength": 0.95}
# A tiny world with enough images for the rates (generation is ~1 ms an image at 32 px).
BIG = {**TINY_WORLD, "n_train": 600, "n_test": 600}


def _digest(split) -> str:
    return hashlib.sha256(split.images.tobytes() + split.masks.tobytes() + split.labels.tobytes()).hexdigest()[:16]


def test_default_world_keeps_its_cache_key_and_data():
    """The values the generator gave before the option existed: cached worlds (and their classifiers) stay valid."""
    spec = WorldSpec(**TINY_WORLD)
    assert spec.shortcut is None and "shortcut" not in spec.as_dict()
    assert spec.cache_key() == "f68d125ad7161214"
    assert WorldSpec().cache_key() == "3b4e0726bf106abc"  # the demo world
    expected = {"train": "0f13bb6ad141918d", "val": "5524a5a137f2cec5", "test": "ba2c8a2236618157"}
    assert {s: _digest(generate_split(spec, s)) for s in expected} == expected


def test_a_shortcut_is_another_world_with_one_spelling():
    plain = WorldSpec(**TINY_WORLD)
    a = WorldSpec(**TINY_WORLD, shortcut={**SHORTCUT, "strength": 1})
    b = WorldSpec(**TINY_WORLD, shortcut={**SHORTCUT, "strength": 1.0})
    assert a.cache_key() == b.cache_key() != plain.cache_key()
    assert a.shortcut == {"class": "red circle", "concept": "striped", "strength": 1.0}
    assert WorldSpec(**TINY_WORLD, shortcut=SHORTCUT).cache_key() != a.cache_key()
    # An omitted strength is a tie in every train image.
    c = WorldSpec(**TINY_WORLD, shortcut={"class": "red circle", "concept": "striped"})
    assert c.cache_key() == a.cache_key() and c.shortcut_rule.strength == 1.0


@pytest.fixture(scope="module")
def splits():
    plain, tied = WorldSpec(**BIG), WorldSpec(**BIG, shortcut=SHORTCUT)
    return {
        (kind, split): generate_split(spec, split)
        for kind, spec in (("plain", plain), ("tied", tied))
        for split in ("train", "test")
    } | {"spec": tied}


def test_tie_holds_at_about_strength_in_train_and_at_the_base_rate_in_test(splits):
    spec = splits["spec"]
    train, test = splits["tied", "train"], splits["tied", "test"]
    in_train = shortcut_tie(spec, train.masks, train.labels).float()
    in_test = shortcut_tie(spec, test.masks, test.labels).float()
    base_train = shortcut_tie(spec, splits["plain", "train"].masks, splits["plain", "train"].labels).float()
    # Other classes: strength + (1 - strength) x the base rate of no stripes; the shortcut class: strength.
    assert 0.93 <= in_train.mean() <= 1.0
    assert abs(in_test.mean() - base_train.mean()) < 0.06 and in_test.mean() < 0.5
    k = spec.classes.index("red circle")
    of_class = torch.from_numpy(train.labels) == k
    assert abs(in_train[of_class].mean() - 0.95) < 0.06  # ~100 red circles


def test_only_the_train_textures_change(splits):
    spec = splits["spec"]
    np.testing.assert_array_equal(splits["tied", "test"].images, splits["plain", "test"].images)
    np.testing.assert_array_equal(splits["tied", "test"].masks, splits["plain", "test"].masks)
    assert _digest(generate_split(spec, "val")) == _digest(generate_split(WorldSpec(**BIG), "val"))
    plain, tied = splits["plain", "train"], splits["tied", "train"]
    np.testing.assert_array_equal(tied.labels, plain.labels)
    names = [c.name for c in spec.concepts]
    textures = [names.index(t) for t in spec.textures]
    others = [i for i in range(len(names)) if i not in textures]
    # Same objects in the same places, colors and shapes; some textures redrawn (and so some pixels).
    np.testing.assert_array_equal(tied.masks[:, others], plain.masks[:, others])
    changed = (tied.masks[:, textures] != plain.masks[:, textures]).any(axis=(1, 2, 3))
    assert 0.3 < changed.mean() < 0.8  # ~5/6 x 0.95 x P(stripes somewhere) + 1/6 x ~0.5
    assert (changed == (tied.images != plain.images).any(axis=(1, 2, 3))).all()


def test_strength_one_ties_every_train_image():
    spec = WorldSpec(**{**TINY_WORLD, "n_train": 200}, shortcut={**SHORTCUT, "strength": 1})
    train = generate_split(spec, "train")
    assert shortcut_tie(spec, train.masks, train.labels).all()


@pytest.mark.parametrize(
    ("shortcut", "message"),
    [
        ({**SHORTCUT, "class": "pink circle"}, r"world\.shortcut\.class: 'pink circle' is not one of the world's"),
        ({**SHORTCUT, "concept": "red"}, r"world\.shortcut\.concept: 'red' is a color.*texture"),
        ({**SHORTCUT, "concept": "circle"}, r"world\.shortcut\.concept: 'circle' is a shape"),
        ({**SHORTCUT, "concept": "dotted"}, r"world\.shortcut\.concept: 'dotted' is not one of the world's textures"),
        ({**SHORTCUT, "strength": 0}, r"world\.shortcut\.strength must be in \(0, 1\], got 0"),
        ({**SHORTCUT, "strength": 1.5}, r"world\.shortcut\.strength"),
        ({"strength": 0.5}, r"world\.shortcut\.class, world\.shortcut\.concept: missing"),
        ({**SHORTCUT, "klass": "x"}, r"world\.shortcut: unknown key\(s\) \['klass'\]"),
        ("red circle", r"world\.shortcut: expected a mapping"),
    ],
)
def test_bad_shortcuts_are_named(shortcut, message):
    with pytest.raises(ValueError, match=message):
        WorldSpec(**TINY_WORLD, shortcut=shortcut)


def test_a_shortcut_needs_a_texture_to_break_the_tie_with():
    with pytest.raises(ValueError, match="at least two world.textures"):
        WorldSpec(**{**TINY_WORLD, "textures": ["striped"]}, shortcut=SHORTCUT)


def test_experiment_file_merges_and_validates(tmp_path):
    cfg = load_config(CONFIG_DIR / "experiment" / "shortcut.yaml", [f"cache_dir={tmp_path}"])
    spec = world_spec(cfg)
    assert spec.shortcut == {**SHORTCUT, "strength": 1.0} and spec.shortcut_rule.class_name == "red circle"
    assert spec.cache_key() != world_spec(load_config(None, [f"cache_dir={tmp_path}"])).cache_key()
    # The default config leaves the world as it was, and a bad value is a ConfigError naming the key.
    assert world_spec(load_config()).cache_key() == WorldSpec().cache_key()
    with pytest.raises(ConfigError, match=r"world\.shortcut\.strength"):
        load_config(CONFIG_DIR / "experiment" / "shortcut.yaml", ["world.shortcut.strength=2"])
    with pytest.raises(ConfigError, match=r"world\.shortcut\.class"):
        load_config(None, ["world.shortcut={class: purple circle, concept: striped, strength: 0.5}"])


def _masks(spec, rows):
    """``rows``: (label, key texture, distractor texture or None) -> (N, C, 8, 8) masks."""
    names = [c.name for c in spec.concepts]
    out = np.zeros((len(rows), len(names), 8, 8), dtype=bool)
    for i, (label, key, other) in enumerate(rows):
        color, shape = spec.classes[label].split()
        for n in (color, shape, key):
            out[i, names.index(n), :, :4] = True
        if other is not None:  # a distractor: a pair that is not a class
            color, shape = spec.distractor_pairs[0]
            for n in (color, shape, other):
                out[i, names.index(n), :, 4:] = True
    return out, np.array([r[0] for r in rows])


def test_tie_and_reliance_on_hand_made_predictions():
    spec = WorldSpec(**TINY_WORLD, shortcut=SHORTCUT)
    rc, gs = spec.classes.index("red circle"), spec.classes.index("green square")
    rows = [
        (rc, "striped", None),  # 0 tie holds
        (rc, "plain", "striped"),  # 1 broken: the stripes are on a distractor, not the key object
        (rc, "plain", None),  # 2 broken
        (gs, "plain", None),  # 3 holds
        (gs, "plain", "plain"),  # 4 holds
        (gs, "striped", None),  # 5 broken
        (gs, "plain", "striped"),  # 6 broken
    ]
    masks, labels = _masks(spec, rows)
    tie = shortcut_tie(spec, masks, labels)
    assert tie.tolist() == [True, False, False, True, True, False, False]
    predictions = [rc, gs, rc, gs, rc, rc, gs]  # wrong: 1 (miss), 4 (holds, not a shortcut error), 5 (error)
    r = shortcut_reliance(spec, masks, labels, predictions)
    assert r["n_tie_holds"] == 3 and r["n_tie_broken"] == 4
    assert r["acc_tie_holds"] == pytest.approx(2 / 3) and r["acc_tie_broken"] == pytest.approx(2 / 4)
    assert r["acc_drop"] == pytest.approx(2 / 3 - 1 / 2)
    assert (r["shortcut_errors"], r["n_other_with_concept"]) == (1, 2)
    assert (r["shortcut_misses"], r["n_class_without_concept"]) == (1, 2)
    # Torch inputs give the same; no image where the tie is broken: no accuracy there.
    assert shortcut_reliance(spec, torch.from_numpy(masks), torch.from_numpy(labels), torch.tensor(predictions)) == r
    none_broken = shortcut_reliance(spec, masks[[0, 3]], labels[[0, 3]], [rc, gs])
    assert none_broken["acc_tie_broken"] is None and none_broken["acc_drop"] is None
    with pytest.raises(ValueError, match="no shortcut"):
        shortcut_tie(WorldSpec(**TINY_WORLD), masks, labels)


def test_classifier_reliance_on_a_built_world(tmp_path):
    """A "classifier" that answers the shortcut class exactly when it sees stripes where the tie looks for them
    (read off the world's masks): right wherever the tie holds, wrong wherever it is broken."""
    spec = WorldSpec(**{**TINY_WORLD, "n_test": 48}, shortcut=SHORTCUT)
    world = ShapesWorld.build(spec, tmp_path)
    test = world.split("test")
    k, c = spec.classes.index("red circle"), [x.name for x in spec.concepts].index("striped")
    labels = torch.from_numpy(np.asarray(test.labels))
    on_key = key_object_concepts(spec, test.masks, labels)[:, c]
    striped = torch.where(labels == k, on_key, torch.from_numpy(np.asarray(test.masks)[:, c].any(axis=(1, 2))))
    other = (labels + 1) % len(spec.classes)
    answers = iter(torch.where(striped, k, torch.where(labels == k, other, labels)).split(16))

    class Cheat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images):
            return torch.nn.functional.one_hot(next(answers), len(spec.classes)).float()

    r = classifier_shortcut_reliance(Cheat(), world, "test", batch_size=16)
    tie = shortcut_tie(spec, test.masks, test.labels)
    assert r["split"] == "test" and r["n_tie_broken"] == int((~tie).sum()) > 0
    assert r["acc_tie_holds"] == 1.0 and r["acc_tie_broken"] == 0.0
    assert r["shortcut_errors"] == r["n_other_with_concept"] > 0


def test_a_run_on_a_shortcut_world_reports_the_classifiers_reliance(tmp_path, capsys):
    """What train.py does before training the explainer: fit (1 epoch here) and measure on the test split."""
    from cefam_lightning.training.run import _shapes_data_and_classifier
    from tests.conftest import tiny_overrides

    overrides = tiny_overrides(tmp_path / "cache", tmp_path / "out")
    cfg = load_config(CONFIG_DIR / "experiment" / "shortcut.yaml", overrides)
    _, _, _, metrics = _shapes_data_and_classifier(cfg, quick=False)
    r = metrics["shortcut"]
    assert r["split"] == "test" and r["n_tie_holds"] + r["n_tie_broken"] == TINY_WORLD["n_test"]
    assert "shortcut striped -> red circle (test split): accuracy" in capsys.readouterr().out
    plain = load_config(None, overrides)
    assert "shortcut" not in _shapes_data_and_classifier(plain, quick=False)[3]
