"""The authors' published translator files (``{'net': MapConverter object, ...}``) are read without running
anything from them and without their ``converter`` module, and compute the authors' function."""

from __future__ import annotations

import importlib.abc
import os
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cefam_lightning.errors import cli_errors
from cefam_lightning.models.interop import (
    InteropError,
    import_authors_translator,
    load_official_translator,
    read_authors_file,
)

RESNET50 = (256, 512, 1024, 2048)
RESNET18 = (64, 128, 256, 512)
VIT_B16 = (768, 768, 768, 768)


class MapConverter(nn.Module):
    """A stand-in for the authors' translator class, written for this test: the same attributes and layers
    (``fc1..fc3`` with tanh, input pooled layer4, layer3, layer2, layer1 or layer4 alone), the same scores."""

    def __init__(self, concept_dim, concept_num, layer_dim, scale, bias, model_type, single_layer, hidden=1024):
        super().__init__()
        self.inplanes = layer_dim
        self.concept_dim, self.concept_num, self.num_classes = concept_dim, concept_num, 1000
        self.layer_dim1, self.layer_dim2, self.layer_dim3, self.layer_dim4 = layer_dim
        self.single_layer = single_layer
        first = layer_dim[3] if single_layer else sum(layer_dim)
        width = 2048 if not single_layer and layer_dim[3] > 1024 else hidden
        self.fc1, self.fc2, self.fc3 = nn.Linear(first, width), nn.Linear(width, hidden), nn.Linear(hidden, concept_dim)
        self.tanh, self.relu, self.leaky_relu = nn.Tanh(), nn.ReLU(inplace=True), nn.LeakyReLU(0.01)
        self.sigmoid, self.softmax = nn.Sigmoid(), nn.Softmax(dim=-1)
        self.scale, self.bias, self.model_type = scale, bias, model_type

    def forward(self, pooled, concept_vectors):
        x = pooled[-1] if self.single_layer else torch.cat(pooled[::-1], dim=-1)
        embeds = self.fc3(self.tanh(self.fc2(self.tanh(self.fc1(x)))))
        unit = embeds / embeds.norm(p=2, dim=-1, keepdim=True)
        return embeds, torch.bmm(concept_vectors, unit.unsqueeze(2))[:, :, 0] * self.scale + self.bias


class _Unimportable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "converter" or name.startswith("converter."):
            raise ImportError(f"the test made {name} unimportable")
        return None


@pytest.fixture
def authors_module():
    """``converter`` (with ``MapConverter``) importable while the test saves files, then unimportable."""
    module = types.ModuleType("converter")
    classes = {}

    def declare(cls, name="MapConverter"):
        cls.__module__, cls.__qualname__, cls.__name__ = "converter", name, name
        setattr(module, name, cls)
        classes[name] = cls
        return cls

    declare(type("MapConverter", (MapConverter,), {}))
    sys.modules["converter"] = module
    finder = _Unimportable()
    state = {"finder": None}

    def lock():
        sys.modules.pop("converter", None)
        sys.meta_path.insert(0, finder)
        state["finder"] = finder
        with pytest.raises(ImportError):
            __import__("converter")

    yield types.SimpleNamespace(classes=classes, declare=declare, lock=lock)
    sys.modules.pop("converter", None)
    if state["finder"] in sys.meta_path:
        sys.meta_path.remove(finder)


def _publish(model, path, **extra):
    torch.save({"net": model, "loss": 0.25, "loss_embeds": 0.2, "loss_score": 0.05, "epoch": 7, **extra}, path)


