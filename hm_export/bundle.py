"""Bundle directory: one ``manifest.json`` describing programs, slot contract, bank, router, tokenizer.

A bundle is written with :func:`hm_export.atomic.atomic_directory`, so an interrupted export never
leaves a half bundle where a loader could find it.  Every file except the bank blocks
(which carry their own CRC-32 and sha256 in the bank index) is listed with its size and sha256, and the
manifest itself is sealed by ``bundle.sig`` (:mod:`hm_export.integrity`).

The manifest's format (types, read, write, validation) is :mod:`hm_export.formats.manifest`; this module
holds what works on the files it lists: hashing them at export, checking them at open, reading one of them
within the bundle at its listed size.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Collection, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from hm_export.errors import BundleError
from hm_export.formats.manifest import FORMAT as BUNDLE_FORMAT
from hm_export.formats.manifest import MANIFEST, Manifest, is_bundle
from hm_export.formats.manifest import VERSION as BUNDLE_VERSION
from hm_export.formats.manifest import read as read_manifest
from hm_export.formats.manifest import write as write_manifest
from hm_export.safeio import open_regular, read_capped, resolve_inside

HASH_CHUNK = 1 << 20

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "MANIFEST",
    "BundleError",
    "is_bundle",
    "read_manifest",
    "write_manifest",
]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(root: Path, relative: str) -> dict[str, Any]:
    path = root / relative
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def list_files(root: Path, relatives: list[str]) -> list[str]:
    """Expand directories (e.g. ``.mlpackage``) into the files under them, as bundle-relative paths."""
    out = []
    for relative in relatives:
        path = root / relative
        if path.is_dir():
            out += sorted(p.relative_to(root).as_posix() for p in path.rglob("*") if p.is_file())
        else:
            out.append(relative)
    return out


def toolchain_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in (
        "hm-export",
        "torch",
        "executorch",
        "onnx",
        "onnxruntime",
        "coremltools",
        "tokenizers",
        "safetensors",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def safe_relative(root: Path, relative: object, what: str, kind: str = "file", field: str | None = None) -> Path:
    """``root/relative`` for a path read from the manifest: relative, inside the bundle, reached through no
    symlink, and a regular file (``kind="file"``) or directory (``kind="dir"``); errors name the file."""
    return resolve_inside(Path(root), relative, what, Path(root) / MANIFEST, kind, BundleError, field)


def file_problems(
    root: Path, manifest: Manifest, hashes: bool = True, only: Collection[str] | None = None
) -> Iterator[str]:
    """One message per listed file (``only``: those of them) that is missing, not a regular file inside the
    bundle, or differs in size (or, with ``hashes``, sha256) from the manifest, naming the file."""
    for relative, record in manifest.files.items():
        if only is not None and relative not in only:
            continue
        try:
            path = safe_relative(root, relative, "a listed file")
        except BundleError as exc:
            yield str(exc)
            continue
        size = path.lstat().st_size
        if size != record.bytes:
            yield f"{path}: {size} bytes, manifest says {record.bytes} (truncated or replaced)"
        elif hashes and _sha256_capped(path, record.bytes) != record.sha256:
            yield f"{path}: sha256 does not match the manifest (file was modified)"


def _sha256_capped(path: Path, size: int) -> str | None:
    """sha256 of a regular file of ``size`` bytes, read through a no-follow descriptor; None if it changed."""
    fd = open_regular(path, "a listed file", BundleError)
    digest, left = hashlib.sha256(), size
    try:
        while left > 0:
            chunk = os.read(fd, min(HASH_CHUNK, left))
            if not chunk:
                return None
            digest.update(chunk)
            left -= len(chunk)
        if os.read(fd, 1):
            return None
    finally:
        os.close(fd)
    return digest.hexdigest()


def verify_files(
    root: Path, manifest: Manifest | dict[str, Any], hashes: bool = True, only: Collection[str] | None = None
) -> None:
    """Check every listed file's (``only``: those listed files') size and, with ``hashes``, sha256; raise naming
    the first that differs.  Trusted storage (``hashes=False``) still checks that each is a regular file of the
    declared size.  ``manifest``: the typed manifest, or a manifest record (validated first)."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.parse(root, manifest)
    for problem in file_problems(root, manifest, hashes, only):
        raise BundleError(problem)


def read_listed(root: Path, manifest: Manifest, relative: str, what: str, limit: int) -> bytes:
    """The bytes of a listed file: inside the bundle, regular, of exactly its declared size (at most ``limit``)."""
    path = safe_relative(root, relative, what)
    return read_capped(path, what, limit, BundleError, exact=manifest.listed_size(relative))
