import torch

from cefam_lightning.methods.cefam.regions import score_jacobian
from cefam_lightning.methods.cefam.relevance import layer_relevance
from cefam_lightning.models.components import ConceptScorer, Translator

SLICES = {"layer1": slice(0, 6), "layer2": slice(6, 30), "layer3": slice(30, 60)}  # 6 < k channels at layer1


def _parts(kind="clip"):
    torch.manual_seed(0)
    translator = Translator(60, 12, [32]).eval()
    scorer = ConceptScorer(torch.randn(7, 12), kind, logit_scale=20.0, logit_bias=-1.0)
    z = torch.rand(3, 60)
    return z, translator, scorer, score_jacobian(translator, scorer, z)


def _loop_relevance(z, jac, translator, scorer, concepts, k):
    """One translator pass per (sample, concept, layer, step): the definition, written out."""
    out = torch.zeros(concepts.shape[0], concepts.shape[1], len(SLICES))
    for b in range(concepts.shape[0]):
        for j, c in enumerate(concepts[b].tolist()):
            p0 = scorer.probabilities(scorer(translator(z[b : b + 1])))[0, c]
            for li, sl in enumerate(SLICES.values()):
                importance = jac[b, c, sl] * z[b, sl]
                k_l = min(k, sl.stop - sl.start)
                order = importance.argsort(descending=True)[:k_l] + sl.start
                drops = []
                for i in range(1, k_l + 1):
                    zi = z[b].clone()
                    zi[order[:i]] = z[b, sl].mean()
                    pi = scorer.probabilities(scorer(translator(zi[None])))[0, c]
                    drops.append((p0 - pi) / p0)
                out[b, j, li] = torch.stack(drops).mean()
    return out


def test_batched_relevance_equals_the_definition():
    for kind in ("clip", "siglip"):
        z, translator, scorer, jac = _parts(kind)
        concepts = torch.tensor([[0, 3], [6, 1], [2, 2]])
        with torch.no_grad():
            expected = _loop_relevance(z, jac, translator, scorer, concepts, k=10)
        got = layer_relevance(z, jac, SLICES, translator, scorer, concepts, k=10)
        assert got.shape == (3, 2, 3)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_layers_the_translator_ignores_have_zero_relevance():
    z, translator, scorer, _ = _parts()
    with torch.no_grad():
        translator.net.fc1.weight[:, :30] = 0  # the branch only reads layer3
    jac = score_jacobian(translator, scorer, z)
    probs = scorer.probabilities(scorer(translator(z)))
    top = probs.topk(3, dim=1).indices
    rel = layer_relevance(z, jac, SLICES, translator, scorer, top, k=20)
    torch.testing.assert_close(rel[..., :2], torch.zeros(3, 3, 2))
    # Deleting channels can raise a concept's probability too (softmax), so only non-zero is guaranteed here.
    assert (rel[..., 2].abs() > 1e-4).all()
