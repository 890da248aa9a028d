import pytest
import torch
import torchvision

from cefam_lightning.methods.cefam.contributions import concept_contributions
from cefam_lightning.methods.cefam.regions import layer_slices, pool_activations, score_jacobian
from cefam_lightning.methods.cefam.relevance import top_channels
from cefam_lightning.models.classifier import FrozenClassifier
from cefam_lightning.models.components import ConceptScorer, Translator

LAYERS = ["layer2", "layer3", "layer4"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    clf = FrozenClassifier(model, LAYERS, name="resnet18")
    images = torch.rand(2, 3, 64, 64)
    out = clf(images)
    z = pool_activations(out.activations, LAYERS)
    translator, scorer = Translator(z.shape[1], 16, [32]).eval(), ConceptScorer(torch.randn(6, 16), "clip")
    jac = score_jacobian(translator, scorer, z)
    return model, clf, images, out, z, jac, layer_slices(out.activations, LAYERS)


def _reference(model, clf, images, z, jac, slices, concepts, concept_layers, target, k):
    """One forward pass from the input per masked variant, masking through a hook on the plain model."""
    result = torch.zeros(concepts.shape)
    names = list(slices)
    for b in range(concepts.shape[0]):
        x = clf.normalize(images[b : b + 1])
        p_y = model(x).softmax(1)[0, target[b]]
        for j in range(concepts.shape[1]):
            layer = names[concept_layers[b, j]]
            top = top_channels(jac[b : b + 1], z[b : b + 1], slices[layer], concepts[b : b + 1, j : j + 1], k)[0, 0]
            drops = []
            for i in range(1, len(top) + 1):

                def hook(module, inputs, output, chans=top[:i]):
                    output = output.clone()
                    output[:, chans] = output[:, chans].mean(dim=(2, 3), keepdim=True)
                    return output

                handle = getattr(model, layer).register_forward_hook(hook)
                try:
                    p_i = model(x).softmax(1)[0, target[b]]
                finally:
                    handle.remove()
                drops.append((p_y - p_i) / p_y)
            result[b, j] = torch.stack(drops).mean()
    return result


def test_batched_contributions_equal_one_forward_pass_per_variant(setup):
    model, clf, images, out, z, jac, slices = setup
    concepts = torch.tensor([[0, 3, 5], [2, 2, 1]])
    concept_layers = torch.tensor([[0, 1, 2], [2, 0, 1]])
    target = torch.tensor([1, 4])
    got = concept_contributions(
        clf, out.activations, out.logits, jac, z, slices, concepts, concept_layers, target=target, k=6, chunk=5
    )
    with torch.no_grad():
        expected = _reference(model, clf, images, z, jac, slices, concepts, concept_layers, target, k=6)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert got.abs().max() > 0


def test_default_target_is_the_prediction_and_signs_are_kept(setup):
    _, clf, _, out, z, jac, slices = setup
    concepts = torch.arange(6).repeat(2, 1)
    layers = torch.full((2, 6), 1)  # layer3
    pred = out.logits.argmax(1)
    default = concept_contributions(clf, out.activations, out.logits, jac, z, slices, concepts, layers, k=8)
    explicit = concept_contributions(
        clf, out.activations, out.logits, jac, z, slices, concepts, layers, target=pred, k=8
    )
    torch.testing.assert_close(default, explicit)
    other = concept_contributions(
        clf, out.activations, out.logits, jac, z, slices, concepts, layers, target=(pred + 1) % 5, k=8
    )
    assert not torch.allclose(other, default)


def test_a_layer_read_only_through_global_pooling_is_filled_with_the_whole_tensors_mean(setup):
    """A channel's spatial mean right before global average pooling (ResNet's layer4) changes nothing, so the
    spatial-mean fill puts the mean of the whole layer tensor there instead, as the CE-FAM authors' code does at its
    last block: the logits move and the contributions are no longer 0."""
    _, clf, _, out, z, jac, slices = setup
    concepts = torch.arange(6).repeat(2, 1)
    at_layer4 = torch.full((2, 6), 2)
    args = (clf, out.activations, out.logits, jac, z, slices, concepts, at_layer4)
    unchanged = concept_contributions(*args, k=8)  # without telling it which layers are pooled-only
    torch.testing.assert_close(unchanged, torch.zeros(2, 6), atol=1e-6, rtol=0)
    assert clf.mean_invariant_layers() == ["layer4"]
    filled = concept_contributions(*args, k=8, pooled_only=clf.mean_invariant_layers())
    assert filled.abs().min() > 1e-6
    # The same masked input by hand: the top channel replaced by the whole tensor's mean moves the logits.
    a = out.activations["layer4"][:1]
    top = top_channels(jac[:1], z[:1], slices["layer4"], concepts[:1, :1], 8)[0, 0, :1]
    masked = a.clone()
    masked[:, top] = a.mean()
    assert not torch.allclose(clf.tail("layer4")(masked, None), clf.tail("layer4")(a, None))


def test_tail_rejects_unknown_layers(setup):
    _, clf, *_ = setup
    with pytest.raises(ValueError, match="layer1"):
        clf.tail("layer1")
