"""The one interface every explainer implements: :class:`ExplainerModule`.

An explainer is a LightningModule that combines a frozen classifier with a small trainable module. The base class
holds what all of them share, so that the CLIs, callbacks and the training run never ask which method a module is:

- the shared train / val / test step (``{stage}/loss`` logged the same way; the method logs the rest in
  :meth:`ExplainerModule.log_step`) and the reset of validation metrics before training;
- the architecture record in ``hyper_parameters["arch"]``: ``method`` (the registry name), ``classifier`` and the
  method's own parts, from which :meth:`ExplainerModule.from_checkpoint` rebuilds any method's checkpoint;
- the explanation interface: :meth:`~ExplainerModule.explain` (a batch -> the method family's typed explanation),
  :meth:`~ExplainerModule.image_explainer` (reports, maps and figures of image files, for ``explain``),
  :meth:`~ExplainerModule.region_panels` (the maps the training callback draws) and
  :meth:`~ExplainerModule.evaluate_on_world` / :meth:`~ExplainerModule.evaluate_on_data` (for ``evaluate``).

``docs/architecture.md`` says how to add a method.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import lightning as L
import numpy as np
from torch import Tensor

from cefam_lightning.distributed import part_range
from cefam_lightning.errors import CefamError, error_summary
from cefam_lightning.methods.checkpoints import NOT_AN_EXPLAINER, CheckpointError, read_checkpoint
from cefam_lightning.methods.registry import MethodSpec, get_method, method_of_hparams
from cefam_lightning.models.classifier import build_classifier

STAGES = ("train", "val", "test")  # the stages whose metrics each method keeps apart


class UnsupportedError(CefamError):
    """An option or use a method does not have (e.g. ``--concepts`` for an L-CAM checkpoint)."""


def classifier_record(classifier: Any) -> dict[str, Any]:
    """What rebuilds a frozen classifier from a checkpoint: its spec (name, classes, input spec...) and layers."""
    return dict(getattr(classifier, "spec", {"name": classifier.name}), layers=list(classifier.layers))


def rebuild_classifier(record: Mapping[str, Any], config: Any = None) -> Any:
    """The frozen classifier a checkpoint's ``arch["classifier"]`` describes (its weights come with the module's
    state dict). ``config``: the run's recorded config, for checkpoints written before input specs were recorded
    (the shapes CNN's input size is then the world's image size)."""
    size = None
    if record.get("input_spec") is None and record.get("name") == "shapes_cnn" and isinstance(config, Mapping):
        size = (config.get("world") or {}).get("image_size")
    return build_classifier(
        record["name"],
        record["num_classes"],
        record["layers"],
        widths=record.get("widths", (16, 32, 64, 128)),
        input_spec=record.get("input_spec"),
        image_size=size,
    )


def constructor_kwargs(cls: type, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hyper-parameters a checkpoint recorded that ``cls.__init__`` takes, and ``method`` (the registry name
    the checkpoint records); records such as ``arch`` are left out."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in hparams.items() if k in params and k != "method"}
    if "method" in params:
        kwargs["method"] = method_of_hparams(hparams)
    return kwargs


@dataclass
class ExplainSettings:
    """How ``explain`` explains images; ``None`` means the method's (or the checkpoint's) own default.

    Which fields a method reads is its :attr:`ExplainerModule.explain_options`; the others must stay ``None``.
    """

    top_n: int | None = None  # concepts (CE-FAM) or attributes' maps (SIAM) reported per image
    concepts: Any = None  # CE-FAM: the concept set to explain (names, a file, or None: the checkpoint's)
    store: Any = None  # CE-FAM: an embedding store holding concepts the checkpoint does not know
    k: int | None = None  # CE-FAM: channels deleted / masked at most
    fill: str | None = None  # CE-FAM: masked-channel fill
    select_layers: str | list[str] | None = None  # CE-FAM: the layers a concept's layer is chosen from
    gradient: str | None = None  # CE-FAM: "direct" or "full" channel weights
    region_weights: str | None = None  # CE-FAM: "signed" or "positive"
    relevance: str | None = None  # CE-FAM: "paper" or "map"
    contribution_layer: str | None = None  # CE-FAM: "selected", "last", "image" or a layer name
    preset: str | None = None  # CE-FAM: a named set of the rules above ("paper")


@dataclass
class EvaluationSettings:
    """How ``evaluate`` (and a run's test-time evaluation) scores a checkpoint; ``None``: the checkpoint's own."""

    batch_size: int = 64
    max_images: int | None = None
    seed: int = 0  # of the random-map baselines
    baselines: tuple[str, ...] | None = None  # class-map baselines by name (methods/cam_baselines.py); None: Grad-CAM
    curves: bool = False  # also deletion / insertion AUC and ROAD of the class maps
    k: int | None = None  # CE-FAM
    fill: str | None = None  # CE-FAM
    select_layers: str | list[str] | None = None  # CE-FAM
    gradient: str | None = None  # CE-FAM
    region_weights: str | None = None  # CE-FAM
    relevance: str | None = None  # CE-FAM
    contribution_layer: str | None = None  # CE-FAM
    preset: str | None = None  # CE-FAM
    per_layer_contributions: bool = False  # CE-FAM
    # This process's share when a process group splits the images (cefam_lightning.distributed): rank, world size.
    # Every method's evaluation scores its part (part) and sums the metrics over the ranks.
    rank: int = 0
    world_size: int = 1

    def part(self, n: int) -> range:
        """This process's images of the ``n`` evaluated ones, in order (all of them for a single process)."""
        return part_range(n, self.rank, self.world_size)


@dataclass
class ImageReport:
    """One image's explanation as ``explain`` writes it: ``report.json`` and the maps of ``regions.npz``."""

    report: dict[str, Any]
    maps: dict[str, np.ndarray] = field(default_factory=dict)


class ImageExplainer(Protocol):
    """What :meth:`ExplainerModule.image_explainer` returns: explains batches of image files for ``explain``."""

    settings: dict[str, Any]  # the settings in effect, recorded in summary.json

    def __call__(self, images: Tensor, target: Tensor | None, paths: Sequence[str]) -> list[ImageReport]: ...

    def render(self, image: Tensor, report: ImageReport) -> bytes: ...


@dataclass
class Evidence:
    """What a method says about a batch for the dataset report (``report``, docs/report.md): the classifier's
    logits, the explained class and, as far as the method has them, its concepts' contributions and regions or a
    class map. :meth:`ExplainerModule.evidence` returns it."""

    logits: Tensor  # (B, num_classes), the frozen classifier's
    target: Tensor  # (B,) the class the contributions and the class map are toward
    concepts: Tensor | None = None  # (B, N) explained concepts, indices into evidence_concepts (None: no concepts)
    contributions: Tensor | None = None  # (B, N) each concept's signed contribution to ``target``
    regions: Tensor | None = None  # (B, N, H, W) each concept's region map at the image size (any scale)
    detected: Tensor | None = None  # (B, C) the method's own presence call for every concept (None: it has none)
    class_map: Tensor | None = None  # (B, H, W) the class map of ``target`` (class-map methods)


@dataclass
class RegionPanels:
    """What the region-map callback draws for a batch: per image its panels' maps and titles, and the concepts
    whose ground-truth masks to outline (``None``: no concept masks apply, as for a class map)."""

    regions: np.ndarray  # (B, N, H, W)
    titles: list[list[str]]
    captions: list[list[str]]  # per image, one text per panel
    concepts: Tensor | None  # (B, N) concept indices, or None
    target: Tensor  # (B,) explained (predicted) class
    prob: Tensor  # (B,) its probability


class ExplainerModule(L.LightningModule):
    """Base of every explainer: a frozen classifier (``self.classifier``) plus a trainable part.

    Subclasses implement :meth:`model_step` (returning an object with ``loss`` and ``batch_size``),
    :meth:`log_step`, :meth:`validation_metrics`, :meth:`from_arch` and the explanation interface; they call
    :meth:`record_arch` in ``__init__``.

    Class attributes:
        summary_metrics: ``(label, test metric key)`` rows of the run summary ``train.py`` prints.
        explain_options: the :class:`ExplainSettings` fields the method reads.
        evaluate_options: the :class:`EvaluationSettings` fields beyond the common ones it reads, ``"data"`` when
            it can be evaluated on data (:meth:`evaluate_on_data`) and the options of that evaluation it takes
            (``store``, ``fit_split``, ``max_fit_images``: CE-FAM; ``attributes``, ``targets``: SIAM). Every
            method's evaluation scores only its part of the images when :class:`EvaluationSettings` gives one
            (``rank``, ``world_size``) and sums its metrics over the ranks.
    """

    summary_metrics: ClassVar[tuple[tuple[str, str], ...]] = (("test loss", "test/loss"),)
    explain_options: ClassVar[frozenset[str]] = frozenset()
    evaluate_options: ClassVar[frozenset[str]] = frozenset()

    # ------------------------------------------------------------------ identity
    def record_arch(self, method: str, classifier: Any, **parts: Any) -> None:
        """``hyper_parameters["arch"]``: the method's registry name, the classifier, and the method's parts."""
        self.hparams["arch"] = {"method": method, "classifier": classifier_record(classifier), **parts}

    @property
    def method(self) -> str:
        """The registry name of this module's method (``cefam``, ``lcam_img``, ...)."""
        name = method_of_hparams(self.hparams)
        if name is None:
            raise CefamError(f"{type(self).__name__} records no method in hyper_parameters['arch']")
        return name

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    @property
    def title(self) -> str:
        return self.spec.title

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.hparams["class_names"]]

    # ------------------------------------------------------------------ steps
    def model_step(self, batch: dict, stage: str) -> Any:
        """The method's loss on a batch: an object with ``loss`` and ``batch_size`` (and what :meth:`log_step` logs)."""
        raise NotImplementedError

    def log_step(self, step: Any, batch: dict, stage: str) -> None:
        """Log the method's own values of a step (``{stage}/loss`` is logged already)."""

    def validation_metrics(self) -> list[Any]:
        """The metrics of the validation stage, reset before training (sanity-check batches must not leak in)."""
        return []

    def _shared_step(self, batch: dict, stage: str) -> Tensor:
        step = self.model_step(batch, stage)
        self.log(
            f"{stage}/loss",
            step.loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=step.batch_size,
            sync_dist=True,
        )
        self.log_step(step, batch, stage)
        return step.loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def on_train_start(self) -> None:
        for metric in self.validation_metrics():
            metric.reset()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_arch(cls, arch: Mapping[str, Any], classifier: Any, hparams: Mapping[str, Any]) -> ExplainerModule:
        """Rebuild the module (untrained weights) from a checkpoint's architecture record and hyper-parameters."""
        raise NotImplementedError

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location: Any = "cpu") -> ExplainerModule:
        """Rebuild the module of a checkpoint written by training, of whichever method wrote it (in eval mode).

        Called on a subclass, the checkpoint must be of that class (``CEFAMModule.from_checkpoint`` refuses an
        L-CAM checkpoint). Checkpoints written before the registry load too.

        Raises:
            CheckpointError: a missing file, one that is not a checkpoint (or would run code when read), one that
                records no registered method, one of another class, or one whose weights do not fit its record.
        """
        path = Path(path).expanduser()
        ckpt = read_checkpoint(path, map_location=map_location)
        hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
        name = method_of_hparams(hparams)
        if name is None:
            raise CheckpointError(f"{path}: {NOT_AN_EXPLAINER}: its hyper-parameters record no explainer architecture")
        spec = get_method(name, where=f"{path}: the checkpoint's method")
        if not issubclass(spec.module, cls):
            from cefam_lightning.methods.registry import method_names

            titles = [get_method(m).title for m in method_names() if issubclass(get_method(m).module, cls)]
            raise CheckpointError(
                f"{path}: not a {' or '.join(titles) or cls.__name__} checkpoint (a {spec.title} checkpoint); "
                "load_explainer loads any method's"
            )
        try:
            arch = dict(hparams["arch"])
            classifier = rebuild_classifier(arch["classifier"], hparams.get("config"))
            module = spec.module.from_arch(arch, classifier, hparams)
            module.hparams["arch"]["method"] = name  # a checkpoint written before the registry gets today's record
            module.load_state_dict(ckpt["state_dict"])
        except CefamError:
            raise
        except Exception as e:  # a record or state dict that does not fit: name the file and what broke
            raise CheckpointError(
                f"{path}: a {spec.title} checkpoint this version cannot load ({error_summary(e)})"
            ) from e
        return module.eval()

    # ------------------------------------------------------------------ explaining
    def explain(self, images: Tensor, target: Tensor | None = None, **settings: Any) -> Any:
        """Explain a batch (``(B, 3, H, W)`` in ``[0, 1]``; ``target``: the explained classes, default the
        predicted ones): the method family's typed explanation."""
        raise NotImplementedError

    def image_explainer(self, settings: ExplainSettings, checkpoint: str | None = None) -> ImageExplainer:
        """What ``explain`` runs on batches of image files: reports, maps and the figure renderer."""
        raise NotImplementedError

    @property
    def evidence_concepts(self) -> list[str] | None:
        """The names :attr:`Evidence.concepts` index (``None``: the method explains with class maps only)."""
        return None

    def evidence(
        self,
        images: Tensor,
        target: Tensor | None = None,
        *,
        concepts: Tensor | None = None,
        top_n: int = 8,
        **options: Any,
    ) -> Evidence:
        """The dataset report's view of a batch (``(B, 3, H, W)`` in ``[0, 1]``; ``target``: default the predicted
        classes): ``concepts`` ``(B, N)`` the concepts to explain, else the method's own choice (at most ``top_n``
        per image where it has to choose); ``options``: the method's explanation options (:attr:`explain_options`,
        e.g. CE-FAM's rules), ``None`` or left out for its own."""
        raise UnsupportedError(f"{self.title} checkpoints cannot be reported on")

    def region_panels(self, images: Tensor, top_k: int) -> RegionPanels:
        """The maps the region-map training callback draws for ``images`` (``top_k`` panels at most)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ evaluating
    def evaluate_on_world(self, world: Any, split: str, settings: EvaluationSettings) -> tuple[dict[str, Any], str]:
        """Score the explanations on a shapes-world split against its masks: ``(results, Markdown table)``.

        With ``settings.world_size > 1`` every rank of the group calls this with its own ``rank``: each scores its
        :meth:`EvaluationSettings.part` of the images and every rank returns the numbers of the whole split (the
        metrics' sums are gathered before they are computed). The same holds for :meth:`evaluate_on_data`."""
        raise NotImplementedError

    def evaluate_on_data(
        self, dataset: Any, settings: EvaluationSettings, **options: Any
    ) -> tuple[dict[str, Any], str]:
        """Score the explanations on data (``evaluate --data``): ``(results, Markdown table)``.

        Args:
            dataset: a mask dataset or an image source (:func:`~cefam_lightning.data.evaluation_data.
                open_evaluation_data`; an image source's items have no masks).
            settings: batch size, image limit, seed and the method's options.
            **options: ``num_workers`` and the evaluation options of :attr:`evaluate_options` that were given.
        """
        raise UnsupportedError(f"{self.title} checkpoints are evaluated on the shapes world, not with --data")

    def evaluation_headline(self, results: dict[str, Any]) -> dict[str, Any]:
        """The numbers of an evaluation that ``metrics.json`` keeps (default: all of them)."""
        return results


def load_explainer(path: str | os.PathLike, map_location: Any = "cpu") -> ExplainerModule:
    """The module of a checkpoint of any registered method, in eval mode
    (:meth:`ExplainerModule.from_checkpoint`)."""
    return ExplainerModule.from_checkpoint(path, map_location=map_location)
