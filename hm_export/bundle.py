"""Bundle directory: one ``manifest.json`` describing programs, slot contract, bank, router, tokenizer.

A bundle is written with :func:`hm_export.atomic.atomic_directory`, so an interrupted export never
leaves a half bundle where a loader could find it.  Every file except the bank blocks
(which carry their own checksums in the bank index) is listed with its size and sha256, and the manifest
itself is sealed by ``bundle.sig`` (:mod:`hm_export.integrity`).

:func:`read_manifest` is the one way in: it reads the manifest (a regular file, bounded), checks the seal
(and a signature, given a trusted key) before parsing anything, parses it strictly
(:func:`~hm_export.formats.parse_json`) and checks its structure (:func:`check_manifest`): every section
the loaders use is there with the right types, every size and count is in range, and every path it names
is a listed file inside the bundle.  Code after it can index the manifest without ``KeyError``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
from collections.abc import Callable, Collection, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from hm_export.errors import BundleError
from hm_export.formats import Fields, read_format_json
from hm_export.integrity import canonical_json, check_seal, write_seal
from hm_export.safeio import open_regular, read_capped, relative_parts, resolve_inside

BUNDLE_FORMAT = "hm-export-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
HASH_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20
MAX_FILE_BYTES = 1 << 44  # 16 TiB: any real program or data file is far below
MAX_FILES = 1 << 20
MAX_ROUTER_TOKENS = 1 << 16  # the router program's token axis (MiniLM: [2, 256]); the C++ runtime's bound
ROUTER_RUNTIMES = ("executorch", "onnxruntime", "coreml")  # hm_export.router_program's emitters
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

__all__ = ["BUNDLE_FORMAT", "BUNDLE_VERSION", "MANIFEST", "BundleError"]


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


def write_manifest(root: Path, manifest: dict[str, Any], sign_key: Path | None = None) -> None:
    """Write ``manifest.json`` canonically and seal it in ``bundle.sig`` (signed with ``sign_key`` if given)."""
    data = canonical_json(manifest)
    (Path(root) / MANIFEST).write_bytes(data)
    write_seal(Path(root), data, sign_key)


def read_manifest(root: Path, verify_key: bytes | None = None) -> dict[str, Any]:
    """The checked manifest of the bundle ``root`` (see the module docstring); ``verify_key``: a trusted raw
    Ed25519 public key the bundle must be signed with."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise BundleError(f"{path}: missing (not an hm-export bundle)", path=path)
    data = read_capped(path, "bundle manifest", MAX_MANIFEST_BYTES, BundleError)
    check_seal(root, data, verify_key)
    manifest = read_format_json(path, BUNDLE_FORMAT, BUNDLE_VERSION, BundleError, "an hm-export bundle", data=data)
    check_manifest(root, manifest)
    return manifest


def is_bundle(path: Path) -> bool:
    """Whether ``path`` is a directory holding an hm-export bundle manifest (what ``--overwrite`` may replace)."""
    manifest = Path(path) / MANIFEST
    if not Path(path).is_dir() or Path(path).is_symlink() or not manifest.is_file() or manifest.is_symlink():
        return False
    try:
        read_format_json(manifest, BUNDLE_FORMAT, BUNDLE_VERSION, BundleError, "an hm-export bundle")
    except BundleError as exc:
        return exc.field == "format_version"  # another version of the format is still a bundle
    return True


_SECTIONS = {"model": dict, "slot": dict, "bank": dict, "tokenizer": dict, "router": dict, "targets": dict}


