"""Bundle directory: one ``manifest.json`` describing programs, slot contract, bank, router, tokenizer.

A bundle is written with :func:`hm_export.atomic.atomic_directory`, so an interrupted export never
leaves a half bundle where a loader could find it.  Every file except the bank blocks
(which carry their own checksums in the bank index) is listed with its size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from hm_export.formats import read_format_json

BUNDLE_FORMAT = "hm-export-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
HASH_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle is missing files, was tampered with, or does not match what a loader expects."""


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


def safe_relative(root: Path, relative: str, what: str) -> Path:
    """Resolve ``relative`` under ``root``; refuse absolute paths and ``..`` escapes."""
    candidate = Path(relative)
    resolved = (root / candidate).resolve()
    if candidate.is_absolute() or not resolved.is_relative_to(root.resolve()):
        raise BundleError(f"{root / MANIFEST}: unsafe path {relative!r} for {what} (must stay inside the bundle)")
    return resolved


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(root: Path) -> dict[str, Any]:
    return read_format_json(Path(root) / MANIFEST, BUNDLE_FORMAT, BUNDLE_VERSION, BundleError, "an hm-export bundle")


def file_problems(root: Path, manifest: dict[str, Any]) -> Iterator[str]:
    """One message per listed file that is missing or differs in size or sha256, naming the file."""
    for relative, record in manifest.get("files", {}).items():
        path = safe_relative(root, relative, "a listed file")
        if not path.is_file():
            yield f"{path}: listed in the manifest but missing"
            continue
        size = path.stat().st_size
        if size != record["bytes"]:
            yield f"{path}: {size} bytes, manifest says {record['bytes']} (truncated or replaced)"
        elif sha256_file(path) != record["sha256"]:
            yield f"{path}: sha256 does not match the manifest (file was modified)"


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Check every listed file's size and sha256; raise naming the first file that differs."""
    for problem in file_problems(root, manifest):
        raise BundleError(problem)
