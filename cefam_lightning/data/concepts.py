"""Concept sets: names, types and the prompts a VLM's text encoder reads (docs/method.md#concept-scores)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from cefam_lightning.errors import CefamError, error_summary

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


class ConceptFileError(CefamError):
    """A concept file that is missing or malformed; the message names the file (and line) at fault."""


def read_concept_file(path: str | os.PathLike) -> list[tuple[str, str | None]]:
    """Read a concept file into ``(name, type or None)`` pairs, in file order.

    One concept per line, ``name`` or ``name,type`` (or tab-separated); blank lines and ``#`` comments are
    ignored. A missing file, a malformed line, no concepts at all or a repeated name raise
    :class:`ConceptFileError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConceptFileError(f"concept file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConceptFileError(f"{path}: cannot read the concept file ({error_summary(e)})") from e
    items: list[tuple[str, str | None]] = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split("\t" if "\t" in line else ",")]
        if len(fields) > 2 or not fields[0] or (len(fields) == 2 and not fields[1]):
            raise ConceptFileError(f"{path}:{lineno}: expected 'name' or 'name,type', got {raw.strip()!r}")
        items.append((fields[0], fields[1] if len(fields) == 2 else None))
    if not items:
        raise ConceptFileError(f"{path}: no concepts in the file")
    dups = sorted(n for n, count in Counter(n for n, _ in items).items() if count > 1)
    if dups:
        raise ConceptFileError(f"duplicate concept name(s) in {path}: {', '.join(map(repr, dups))}")
    return items
