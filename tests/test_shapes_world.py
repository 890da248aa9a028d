import numpy as np
import pytest
import torch

from cefam_lightning.data.shapes_world import ShapesWorld, WorldSpec, generate_split, oracle_text_embeddings
from cefam_lightning.models.components import ConceptScorer
from tests.conftest import TINY_WORLD


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.npy"))}


def test_same_seed_gives_identical_images_masks_embeddings(tmp_path):
    spec = WorldSpec(**TINY_WORLD)
    a = ShapesWorld.build(spec, tmp_path / "a")
    b = ShapesWorld.build(spec, tmp_path / "b")
    fa, fb = _files(a.root), _files(b.root)
    assert set(fa) == set(fb) and len(fa) >= 10  # images, masks, labels x 3 splits + store arrays
    assert all(fa[k] == fb[k] for k in fa)


def test_other_seed_gives_other_data(tmp_path):
    a = generate_split(WorldSpec(**TINY_WORLD), "train")
    b = generate_split(WorldSpec(**{**TINY_WORLD, "seed": 99}), "train")
    assert not np.array_equal(a.images, b.images)


def test_first_images_do_not_depend_on_split_size():
    small = generate_split(WorldSpec(**{**TINY_WORLD, "n_train": 8}), "train")
    big = generate_split(WorldSpec(**TINY_WORLD), "train")
    np.testing.assert_array_equal(small.images, big.images[:8])


def test_second_build_reuses_the_cache(tmp_path, monkeypatch):
    spec = WorldSpec(**TINY_WORLD)
    first = ShapesWorld.build(spec, tmp_path)
    import cefam_lightning.data.shapes_world as sw

    monkeypatch.setattr(sw, "generate_split", lambda *a, **k: pytest.fail("regenerated a cached world"))
    second = ShapesWorld.build(spec, tmp_path)
    assert second.root == first.root
    # A different spec is a different cache entry.
    assert ShapesWorld.cache_path(WorldSpec(**{**TINY_WORLD, "n_test": 5}), tmp_path) != first.root


def test_class_is_the_key_objects_pair_and_distractors_are_not_classes(tiny_world):
    spec = tiny_world.spec
    idx = {c.name: i for i, c in enumerate(tiny_world.concepts)}
    split = tiny_world.split("train")
    for masks, label in zip(split.masks, split.labels, strict=True):
        for k, pair in enumerate(spec.classes):
            color, shape = pair.split()
            overlap = (masks[idx[color]] & masks[idx[shape]]).sum()
            assert (overlap > 0) == (k == label)
        # Objects never overlap: each pixel has at most one color, one shape and one texture.
        for names in (spec.colors, spec.shapes, spec.textures):
            assert masks[[idx[n] for n in names]].sum(axis=0).max() <= 1


def test_oracle_scores_present_concepts_above_absent_ones(tiny_world):
    store = tiny_world.store
    scorer = ConceptScorer(torch.from_numpy(store.text_embeddings), "clip", store.vlm.logit_scale)
    for split in ("train", "test"):
        data = tiny_world.split(split)
        emb = torch.from_numpy(np.asarray(store.image_embeddings[store.rows_for(data.ids)]))
        scores = scorer(emb)
        presence = torch.from_numpy(np.asarray(data.presence))
        lowest_present = torch.where(presence, scores, torch.inf).min(dim=1).values
        highest_absent = torch.where(~presence, scores, -torch.inf).max(dim=1).values
        assert (lowest_present > highest_absent).all()


def test_oracle_text_embeddings_are_orthonormal():
    t = oracle_text_embeddings(WorldSpec(**TINY_WORLD))
    np.testing.assert_allclose(t @ t.T, np.eye(t.shape[0]), atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colors": ["red", "mauve"]}, "mauve"),
        ({"classes": ["red circle", "pink square"]}, "pink square"),
        ({"embed_dim": 4}, "embed_dim"),
    ],
)
def test_bad_world_parameters_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        WorldSpec(**{**TINY_WORLD, **change})
