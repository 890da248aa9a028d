"""Where images come from: an image folder, a CSV/JSONL manifest, or WebDataset tar shards.

Every source yields :class:`ImageRecord` objects (a stable sample id, an optional integer label, and either a file
path or the encoded bytes) once each, in a deterministic order, without shuffling. ``precompute`` walks a source
to write the embedding store, and the training DataModule walks the same source and joins each image with its
embedding by sample id, so the id rules below are what ties the two together:

- **folder** (``root/<class>/<...>/<file>``, classes are the sorted sub-folder names, as torchvision's
  ``ImageFolder``): the id is the file's posix path relative to ``root``, e.g. ``cat/0001.jpg``.
- **manifest** (``*.csv`` with a header line, or ``*.jsonl`` with one JSON object per line): a ``path`` column
  (relative paths are resolved against the manifest's folder), an optional ``label`` (a class index or a class
  name) and an optional ``id``; the id is the ``id`` value when given, else the path exactly as written.
- **WebDataset shards** (``data.tar``, a brace pattern ``shards-{000..009}.tar`` or a glob ``shards-*.tar`` whose
  wildcards are in the file name only): the id is the sample's ``__key__`` (its file name up to the first dot);
  the image is the ``jpg``, ``jpeg``, ``png`` or ``webp`` member, the label the ``cls`` member (an integer or a
  class name) or ``json["label"]``.

Every source has a ``fingerprint()``: a JSON-serializable summary of the files it reads (absolute paths, sizes
and ``mtime_ns``), which keys caches of what is computed from the images (the pooled-feature cache), so that
images replaced in place are never served from a cache made of the old ones.

Every problem is an :class:`ImageSourceError` naming the file, line, shard or key at fault. A tar shard is checked
whole (:func:`shard_keys`) before its samples are used: one cut short or damaged is a :class:`TruncatedShardError`,
never a shard silently shorter than written.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from cefam_lightning.data.image_io import read_rgb
from cefam_lightning.errors import CefamError, error_summary

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # WebDataset member suffixes read as the image, in this order
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACES = re.compile(r"\{[^{}]*\}")


class ImageSourceError(CefamError):
    """A source of images is missing, malformed or has an unreadable image; the message names what is at fault."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a source.

    Args:
        id: the sample's unique, stable id (see the module docstring for each kind of source).
        label: class index, or ``None`` for an unlabeled image.
        path: the image file, for sources on disk.
        data: the encoded image bytes, for WebDataset shards. Exactly one of ``path`` and ``data`` is set.
        origin: where the record was read, for messages: ``manifest.csv:12`` or a shard's path (else ``None``).
    """

    id: str
    label: int | None
    path: Path | None = None
    data: bytes | None = None
    origin: str | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError(f"ImageRecord {self.id!r}: exactly one of path and data must be set")

    def where(self) -> str:
        """A human-readable location: the file, or the shard (for records holding bytes)."""
        if self.path is not None:
            return str(self.path) if self.origin is None else f"{self.path} ({self.origin})"
        return f"shard {self.origin}" if self.origin else "in-memory bytes"


def open_image(record: ImageRecord) -> Image.Image:
    """Decode ``record`` into an 8-bit RGB PIL image (:func:`~cefam_lightning.data.image_io.read_rgb`: any mode,
    16-bit included, EXIF orientation applied).

    Raises:
        ImageSourceError: naming the record's id and file or shard when the image cannot be read or decoded.
    """
    try:
        return read_rgb(record.path if record.path is not None else io.BytesIO(record.data))
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        raise ImageSourceError(f"cannot decode image {record.id!r} ({record.where()}): {error_summary(e)}") from e


@runtime_checkable
class ImageSource(Protocol):
    """What every source offers: class names (when known), records in a fixed order, a one-line description, and
    a fingerprint of the files it reads."""

    class_names: list[str] | None

    def __iter__(self) -> Iterator[ImageRecord]: ...

    def describe(self) -> str: ...

    def fingerprint(self) -> dict[str, Any]: ...


def files_fingerprint(paths: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """How many files, and a digest of each one's absolute path, size and ``mtime_ns`` (one ``stat`` per file).

    Size and mtime rather than a digest of the contents: a digest would read the whole data set again at every
    start (an epoch's worth of I/O), while rewriting a file by any ordinary means changes its mtime. A change that
    keeps both size and mtime is not seen: a same-size file put in place with the old timestamp (``cp -p``,
    ``touch -d``), or a same-size rewrite within the timestamp resolution of a file system with coarse mtimes.

    Raises:
        ImageSourceError: naming a file that cannot be ``stat``-ed.
    """
    h = hashlib.sha256()
    n = 0
    for p in paths:
        path = os.path.abspath(p)  # the same relative spelling from another folder is other data
        st = _stat(path)
        # NUL cannot occur in a path, so the fields cannot run into each other
        h.update(os.fsencode(path) + f"\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        n += 1
    return {"files": n, "files_digest": h.hexdigest()[:32]}


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        raise ImageSourceError(f"{path}: cannot read the file's size and time ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------------------- labels
def _label_from_value(value: Any, class_names: Sequence[str] | None, where: str) -> int | str | None:
    """An int (validated against ``class_names`` when known), a class-name string to map later, or ``None``.

    Strings that are one of ``class_names`` are names; other all-digit strings are indices.
    """
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ImageSourceError(f"{where}: bad label {value!r} (expected a class index or a class name)")
    if isinstance(value, str):
        value = value.strip()
        if class_names is not None and value in class_names:
            return list(class_names).index(value)
        if re.fullmatch(r"[0-9]+", value):
            value = int(value)
        elif _is_number(value):
            raise ImageSourceError(f"{where}: bad label {value!r} (class indices are integers >= 0)")
        elif class_names is not None:
            raise ImageSourceError(
                f"{where}: label {value!r} is not one of the {len(class_names)} class names ({_preview(class_names)})"
            )
        else:
            return value
    if value < 0 or (class_names is not None and value >= len(class_names)):
        limit = f" with {len(class_names)} classes" if class_names is not None else ""
        raise ImageSourceError(f"{where}: label {value} is out of range{limit}")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _resolve_labels(
    raw: list[int | str | None], class_names: Sequence[str] | None, wheres: list[str], what: str
) -> tuple[list[int | None], list[str] | None]:
    """Map class-name labels to indices; without given class names the names are the sorted distinct labels."""
    names = [r for r in raw if isinstance(r, str)]
    if not names:
        return list(raw), list(class_names) if class_names is not None else None  # type: ignore[arg-type]
    ints = [i for i, r in enumerate(raw) if isinstance(r, int)]
    if ints:
        first_name = next(i for i, r in enumerate(raw) if isinstance(r, str))
        raise ImageSourceError(
            f"{what}: labels mix class indices ({wheres[ints[0]]}: {raw[ints[0]]}) and class names "
            f"({wheres[first_name]}: {raw[first_name]!r}); use one kind, or give the class names"
        )
    found = sorted(set(names))
    index = {n: i for i, n in enumerate(found)}
    return [index[r] if isinstance(r, str) else None for r in raw], found


def _preview(items: Sequence[Any], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:n])
    return shown + (", ..." if len(items) > n else "")


def _check_unique(ids: Sequence[str], wheres: Sequence[str], what: str) -> None:
    seen: dict[str, int] = {}
    for i, s in enumerate(ids):
        j = seen.setdefault(s, i)
        if j != i:
            raise ImageSourceError(f"{what}: duplicate sample id {s!r} ({wheres[j]} and {wheres[i]})")


# ---------------------------------------------------------------------------------------------------- map-style
class _MapSource:
    """Shared behaviour of the sources that list their records up front (folder, manifest)."""

    records: list[ImageRecord]
    class_names: list[str] | None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]


class ImageFolderSource(_MapSource):
    """``root/<class>/.../<image>`` with one sub-folder per class (torchvision ``ImageFolder`` rules).

    Args:
        root: the folder.
        class_names: the class list (its order gives the indices); every sub-folder must be one of them, a class
            may have no folder. ``None``: the sorted sub-folder names, each of which must hold an image.
    """

    def __init__(self, root: str | os.PathLike, class_names: Sequence[str] | None = None):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ImageSourceError(f"{self.root}: no such image folder")
        try:
            found, _ = find_classes(self.root)
        except FileNotFoundError:
            raise ImageSourceError(f"{self.root}: no class sub-folders (expected root/<class>/<image>)") from None
        if class_names is None:
            self.class_names = found
        else:
            self.class_names = list(class_names)
            unknown = sorted(set(found) - set(self.class_names))
            if unknown:
                raise ImageSourceError(
                    f"{self.root}: sub-folder(s) {_preview(unknown)} are not among the given class names "
                    f"({_preview(self.class_names)})"
                )
        try:
            items = make_dataset(
                str(self.root),
                {c: i for i, c in enumerate(self.class_names)},
                extensions=IMG_EXTENSIONS,
                allow_empty=class_names is not None,
            )
        except FileNotFoundError as e:
            raise ImageSourceError(f"{self.root}: {e}") from None
        if not items:
            raise ImageSourceError(f"{self.root}: no images (extensions {', '.join(IMG_EXTENSIONS)})")
        self.records = [
            ImageRecord(id=Path(p).relative_to(self.root).as_posix(), label=int(y), path=Path(p)) for p, y in items
        ]

    def describe(self) -> str:
        return f"folder {self.root} ({len(self)} images, {len(self.class_names)} classes)"

    def fingerprint(self) -> dict[str, Any]:
        """The folder's absolute path and :func:`files_fingerprint` of its images (sizes and mtimes, now)."""
        return {"kind": "folder", "root": os.path.abspath(self.root), **files_fingerprint(r.path for r in self)}


class ManifestSource(_MapSource):
    """A CSV (with a header line) or JSONL file listing images: ``path``, optional ``label`` and ``id``.

    Args:
        manifest: the ``.csv`` or ``.jsonl`` file.
        class_names: the class list; labels may then be names from it or indices into it. ``None``: integer labels
            are kept as they are (no names), class-name labels are numbered in sorted order.
    """

    def __init__(self, manifest: str | os.PathLike, class_names: Sequence[str] | None = None):
        self.manifest = Path(manifest).expanduser()
        if not self.manifest.is_file():
            raise ImageSourceError(f"{self.manifest}: no such manifest file")
        suffix = self.manifest.suffix.lower()
        if suffix == ".csv":
            rows = list(_csv_rows(self.manifest))
        elif suffix == ".jsonl":
            rows = list(_jsonl_rows(self.manifest))
        else:
            raise ImageSourceError(f"{self.manifest}: a manifest must be a .csv or .jsonl file")
        if not rows:
            raise ImageSourceError(f"{self.manifest}: the manifest lists no images")
        given = list(class_names) if class_names is not None else None
        base = self.manifest.parent
        ids, paths, raw, wheres, lines, missing = [], [], [], [], [], []
        for line, row in rows:
            where = f"{self.manifest}:{line}"
            value = row.get("path")
            if not isinstance(value, str) or not value.strip():
                raise ImageSourceError(f"{where}: empty or non-string 'path' ({value!r})")
            path = Path(value).expanduser()
            path = path if path.is_absolute() else base / path
            sid = row.get("id")
            if sid is None or (isinstance(sid, str) and not sid.strip()):
                sid = value
            elif isinstance(sid, bool) or not isinstance(sid, str | int):
                raise ImageSourceError(f"{where}: bad id {sid!r} (expected a string)")
            raw.append(_label_from_value(row.get("label"), given, where))
            ids.append(str(sid))
            paths.append(path)
            wheres.append(where)
            lines.append(line)
            if not path.is_file():
                missing.append(f"{where}: {path}")
        if missing:
            raise ImageSourceError(
                f"{self.manifest}: {len(missing)} of {len(rows)} listed image files do not exist (first: "
                + "; ".join(missing[:5])
                + ")"
            )
        _check_unique(ids, wheres, str(self.manifest))
        labels, self.class_names = _resolve_labels(raw, given, wheres, str(self.manifest))
        self.records = [
            ImageRecord(id=s, label=y, path=p, origin=f"{self.manifest.name}:{n}")
            for s, y, p, n in zip(ids, labels, paths, lines, strict=True)
        ]

    def describe(self) -> str:
        classes = f", {len(self.class_names)} classes" if self.class_names is not None else ""
        return f"manifest {self.manifest} ({len(self)} images{classes})"

    def fingerprint(self) -> dict[str, Any]:
        """The manifest's absolute path, size and mtime (it maps ids to files) and :func:`files_fingerprint` of
        the images it lists (sizes and mtimes, now)."""
        path = os.path.abspath(self.manifest)
        st = _stat(path)
        return {
            "kind": "manifest",
            "manifest": path,
            "manifest_size": st.st_size,
            "manifest_mtime_ns": st.st_mtime_ns,
            **files_fingerprint(r.path for r in self),
        }


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise ImageSourceError(f"{path}: empty CSV (expected a header line with a 'path' column)")
        fields = [c.strip() for c in reader.fieldnames]
        if "path" not in fields:
            raise ImageSourceError(f"{path}:1: no 'path' column in the header {fields}")
        reader.fieldnames = fields
        for row in reader:
            if all(v is None or not str(v).strip() for v in row.values()):
                continue  # a blank line
            if None in row:
                raise ImageSourceError(f"{path}:{reader.line_num}: more values than header columns")
            yield reader.line_num, row


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ImageSourceError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ImageSourceError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            if "path" not in row:
                raise ImageSourceError(f"{path}:{n}: no 'path' key (keys: {sorted(row)})")
            yield n, row


# ---------------------------------------------------------------------------------------------------- webdataset
def expand_shards(spec: str | os.PathLike) -> list[Path]:
    """The tar files a shard spec names: a file, a brace pattern (``a-{000..009}.tar``) or a file-name glob.

    Every file must exist; the order is the pattern's (braces) or sorted (globs).
    """
    import braceexpand

    text = os.path.expanduser(str(spec))
    out: list[Path] = []
    for item in braceexpand.braceexpand(text):
        head, name = os.path.split(item)
        if _GLOB_CHARS.search(head):
            raise ImageSourceError(f"{spec}: wildcards are allowed in the file name only, not in the folder {head!r}")
        if _GLOB_CHARS.search(name):
            matches = sorted(glob.glob(item))
            if not matches:
                raise ImageSourceError(f"{spec}: no files match {item!r}")
            out.extend(Path(m) for m in matches)
        else:
            out.append(Path(item))
    bad = [p for p in out if not p.name.lower().endswith(TAR_SUFFIXES)]
    if bad:
        raise ImageSourceError(f"{spec}: not tar shards ({_preview([str(p) for p in bad])}); expected {TAR_SUFFIXES}")
    missing = [str(p) for p in out if not p.is_file()]
    if missing:
        raise ImageSourceError(f"{spec}: {len(missing)} of {len(out)} shards do not exist (first: {_preview(missing)})")
    dupes = sorted({str(p) for p in out if out.count(p) > 1})
    if dupes:
        raise ImageSourceError(f"{spec}: shards listed more than once: {_preview(dupes)}")
    return out


class TruncatedShardError(ImageSourceError):
    """A tar shard ends early or holds damaged headers: the samples past the damage, and which they were, are lost."""


def shard_keys(shard: str | os.PathLike) -> list[str]:
    """The sample keys of a tar shard, in order, read from the member headers only (no image is read).

    Members are grouped into samples exactly as ``webdataset`` does (key = name up to the first dot of the file
    name, ``__*__`` metadata skipped). A key that appears in two places, or a sample without an image member, is an
    :class:`ImageSourceError`.

    The whole shard is checked: a tar reader (``tarfile``, ``webdataset``) stops without a word at a header cut
    short or damaged, or at the end of a file cut between two members, and the samples after it are lost
    unnoticed. So a shard whose last member runs past the end of the file, that has a partial or damaged header,
    that ends without the end-of-archive marker (the zero block every tar writer puts last), or that holds data
    after that marker, is a :class:`TruncatedShardError` naming the shard and the byte.
    """
    from webdataset.tariterators import base_plus_ext

    shard = Path(shard)
    keys: list[str] = []
    suffixes: list[set[str]] = []
    try:
        with tarfile.open(shard, "r:*") as tf:
            for m in tf:
                name = m.name
                if not m.isreg() or re.match(r"__[^/]*__($|/)", name):
                    continue
                prefix, suffix = base_plus_ext(name)
                if prefix is None:
                    continue
                if not keys or keys[-1] != prefix:
                    keys.append(prefix)
                    suffixes.append(set())
                suffixes[-1].add(suffix.lower())
            _check_tar_end(tf, shard, bool(keys))
    except ImageSourceError:
        raise
    except tarfile.ReadError as e:
        if "unexpected end of data" in str(e):
            raise TruncatedShardError(_truncated(shard, f"the file ends inside a member ({e})")) from e
        raise ImageSourceError(f"{shard}: not a readable tar file ({e})") from e
    except SHARD_READ_ERRORS as e:  # e.g. a .tar.gz cut short (EOFError) or damaged (zlib.error)
        raise TruncatedShardError(_truncated(shard, error_summary(e))) from e
    if not keys:
        raise ImageSourceError(f"{shard}: the shard holds no samples")
    _check_unique(keys, [f"{shard} sample {i}" for i in range(len(keys))], str(shard))
    for key, sfx in zip(keys, suffixes, strict=True):
        if not sfx.intersection(IMAGE_EXTENSIONS):
            raise ImageSourceError(
                f"{shard}: sample {key!r} has no image member (has {sorted(sfx)}; expected one of {IMAGE_EXTENSIONS})"
            )
    return keys


def _truncated(shard: Path, what: str) -> str:
    return (
        f"{shard}: truncated or damaged tar shard: {what}; the samples after that point cannot be read, nor even "
        f"listed. Copy or download the shard again (or leave it out of the sources)"
    )


def _check_tar_end(tf: tarfile.TarFile, shard: Path, any_members: bool) -> None:
    """After ``tarfile`` stopped reading members: what follows must be the end-of-archive marker and zeros only.

    ``tf.offset`` is where ``tarfile`` stopped: at the marker of a complete archive, but also (silently) at a
    header cut short or damaged, or at the end of a file cut between members. A file cut inside the marker has
    lost nothing and passes (a header never starts with a zero byte).
    """
    if not any_members:  # an archive of no members: "holds no samples" says more
        return
    f = tf.fileobj
    f.seek(tf.offset)
    block = f.read(tarfile.BLOCKSIZE)
    if not block:
        what = f"the file ends after a member (byte {tf.offset}) without the end-of-archive marker"
        raise TruncatedShardError(_truncated(shard, what))
    if block.count(0) != len(block):
        what = "a header cut short" if len(block) < tarfile.BLOCKSIZE else "a damaged tar header"
        raise TruncatedShardError(_truncated(shard, f"{what} at byte {tf.offset}"))
    at = tf.offset + len(block)
    while chunk := f.read(1 << 16):  # the rest: more zero blocks and record padding
        if chunk.count(0) != len(chunk):
            where = at + next(i for i, b in enumerate(chunk) if b)
            what = f"data after the end-of-archive marker at byte {where} (tar files joined with cat?)"
            raise TruncatedShardError(_truncated(shard, what))
        at += len(chunk)


def record_from_sample(
    sample: dict[str, Any], class_names: Sequence[str] | None = None, labels: bool = True
) -> ImageRecord:
    """Turn a ``webdataset`` sample dict (``__key__``, ``__url__``, member bytes by suffix) into an ImageRecord.

    ``labels=False`` leaves the label out (``None``) without reading it.
    """
    key, url = sample["__key__"], sample.get("__url__")
    where = f"{url}: sample {key!r}"
    image = next((sample[s] for s in IMAGE_EXTENSIONS if s in sample), None)
    if image is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ImageSourceError(f"{where}: no image member (has {members}; expected one of {IMAGE_EXTENSIONS})")
    label: Any = None
    if not labels:
        return ImageRecord(id=str(key), label=None, data=bytes(image), origin=str(url) if url is not None else None)
    if "cls" in sample:
        label = _decode_text(sample["cls"], where, "cls")
    elif "json" in sample:
        try:
            meta = json.loads(_decode_text(sample["json"], where, "json"))
        except json.JSONDecodeError as e:
            raise ImageSourceError(f"{where}: the json member is not valid JSON ({e.msg})") from None
        label = meta.get("label") if isinstance(meta, dict) else None
    label = _label_from_value(label, class_names, where)
    if isinstance(label, str):
        raise ImageSourceError(f"{where}: label {label!r} is a class name; give the class names to map it to an index")
    return ImageRecord(id=str(key), label=label, data=bytes(image), origin=str(url) if url is not None else None)


def _decode_text(value: bytes, where: str, member: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageSourceError(f"{where}: the {member} member is not UTF-8 text") from None


SHARD_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)  # what reading a damaged tar or gzip raises


def iter_shard_samples(shards: Iterable[str | os.PathLike]) -> Iterator[dict[str, Any]]:
    """Raw ``webdataset`` samples of ``shards`` in order (no splitting, no shuffling).

    Raises:
        ImageSourceError: naming the shard, when reading it fails (see :func:`shard_error`).
    """
    import webdataset as wds

    for shard in shards:
        try:
            yield from wds.tarfile_to_samples(handler=shard_error)(iter([{"url": str(shard)}]))
        except ImageSourceError:
            raise
        except SHARD_READ_ERRORS as e:
            raise ImageSourceError(f"{shard}: cannot read the tar shard ({error_summary(e)})") from e


def shard_error(exn: Exception) -> bool:
    """A ``webdataset`` error handler: a failure to read a shard is an :class:`ImageSourceError` naming it.

    ``webdataset`` calls it where reading fails, and again on the way out with the shard's url appended to the
    exception's arguments. Module level, so that DataLoader workers can unpickle it.
    """
    urls = [a for a in exn.args[1:] if isinstance(a, str) and a.lower().endswith(TAR_SUFFIXES)]
    if isinstance(exn, ImageSourceError):  # raised here before; webdataset appended arguments to it since
        message, cause = exn.args[0], exn.__cause__
    else:
        first = exn.args[0] if exn.args else ""
        reason = first.split(" @ ")[0] if isinstance(first, str) else str(first)  # webdataset appends " @ <file>"
        message, cause = f"cannot read the tar shard ({type(exn).__name__}: {reason})", exn
    if urls and not message.startswith(urls[-1]):
        message = f"{urls[-1]}: {message}"
    raise ImageSourceError(message) from cause


class WebDataSource:
    """WebDataset tar shards read in order, every sample once (no node/worker splitting, no shuffling).

    Training streams the same shards through ``webdataset`` with splitting and a shuffle buffer
    (:class:`~cefam_lightning.data.image_datamodule.ImageDataModule`).

    Args:
        spec: a ``.tar`` file, a brace pattern or a file-name glob of tar files.
        class_names: needed when labels are class names; integer labels are checked against it when given.
        labels: ``False``: do not read labels (every record's label is ``None``), e.g. for embedding
            precomputation, which needs none, of shards whose labels are class names.
    """

    def __init__(self, spec: str | os.PathLike, class_names: Sequence[str] | None = None, labels: bool = True):
        self.spec, self.labels = str(spec), labels
        self.shards = expand_shards(spec)
        self.class_names = list(class_names) if class_names is not None else None
        self._keys: list[list[str]] | None = None

    def __iter__(self) -> Iterator[ImageRecord]:
        # Every shard is checked whole first (shard_keys): streaming alone would stop without a word at a shard
        # cut between two samples, losing the rest of it unnoticed.
        self.keys_by_shard()
        for sample in iter_shard_samples(self.shards):
            yield record_from_sample(sample, self.class_names, self.labels)

    def shard_records(self, index: int) -> Iterator[ImageRecord]:
        """The records of shard ``index`` alone, in order (the unit a distributed precompute gives each process)."""
        self.keys_by_shard()
        for sample in iter_shard_samples([self.shards[index]]):
            yield record_from_sample(sample, self.class_names, self.labels)

    def keys_by_shard(self) -> list[list[str]]:
        """Each shard's sample keys (from the tar headers; cached). Checks that keys are unique across shards."""
        if self._keys is None:
            keys = [shard_keys(s) for s in self.shards]
            flat = [k for ks in keys for k in ks]
            wheres = [str(s) for s, ks in zip(self.shards, keys, strict=True) for _ in ks]
            _check_unique(flat, wheres, self.spec)
            self._keys = keys
        return self._keys

    def describe(self) -> str:
        return f"webdataset {self.spec} ({len(self.shards)} shard{'s' if len(self.shards) != 1 else ''})"

    def fingerprint(self) -> dict[str, Any]:
        """:func:`files_fingerprint` of the shards, in order (size and mtime of each shard, not a digest of its
        bytes: that would read every shard once more at each start)."""
        return {"kind": "webdataset", **files_fingerprint(self.shards)}


# ---------------------------------------------------------------------------------------------------- dispatch
def is_shard_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names tar shards (a tar file, a brace pattern or a glob ending in a tar suffix)."""
    text = str(spec)
    return text.lower().endswith(TAR_SUFFIXES) or (
        bool(_BRACES.search(text) or _GLOB_CHARS.search(text)) and _BRACES.sub("", text).lower().endswith(TAR_SUFFIXES)
    )


def open_source(spec: str | os.PathLike, class_names: Sequence[str] | None = None, labels: bool = True) -> ImageSource:
    """Open the source ``spec`` names: a folder, a ``.csv``/``.jsonl`` manifest, or tar shards.

    Args:
        spec: a directory (one sub-folder per class), a manifest file, or a shard spec (``a.tar``,
            ``a-{000..009}.tar``, ``dir/a-*.tar``).
        class_names: the class list to index labels by (e.g. the training source's, for validation data).
        labels: ``False``: tar shards are read without their labels (folders and manifests name their classes
            themselves, so they always have theirs).
    """
    text = os.path.expanduser(str(spec))
    path = Path(text)
    if path.is_dir():
        return ImageFolderSource(path, class_names)
    if path.suffix.lower() in (".csv", ".jsonl"):
        return ManifestSource(path, class_names)
    if is_shard_spec(text):
        return WebDataSource(text, class_names, labels)
    if not path.exists():
        raise ImageSourceError(f"{spec}: no such folder, manifest or tar shard")
    raise ImageSourceError(f"{spec}: not an image source (expected a folder, a .csv/.jsonl manifest, or .tar shards)")
