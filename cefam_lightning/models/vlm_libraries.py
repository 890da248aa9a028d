"""The VLM libraries ``precompute`` can read a model with, by name: each is a
:class:`~cefam_lightning.models.vlm.VLMBase` (the interface precompute reads) with the static
``brings_own_weights(model)`` and ``register_config(path)``, so callers look the class up here and never branch
on a library's name."""

from __future__ import annotations

from cefam_lightning.models.hf import TransformersVLM
from cefam_lightning.models.vlm import OpenCLIPVLM, VLMError

VLM_LIBRARIES: dict[str, type] = {"open_clip": OpenCLIPVLM, "transformers": TransformersVLM}


def vlm_library(name: str) -> type:
    """The VLM class of library ``name`` (``open_clip`` or ``transformers``); another name is a :class:`VLMError`."""
    try:
        return VLM_LIBRARIES[name]
    except KeyError:
        raise VLMError(f"unknown VLM library {name!r}; choose from {', '.join(VLM_LIBRARIES)}") from None
