"""The method registry: every explainer is one registration, looked up by name (the ``method`` config value).

In the spirit of timm's model registry: :func:`register_method` adds a name, :func:`get_method` looks it up, and
nothing that trains, explains, evaluates or renders branches on a method's name. A registration says:

- which :class:`~cefam_lightning.methods.base.ExplainerModule` subclass the method is, and the fixed options it is
  built with (L-CAM-Fm and L-CAM-Img are one class with two variants);
- its config section (the keys under ``<section>:``), their typed schema and their defaults file
  (``configs/method/*.yaml``);
- how to build it from a run's config (:class:`BuildContext`), and which training callbacks it adds;
- which data sources it trains on, and what it reads from image data besides the images and labels (an
  embedding store, an attribute table).

How a method explains a batch, reports, renders and evaluates itself are methods of its module class (see
:mod:`cefam_lightning.methods.base`). The built-in methods register themselves when :mod:`cefam_lightning.methods`
is imported; a new one is a new file that calls :func:`register_method` (``docs/architecture.md``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cefam_lightning.errors import CefamError

if TYPE_CHECKING:
    import lightning as L
    from omegaconf import DictConfig

    from cefam_lightning.methods.base import ExplainerModule

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


IMAGE_DATA = ("embeddings", "attributes", "targets")  # what a method may read from image data: MethodSpec.image_data


class UnknownMethodError(CefamError):
    """A method name that nothing registered; the message lists the registered ones."""


@dataclass
class BuildContext:
    """What a method is built from: the run's config and what the run already built."""

    cfg: DictConfig  # the whole resolved run config (the method's section is ``cfg[spec.section]``)
    classifier: Any  # the frozen classifier (a FrozenClassifier)
    class_names: list[str]
    store: Any  # the embedding store (concepts, text embeddings, VLM); None where the data have none
    image_size: int  # the classifier's input crop
    attributes: list[tuple[str, str]] | None = None  # the data's (name, type) attributes: the shapes world's
    #   concepts, or an attribute table's columns (type "attribute"); None where the data have none
    targets: list[str] | None = None  # the columns of a regression target table (data.targets); None: none


@dataclass
class TrainContext:
    """What a method's training callbacks may need: the run's config and folder, its data and module."""

    cfg: DictConfig
    run_dir: Path
    datamodule: Any
    module: Any
    classifier: Any
    images: bool  # True for image sources (data.source=images), False for the shapes world
    masks: bool  # the validation data carry concept masks