SHAPES = {
    # name: (layer widths, single layer, our layer names, VLM kind, embedding size, scale, bias)
    "resnet50_four_layer": (RESNET50, False, ["layer1", "layer2", "layer3", "layer4"], "clip", 512, 100.0, 0.0),
    "resnet18_four_layer": (RESNET18, False, ["layer1", "layer2", "layer3", "layer4"], "siglip", 768, 117.3, -12.9),
    "resnet50_layer4": (RESNET50, True, ["layer1", "layer2", "layer3", "layer4"], "siglip", 768, 117.3, -12.9),
    "vit_b16_encoder": (VIT_B16, True, ["encoder"], "clip", 512, 100.0, 0.0),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_published_file_computes_the_authors_embeddings_and_scores(tmp_path, authors_module, shape):
    widths, single, names, kind, dim, scale, bias = SHAPES[shape]
    torch.manual_seed(0)
    model = authors_module.classes["MapConverter"](dim, 9, widths, scale, bias, kind, single).eval()
    path = tmp_path / "best_converter_ckpt.pth"
    _publish(model, path)
    authors_module.lock()

    channels = dict(zip(names, widths if len(names) == 4 else widths[-1:], strict=True))
    imported = import_authors_translator(path, channels, embed_dim=dim, kind=kind, given="the test's classifier")
    assert imported.layers == (names[-1:] if single else names)
    assert (imported.kind, imported.logit_scale, imported.logit_bias) == (kind, scale, bias)
    assert imported.source.extra["epoch"] == 7 and imported.source.attributes["concept_num"] == 9

    pooled = [torch.randn(5, c, dtype=torch.float64).float() for c in widths]
    text = F.normalize(torch.randn(9, dim), dim=-1)
    with torch.no_grad():
        embeds, scores = model(pooled, text.expand(5, -1, -1).contiguous())
        z = pooled[-1] if single else torch.cat(pooled, dim=1)  # ours: the classifier's layer order
        ours = imported.translator.eval()(z)
        our_scores = imported.scorer(text)(ours)
    torch.testing.assert_close(ours, embeds, rtol=1e-6, atol=1e-6 * embeds.abs().max().item())
    torch.testing.assert_close(our_scores, scores, rtol=1e-6, atol=1e-6 * scores.abs().max().item())


def test_state_dict_layouts_still_load(tmp_path):
    torch.manual_seed(1)
    model = MapConverter(16, 3, RESNET18, 50.0, 0.0, "clip", False, hidden=32)
    state = model.state_dict()
    channels = dict(zip(["layer1", "layer2", "layer3", "layer4"], RESNET18, strict=True))
    prefixed = {f"module.{k}": v for k, v in state.items()}
    for i, saved in enumerate([state, {"net": state, "epoch": 3}, {"net": prefixed}]):
        path = tmp_path / f"plain{i}.pth"
        torch.save(saved, path)
        assert read_authors_file(path).attributes == {}
        translator = load_official_translator(path, channels)
        torch.testing.assert_close(translator.net.fc3.weight, state["fc3.weight"])
        imported = import_authors_translator(path, channels, embed_dim=16, kind="clip", logit_scale=100.0)
        assert (imported.kind, imported.logit_scale, imported.logit_bias) == ("clip", 100.0, 0.0)


def _one_error_line(capsys, call) -> str:
    """What a command-line tool prints for ``call``'s error: one ``error: ...`` line, exit status 2."""
    with pytest.raises(SystemExit) as stop, cli_errors():
        call()
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _payloads(marker):
    """Callables a malicious file could name, and what each would do: create ``marker``."""
    return {
        "os.system": (os.system, (f"touch {marker}",)),
        "builtins.exec": (exec, (f"open({str(marker)!r}, 'w').close()",)),
    }


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("where", ["authors_class", "unrelated_class", "nested_attribute"])
def test_a_file_that_would_run_code_runs_nothing(tmp_path, authors_module, capsys, payload, where):
    marker = tmp_path / "marker"
    reduce = _payloads(marker)[payload]

    class Payload:
        def __reduce__(self):
            return reduce

    if where == "authors_class":
        evil = authors_module.declare(type("MapConverter", (), {"__reduce__": lambda self: reduce}))()
    elif where == "unrelated_class":
        Payload.__module__ = "evil"
        sys.modules["evil"] = types.ModuleType("evil")
        sys.modules["evil"].Payload = Payload
        evil = Payload()
    else:
        evil = authors_module.classes["MapConverter"](8, 2, RESNET18, 100.0, 0.0, "clip", False)
        evil.note = Payload()
    path = tmp_path / "best_converter_ckpt.pth"
    _publish(evil, path)
    sys.modules.pop("evil", None)
    authors_module.lock()

    line = _one_error_line(capsys, lambda: read_authors_file(path))
    assert str(path) in line and "nothing was run" in line
    assert ("system" if payload == "os.system" else "exec") in line
    assert not marker.exists()
    with pytest.raises(InteropError):
        import_authors_translator(path, dict(zip(["layer1", "layer2", "layer3", "layer4"], RESNET18, strict=True)))
    # The import command: the same line, exit 2, nothing written.
    from cefam_lightning.cli.interop import main

    args = ["import", str(path), "--classifier", "resnet18", "--store", str(tmp_path / "no_store")]
    assert _one_error_line(capsys, lambda: main([*args, "--out", str(tmp_path / "m.ckpt")])) == line
    assert not marker.exists() and not (tmp_path / "m.ckpt").exists()


def test_a_file_that_calls_the_authors_class_is_refused(tmp_path, authors_module, capsys):
    """Unpickling ``converter.MapConverter(...)`` would run the authors' constructor; the stand-in refuses."""
    cls = authors_module.classes["MapConverter"]
    model = cls(8, 2, RESNET18, 100.0, 0.0, "clip", False)
    cls.__reduce__ = lambda self: (cls, (8, 2, RESNET18, 100.0, 0.0, "clip", False))
    path = tmp_path / "best_converter_ckpt.pth"
    _publish(model, path)
    authors_module.lock()
    line = _one_error_line(capsys, lambda: read_authors_file(path))
    assert "converter.MapConverter(...)" in line and "nothing was run" in line


@pytest.mark.parametrize(
    "case, expected",
    [
        ("widths", r"reads layer widths \[256, 512, 1024, 2048\], but the test's classifier has \[64, 128, 256, 512\]"),
        ("single_widths", r"reads layer widths \[2048\] \(single layer\), but the test's classifier has \[512\]"),
        ("embed_dim", r"gives 512-d embeddings, but the test's classifier has 768-d"),
        ("kind", r"trained on clip scores, but the test's classifier has siglip"),
        ("layers", r"reads 4 layers, but the test's classifier has 1 \(encoder\)"),
    ],
)
def test_a_file_that_does_not_fit_stops_with_one_line(tmp_path, authors_module, capsys, case, expected):
    cls = authors_module.classes["MapConverter"]
    torch.manual_seed(0)
    single = case == "single_widths"
    path = tmp_path / "best_converter_ckpt.pth"
    _publish(cls(512, 4, RESNET50, 100.0, 0.0, "clip", single), path)
    authors_module.lock()
    resnet18 = dict(zip(["layer1", "layer2", "layer3", "layer4"], RESNET18, strict=True))
    resnet50 = dict(zip(["layer1", "layer2", "layer3", "layer4"], RESNET50, strict=True))
    args = {
        "widths": (resnet18, 512, "clip"),
        "single_widths": (resnet18, 512, "clip"),
        "embed_dim": (resnet50, 768, "clip"),
        "kind": (resnet50, 512, "siglip"),
        "layers": ({"encoder": 768}, 512, "clip"),
    }[case]
    line = _one_error_line(
        capsys,
        lambda: import_authors_translator(
            path, args[0], embed_dim=args[1], kind=args[2], given="the test's classifier"
        ),
    )
    assert str(path) in line
    assert re.search(expected, line), line


def _store(path, dim, kind="siglip", scale=10.0, bias=-1.0, n_concepts=5):
    import numpy as np

    from cefam_lightning.data.concepts import Concept
    from cefam_lightning.data.embedding_store import EmbeddingStore, VLMInfo

    rng = np.random.default_rng(0)
    return EmbeddingStore.write(
        path,
        sample_ids=["a", "b"],
        image_embeddings=rng.standard_normal((2, dim)).astype("float32"),
        text_embeddings=rng.standard_normal((n_concepts, dim)).astype("float32"),
        concepts=[Concept(f"c{i}", ["color", "object"][i % 2], f"a photo of c{i}") for i in range(n_concepts)],
        vlm=VLMInfo("test-vlm", kind, scale, bias),
    )


@pytest.mark.parametrize("single", [False, True])
def test_import_command_writes_a_checkpoint_computing_the_authors_function(tmp_path, authors_module, capsys, single):
    """``interop.py import``: published file -> checkpoint; the checkpoint's translator on the classifier's pooled
    activations and its scores equal the authors' forward, with the file's constants (not the store's)."""
    import torchvision

    from cefam_lightning.cli.interop import main
    from cefam_lightning.methods.base import load_explainer

    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    store = _store(tmp_path / "store", 16)
    model = authors_module.classes["MapConverter"](16, 5, RESNET18, 117.3, -12.9, "siglip", single).eval()
    path = tmp_path / "best_converter_ckpt.pth"
    _publish(model, path)
    authors_module.lock()
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    out = tmp_path / "model.ckpt"
    args = ["import", str(path), "--classifier", "resnet18", "--weights", str(weights), "--store", str(store.path)]
    main([*args, "--out", str(out), "--class-names", str(tmp_path / "classes.txt"), "--image-size", "64"])
    assert "wrote" in capsys.readouterr().out

    module = load_explainer(out)
    assert module.class_names == ["cat", "dog", "bird"]
    assert module.classifier.layers == (["layer4"] if single else ["layer1", "layer2", "layer3", "layer4"])
    assert (module.scorer.kind, module.scorer.logit_scale, module.scorer.logit_bias) == ("siglip", 117.3, -12.9)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        acts = module.classifier(images).activations
        pooled = [acts[layer].mean(dim=(2, 3)) for layer in module.classifier.layers]
        if single:
            pooled = [None, None, None, *pooled]
        text = F.normalize(torch.from_numpy(store.text_embeddings), dim=-1)
        embeds, scores = model(pooled, text.expand(2, -1, -1).contiguous())
        ours = module.translator(torch.cat([p for p in pooled if p is not None], dim=1))
        our_scores = module.scorer(ours)
    torch.testing.assert_close(ours, embeds, rtol=1e-6, atol=1e-6 * embeds.abs().max().item())
    torch.testing.assert_close(our_scores, scores, rtol=1e-6, atol=1e-6 * scores.abs().max().item())


def test_import_command_mismatch_is_one_line(tmp_path, authors_module, capsys):
    from cefam_lightning.cli.interop import main

    store = _store(tmp_path / "store", 16)
    path = tmp_path / "best_converter_ckpt.pth"
    _publish(authors_module.classes["MapConverter"](16, 5, RESNET50, 100.0, 0.0, "siglip", False), path)
    authors_module.lock()
    args = ["import", str(path), "--classifier", "resnet18", "--store", str(store.path), "--out", str(tmp_path / "m")]
    line = _one_error_line(capsys, lambda: main([*args, "--num-classes", "3", "--image-size", "64"]))
    assert "reads layer widths [256, 512, 1024, 2048], but classifier resnet18 and store" in line
    assert not (tmp_path / "m").exists()


def test_published_file_import_then_explain_and_evaluate_on_broden(tmp_path, authors_module, capsys):
    """End to end: a published-format file -> ``interop.py import`` -> ``explain.py`` and ``evaluate.py --data``
    (a generated Broden-layout folder) on the checkpoint, each exit 0."""
    import json

    import torchvision

    from cefam_lightning.cli import evaluate, explain, precompute
    from cefam_lightning.cli.interop import main as interop_main
    from cefam_lightning.data import toy_data
    from cefam_lightning.data.embedding_store import EmbeddingStore
    from tests.test_vlm import TINY_CLIP, write_tiny_configs

    toy = toy_data.write_toy_data(tmp_path / "toy", n_train=4, n_val=2, image_size=32, per_shard=8, n_broden=4)
    configs = write_tiny_configs(tmp_path / "open_clip_configs")
    precompute.main(
        ["--images", str(toy / "train.csv"), "--concepts", str(toy / "concepts.csv"), "--model", TINY_CLIP]
        + ["--model-config", str(configs), "--random-init", "--no-progress", "--device", "cpu"]
        + ["--out", str(toy / "store")]
    )
    store = EmbeddingStore.open(toy / "store")
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=6).state_dict(), weights)
    model = authors_module.classes["MapConverter"](store.embed_dim, 5, RESNET18, 100.0, 0.0, store.vlm.kind, False)
    published = tmp_path / "best_converter_ckpt.pth"
    _publish(model, published)
    authors_module.lock()

    ckpt = tmp_path / "model.ckpt"
    interop_main(
        ["import", str(published), "--classifier", "resnet18", "--weights", str(weights), "--store", str(toy / "store")]
        + ["--out", str(ckpt), "--num-classes", "6", "--image-size", "32"]
    )
    image = sorted((toy / "images").rglob("*.jpg"))[0]
    summary = explain.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "explained"), str(image)])
    assert summary is not None and any((tmp_path / "explained").rglob("report.json"))
    out = tmp_path / "eval"
    evaluate.main(["--checkpoint", str(ckpt), "--data", str(toy / "broden"), "--out", str(out)])
    written = json.loads((out / "evaluation.json").read_text())
    assert "cefam" in written["regions"]


