"""Concept sets: names, types and the prompts a VLM's text encoder reads (docs/method.md#concept-scores)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cefam_lightning.errors import CefamError, error_summary
from cefam_lightning.io_utils import atomic_write_bytes

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


@dataclass
class ConceptFileSummary:
    """What :func:`write_concept_file` wrote: the concepts kept, and the names dropped as repeats of earlier ones."""

    path: Path
    concepts: list[tuple[str, str]]
    dropped: list[str] = field(default_factory=list)

    @property
    def type_counts(self) -> dict[str, int]:
        return dict(Counter(t for _, t in self.concepts))


def concept_key(name: str) -> str:
    """Names that differ only in case or spacing are one concept: a VLM reads the same prompt for both."""
    return " ".join(name.split()).casefold()


def write_concept_file(
    path: str | os.PathLike, concepts: Iterable[tuple[str, str]], overwrite: bool = False, header: str | None = None
) -> ConceptFileSummary:
    """Write ``(name, type)`` pairs as a concept file :func:`read_concept_file` reads back, atomically.

    A name repeated (by :func:`concept_key`, whatever its type) keeps its first occurrence; the later ones are
    dropped and listed in the summary. A name holding a comma is written tab-separated. ``header`` is written as
    a ``#`` comment line first.

    Raises:
        ConceptFileError: ``path`` exists (without ``overwrite``) or is a folder; a name or type that cannot be
            written (empty, or holding ``#``, a tab or a line break); no concepts.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConceptFileError(f"{path}: is a folder; give the concept file to write")
    if path.exists() and not overwrite:
        raise ConceptFileError(f"{path}: already exists; add --overwrite to replace it")
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()
    dropped: list[str] = []
    for name, ctype in concepts:
        name, ctype = " ".join(str(name).split()), str(ctype).strip()
        for what, value in (("name", name), ("type", ctype)):
            if not value or any(ch in value for ch in "#\t\n\r") or (what == "type" and "," in value):
                raise ConceptFileError(f"{path}: concept {what} {value!r} cannot be written to a concept file")
        if concept_key(name) in seen:
            dropped.append(name)
            continue
        seen.add(concept_key(name))
        kept.append((name, ctype))
    if not kept:
        raise ConceptFileError(f"{path}: no concepts to write")
    lines = [f"# {line}" for line in (header or "").splitlines()] + ["# name,type"]
    lines += [f"{n}\t{t}" if "," in n else f"{n},{t}" for n, t in kept]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return ConceptFileSummary(path, kept, dropped)