@dataclass(frozen=True)
class MethodSpec:
    """One registered explainer.

    Attributes:
        name: the ``method`` config value and what checkpoints record (``arch.method``).
        module: its LightningModule class.
        title: its name for people (``L-CAM-Img``).
        build: ``build(ctx, spec) -> module``.
        section: the config section of its options (``None``: it has none).
        schema: the typed schema (a dataclass) of that section.
        defaults: the YAML file with that section's defaults (``configs/method/<file>``).
        options: fixed constructor options (e.g. ``variant="img"``).
        data_sources: the ``data.source`` values it trains on.
        image_data: what it reads from image data (``data.source=images``) besides images and labels:
            ``"embeddings"`` (``data.store``), ``"attributes"`` (``data.attributes``), ``"targets"``
            (``data.targets`` may be given).
        training_callbacks: ``training_callbacks(ctx) -> [Callback]``, the method's own training callbacks.
        rules: the value rules of its section's keys (:mod:`cefam_lightning.config_rules`).
    """

    name: str
    module: type[ExplainerModule]
    title: str
    build: Callable[[BuildContext, MethodSpec], ExplainerModule]
    section: str | None = None
    schema: type | None = None
    defaults: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    data_sources: tuple[str, ...] = ("shapes", "images")
    image_data: tuple[str, ...] = ()
    training_callbacks: Callable[[TrainContext], list[L.Callback]] | None = None
    rules: tuple[Any, ...] = ()


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    module: type[ExplainerModule],
    *,
    title: str,
    build: Callable[[BuildContext, MethodSpec], ExplainerModule],
    section: str | None = None,
    schema: type | None = None,
    defaults: str | Path | None = None,
    data_sources: Sequence[str] = ("shapes", "images"),
    image_data: Sequence[str] = (),
    training_callbacks: Callable[[TrainContext], list[L.Callback]] | None = None,
    rules: Sequence[Any] = (),
    **options: Any,
) -> MethodSpec:
    """Register an explainer under ``name``; returns its spec.

    Args:
        name: the ``method`` value (letters, digits, ``_``).
        module: its :class:`~cefam_lightning.methods.base.ExplainerModule` subclass.
        title: its name for people.
        build: how to build it for a run (``build(ctx, spec)``).
        section, schema, defaults: its config section, the section's dataclass schema and its defaults file
            (relative to ``configs/method/`` or absolute); all three or none.
        data_sources: the ``data.source`` values it can train on.
        image_data: what it reads from image data besides images and labels (:class:`MethodSpec`).
        training_callbacks: its own training callbacks for a run.
        rules: the value rules of its section's keys.
        **options: fixed constructor options.

    Raises:
        ValueError: a malformed name, a name already taken by another class, or a section without schema.
    """
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"method name {name!r}: use lower-case letters, digits and '_'")
    if (section is None) != (schema is None):
        raise ValueError(f"method {name!r}: a config section needs a schema and a schema a section")
    unknown = sorted(set(image_data) - set(IMAGE_DATA))
    if unknown:
        raise ValueError(f"method {name!r}: unknown image_data {unknown}; choose from {IMAGE_DATA}")
    path = None
    if defaults is not None:
        path = Path(defaults)
        path = path if path.is_absolute() else CONFIG_DIR / "method" / path
    spec = MethodSpec(
        name=name,
        module=module,
        title=title,
        build=build,
        section=section,
        schema=schema,
        defaults=path,
        options=dict(options),
        data_sources=tuple(data_sources),
        image_data=tuple(image_data),
        training_callbacks=training_callbacks,
        rules=tuple(rules),
    )
    old = _REGISTRY.get(name)
    if old is not None and old.module is not module:
        raise ValueError(f"method {name!r} is already registered for {old.module.__name__}")
    _REGISTRY[name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a registration (tests that register a method of their own)."""
    _REGISTRY.pop(name, None)


def _builtins() -> None:
    import cefam_lightning.methods  # noqa: F401 - registers CE-FAM, L-CAM and SIAM


def method_names() -> list[str]:
    """The registered method names, in registration order."""
    _builtins()
    return list(_REGISTRY)


def get_method(name: str, where: str = "method") -> MethodSpec:
    """The registration of ``name``.

    Raises:
        UnknownMethodError: naming ``where`` (the config key or flag) and the registered methods.
    """
    _builtins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(
            f"{where}: unknown method {name!r}{hint} (registered: {', '.join(_REGISTRY)})"
        ) from None


def method_of_hparams(hparams: Any) -> str | None:
    """The method a checkpoint's ``hyper_parameters`` record, or ``None`` when they record none.

    ``hyper_parameters["arch"]["method"]`` since the registry. Checkpoints written before it mark their method in
    one of three ways, read here and nowhere else: an ``arch.translator`` (CE-FAM), ``arch.kind: "lcam"`` with the
    ``variant`` hyper-parameter (L-CAM), ``arch.method: "siam"``.
    """
    arch = hparams.get("arch") if isinstance(hparams, Mapping) else None
    if not isinstance(arch, Mapping):
        return None
    method = arch.get("method")
    if isinstance(method, str):
        return method
    if "translator" in arch:
        return "cefam"
    if arch.get("kind") == "lcam":
        return f"lcam_{hparams.get('variant') or 'img'}"
    return None