def test_init_from_reads_the_published_file(tmp_path, authors_module, capsys, cache_dir):
    """``cefam.init_from=best_converter_ckpt.pth``: fine-tuning starts from the authors' translator (read safely);
    a translator with input standardization, or another embedding size, is one error line."""
    from cefam_lightning.cli.train import main as train_main
    from cefam_lightning.methods.cefam.module import CEFAMModule, init_translator_from
    from tests.conftest import tiny_overrides

    shapes_cnn = (16, 32, 64, 128)
    torch.manual_seed(0)
    model = authors_module.classes["MapConverter"](32, 5, shapes_cnn, 100.0, 0.0, "clip", False)
    published = tmp_path / "best_converter_ckpt.pth"
    _publish(model, published)
    authors_module.lock()

    base = [*tiny_overrides(cache_dir, tmp_path / "runs", "ft_authors"), "evaluation.enabled=false"]
    base += ["demo.num_figures=0", "cefam.hidden_dims=null", f"cefam.init_from={published}"]
    line = _one_error_line(capsys, lambda: train_main(base))
    assert "cefam.input_norm=false" in line and str(published) in line
    line = _one_error_line(capsys, lambda: train_main([*base, "cefam.input_norm=false", "world.embed_dim=24"]))
    assert "gives 32-d embeddings, but this run's classifier and store has 24-d" in line

    run = train_main([*base, "cefam.input_norm=false", "trainer.max_epochs=1"])
    assert f"translator initialized from {published}: 6 tensor(s) loaded\n" in capsys.readouterr().out
    # What it loaded: the authors' translator, fc1's columns in this framework's layer order (layer1..layer4).
    module = CEFAMModule.from_checkpoint(run["best_checkpoint"])
    report = init_translator_from(module, published)
    assert len(report.loaded) == 6 and not report.reinitialized
    columns = torch.cat([torch.arange(c) + sum(shapes_cnn[i + 1 :]) for i, c in enumerate(shapes_cnn)])
    state = module.translator.state_dict()
    torch.testing.assert_close(state["net.fc1.weight"], model.fc1.weight.detach()[:, columns])
    torch.testing.assert_close(state["net.fc3.bias"], model.fc3.bias.detach())