def check_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Structure and ranges of the manifest fields every reader relies on; raises BundleError naming
    ``manifest.json`` and the field.  The model config, slot contract and bank are checked in depth by
    the loader against each other (``ModelConfig``, ``SlotContract``, the bank index)."""
    fields = Fields(Path(root) / MANIFEST, BundleError)
    missing = [key for key in _SECTIONS if key not in manifest]
    if missing:
        raise BundleError(f"{fields.path}: malformed manifest, missing {missing}", field=missing[0])
    for key, kind in _SECTIONS.items():
        fields.get(manifest, key, key, kind)
    files = fields.get(manifest, "files", "files", dict)
    if len(files) > MAX_FILES:
        raise fields.refuse("files", f"{len(files)} entries, more than {MAX_FILES}")
    for relative, record in files.items():
        relative_parts(relative, "a listed file", fields.path, BundleError, f"files[{relative!r}]")
        where = f"files[{relative!r}]"
        fields.get(record, "bytes", f"{where}.bytes", int, 0, MAX_FILE_BYTES)
        digest = fields.get(record, "sha256", f"{where}.sha256", str)
        if not _SHA256.match(digest):
            raise fields.refuse(f"{where}.sha256", "not 64 lowercase hex digits")

    def listed(container: Any, key: str, field: str) -> None:
        relative = fields.get(container, key, field, str)
        relative_parts(relative, field, fields.path, BundleError, field)
        if relative not in files:
            raise fields.refuse(field, f"{relative!r} is not listed in 'files' (no size or sha256 to check it by)")

    listed(manifest["tokenizer"], "file", "tokenizer.file")
    listed(manifest["router"], "file", "router.file")
    fields.get(manifest["router"], "dim", "router.dim", int, 1, 1 << 16)
    _check_router_program(fields, files, manifest["router"], listed)
    bank = manifest["bank"]
    relative_parts(fields.get(bank, "dir", "bank.dir", str), "bank directory", fields.path, BundleError, "bank.dir")
    fields.get(bank, "schema_hash", "bank.schema_hash", str)
    if f"{bank['dir']}/index.json" not in files:
        raise fields.refuse("bank.dir", f"{bank['dir']}/index.json is not listed in 'files'")
    if not manifest["targets"]:
        raise fields.refuse("targets", "no targets")
    for name in manifest["targets"]:
        programs = [(f"targets.{name}", fields.get(manifest["targets"], name, f"targets.{name}", dict))]
        decode = fields.get(programs[0][1], "decode", f"targets.{name}.decode", dict, optional=True)
        programs += [(f"targets.{name}.decode", decode)] if decode is not None else []
        for field, program in programs:
            roles = fields.get(program, "files", f"{field}.files", dict)
            if not roles:
                raise fields.refuse(f"{field}.files", "no program files")
            for role in roles:
                _listed_program(fields, files, roles, role, f"{field}.files.{role}")
    checks = fields.get(manifest, "checks", "checks", dict, optional=True)
    if checks is not None:
        listed(checks, "file", "checks.file")
        listed(checks, "expected", "checks.expected")
        fields.get(checks, "count", "checks.count", int, 0, 1 << 16)


def _check_router_program(
    fields: Fields, files: dict[str, Any], router: dict[str, Any], listed: Callable[[Any, str, str], None]
) -> None:
    """``router.tokenizer``, ``router.program_io`` and ``router.programs`` (hm_export.router_program): all three or
    none (a bundle exported with ``--no-router-program``); the tokenizer and every program file listed."""
    parts = {key: router.get(key) for key in ("tokenizer", "program_io", "programs")}
    if all(value is None for value in parts.values()):
        return
    tokenizer = fields.get(router, "tokenizer", "router.tokenizer", dict)
    io = fields.get(router, "program_io", "router.program_io", dict)
    programs = fields.get(router, "programs", "router.programs", dict)
    listed(tokenizer, "file", "router.tokenizer.file")
    fields.get(tokenizer, "max_tokens", "router.tokenizer.max_tokens", int, 1, MAX_ROUTER_TOKENS)
    inputs = fields.get(io, "inputs", "router.program_io.inputs", list)
    first = fields.get(inputs, 0, "router.program_io.inputs[0]", dict)
    lo, hi = fields.ints(first, "tokens", "router.program_io.inputs[0].tokens", 1, MAX_ROUTER_TOKENS, length=2)
    if lo > hi:
        raise fields.refuse("router.program_io.inputs[0].tokens", f"[{lo}, {hi}] is not a range")
    fields.get(io, "outputs", "router.program_io.outputs", list)
    for name in programs:
        field = f"router.programs.{name}"
        entry = fields.get(programs, name, field, dict)
        runtime = fields.get(entry, "runtime", f"{field}.runtime", str)
        if runtime not in ROUTER_RUNTIMES:
            raise fields.refuse(f"{field}.runtime", f"{runtime!r} is not one of {list(ROUTER_RUNTIMES)}")
        roles = fields.get(entry, "files", f"{field}.files", dict)
        if not roles:
            raise fields.refuse(f"{field}.files", "no program files")
        for role in roles:
            _listed_program(fields, files, roles, role, f"{field}.files.{role}")


def _listed_program(fields: Fields, files: dict[str, Any], container: dict[str, Any], key: str, field: str) -> None:
    """A program path: a listed file, or a directory (``.mlpackage``) whose files are all listed under it."""
    relative = fields.get(container, key, field, str)
    relative_parts(relative, field, fields.path, BundleError, field)
    if relative not in files and not any(name.startswith(relative + "/") for name in files):
        raise fields.refuse(field, f"{relative!r} is not listed in 'files' (no size or sha256 to check it by)")


def file_problems(
    root: Path, manifest: dict[str, Any], hashes: bool = True, only: Collection[str] | None = None
) -> Iterator[str]:
    """One message per listed file (``only``: those of them) that is missing, not a regular file inside the
    bundle, or differs in size (or, with ``hashes``, sha256) from the manifest, naming the file."""
    for relative, record in manifest["files"].items():
        if only is not None and relative not in only:
            continue
        try:
            path = safe_relative(root, relative, "a listed file")
        except BundleError as exc:
            yield str(exc)
            continue
        size = path.lstat().st_size
        if size != record["bytes"]:
            yield f"{path}: {size} bytes, manifest says {record['bytes']} (truncated or replaced)"
        elif hashes and _sha256_capped(path, record["bytes"]) != record["sha256"]:
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
    root: Path, manifest: dict[str, Any], hashes: bool = True, only: Collection[str] | None = None
) -> None:
    """Check every listed file's (``only``: those listed files') size and, with ``hashes``, sha256; raise naming
    the first that differs.  Trusted storage (``hashes=False``) still checks that each is a regular file of the
    declared size."""
    for problem in file_problems(root, manifest, hashes, only):
        raise BundleError(problem)


def listed_size(manifest: dict[str, Any], relative: str) -> int:
    """The size the manifest declares for a listed file (reads of it are capped by it)."""
    return int(manifest["files"][relative]["bytes"])


def read_listed(root: Path, manifest: dict[str, Any], relative: str, what: str, limit: int) -> bytes:
    """The bytes of a listed file: inside the bundle, regular, of exactly its declared size (at most ``limit``)."""
    path = safe_relative(root, relative, what)
    return read_capped(path, what, limit, BundleError, exact=listed_size(manifest, relative))
