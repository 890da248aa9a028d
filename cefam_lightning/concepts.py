"""Concept sets: names, types and the prompts a VLM's text encoder reads (SPEC §2.2)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

# The CE-FAM authors' prompt templates, chosen by concept type.
DEFAULT_PROMPTS: dict[str, str] = {
    "color": "a photo of a {} object",
    "texture": "a photo of a {} object",
    "material": "a photo of an object made of {}",
    "object": "a photo of a {}",
    "part": "a photo of a {}",
    "scene": "a photo of an object on {}",
    # Not one of the authors' types: the shapes world's shape concepts read like objects.
    "shape": "a photo of a {}",
}
FALLBACK_PROMPT = "a photo of a {}"


@dataclass(frozen=True)
class Concept:
    """One concept: its name, its type (color, texture, object, ...) and the prompt for the text encoder."""

    name: str
    type: str
    prompt: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def make_prompt(name: str, concept_type: str, templates: Mapping[str, str] | None = None) -> str:
    """Fill the template of ``concept_type`` (the authors' defaults unless ``templates`` overrides them)."""
    table = {**DEFAULT_PROMPTS, **(templates or {})}
    return table.get(concept_type, FALLBACK_PROMPT).format(name)


def make_concepts(names_and_types: list[tuple[str, str]], templates: Mapping[str, str] | None = None) -> list[Concept]:
    """Build concepts with prompts from ``(name, type)`` pairs; names must be unique."""
    seen: set[str] = set()
    out = []
    for name, ctype in names_and_types:
        if name in seen:
            raise ValueError(f"Duplicate concept name {name!r}")
        seen.add(name)
        out.append(Concept(name=name, type=ctype, prompt=make_prompt(name, ctype, templates)))
    return out