def test_the_project_reader_points_at_the_import_command(tmp_path, authors_module):
    from cefam_lightning.methods.checkpoints import CheckpointError, read_checkpoint

    path = tmp_path / "best_converter_ckpt.pth"
    _publish(authors_module.classes["MapConverter"](8, 2, RESNET18, 100.0, 0.0, "clip", False), path)
    authors_module.lock()
    with pytest.raises(CheckpointError, match="interop.py import"):
        read_checkpoint(path)


def test_import_command_vit_b16_single_layer_reads_encoder_ln(tmp_path, authors_module, capsys):
    """The published ViT-B/16 shape: a single-layer translator on the last block's tokens after the encoder's
    LayerNorm, class token dropped, mean-pooled (as the authors pool them); random weights at a 32 px crop."""
    from cefam_lightning.cli.interop import main
    from cefam_lightning.methods.base import load_explainer

    torch.manual_seed(0)
    store = _store(tmp_path / "store", 512, kind="clip", scale=100.0, bias=0.0)
    model = authors_module.classes["MapConverter"](512, 5, VIT_B16, 100.0, 0.0, "clip", True).eval()
    path = tmp_path / "best_converter_ckpt.pth"
    _publish(model, path)
    authors_module.lock()
    out = tmp_path / "vit.ckpt"
    main(
        ["import", str(path), "--classifier", "vit_b_16", "--store", str(store.path), "--out", str(out)]
        + ["--num-classes", "4", "--image-size", "32"]
    )
    assert "single-layer translator on encoder.ln" in capsys.readouterr().out
    module = load_explainer(out)
    assert module.classifier.layers == ["encoder.ln"]
    with torch.no_grad():
        pooled = module.classifier(torch.rand(2, 3, 32, 32)).activations["encoder.ln"].mean(dim=(2, 3))
        text = F.normalize(torch.from_numpy(store.text_embeddings), dim=-1)
        embeds, scores = model([None, None, None, pooled], text.expand(2, -1, -1).contiguous())
        ours = module.translator(pooled)
    torch.testing.assert_close(ours, embeds, rtol=1e-6, atol=1e-6 * embeds.abs().max().item())
    torch.testing.assert_close(module.scorer(ours), scores, rtol=1e-6, atol=1e-6 * scores.abs().max().item())
