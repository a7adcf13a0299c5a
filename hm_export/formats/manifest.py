"""The bundle manifest (``manifest.json``, docs/bundle-format.md) as typed, versioned dataclasses.

:func:`read` is the one way in: it reads the manifest (a regular file, bounded), checks the seal (and a
signature, given a trusted key) before parsing anything, parses it strictly
(:func:`~hm_export.formats.parse_json`), checks its structure (:func:`validate`: every section the loaders
use is there with the right types, every size and count is in range, every path it names is a listed file
inside the bundle) and returns a :class:`Manifest`.  Readers use its typed fields; ``record`` keeps the
parsed JSON for what only the writer and the summaries look at (``pipeline``, ``versions``, the emitters'
reports).  :func:`write` writes it canonically and seals it.

The sections a target's emitter owns (``targets.<name>``: cache layout, precision, custom ops, ...) are kept
as that emitter's record (:attr:`Program.record`), read by the emitter's own ``open_*`` function.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from hm_export.config import ModelConfig
from hm_export.errors import BundleError
from hm_export.formats import Fields, read_format_json
from hm_export.integrity import canonical_json, check_seal, write_seal
from hm_export.safeio import read_capped, relative_parts

FORMAT = "hm-export-bundle"
VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
MAX_FILE_BYTES = 1 << 44  # 16 TiB: any real program or data file is far below
MAX_FILES = 1 << 20
MAX_ROUTER_TOKENS = 1 << 16  # the router program's token axis (MiniLM: [2, 256]); the C++ runtime's bound
ROUTER_RUNTIMES = ("executorch", "onnxruntime", "coreml")  # hm_export.router_program's emitters
WINDOWS = ("program", "decode")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileRecord:
    """A listed file: its size (which caps every read of it) and sha256."""

    bytes: int
    sha256: str


@dataclass(frozen=True)
class TokenizerRef:
    file: str


@dataclass(frozen=True)
class RouterTokenizer:
    """The tokenizer the router program expects (WordPiece, truncation at ``max_tokens``)."""

    file: str
    max_tokens: int


@dataclass(frozen=True)
class Program:
    """One program of a target or of the router: role -> bundle-relative path, plus its emitter's record."""

    files: dict[str, str]
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        """A field of the emitter's own record (``cache``, ``precision``, ``custom_ops``, ...)."""
        return self.record.get(key, default)


@dataclass(frozen=True)
class RouterProgram(Program):
    runtime: str = "executorch"


@dataclass(frozen=True)
class Router:
    file: str  # router.safetensors: the centroids
    dim: int
    embedder: str = "all-MiniLM-L6-v2"
    tokenizer: RouterTokenizer | None = None  # with program_io and programs, or none of the three
    program_io: dict[str, Any] | None = None
    programs: dict[str, RouterProgram] = field(default_factory=dict)


@dataclass(frozen=True)
class BankRef:
    dir: str
    schema_hash: str  # equals the bank index's own (hm_export.bank.format.schema_hash)
    scheme: str = ""  # the preset the bank was written with
    levels: tuple[str, ...] = ()  # the resolved scheme of each level

    @property
    def index(self) -> str:
        return f"{self.dir}/index.json"


@dataclass(frozen=True)
class ChecksRef:
    """Golden checks: the checks file, the expected-logits file, their count."""

    file: str
    expected: str
    count: int
    new_tokens: int = 0


@dataclass(frozen=True)
class Target(Program):
    """A target: its full-window program (``files``; empty when ``window`` is ``"decode"``), its decode program,
    its own checks when it computes differently from the bundle's."""

    window: str = "program"
    decode: Program | None = None
    checks: ChecksRef | None = None

    @property
    def one_program(self) -> Program:
        """The program that serves the window logits: the decode program when ``window`` is ``"decode"``."""
        return self.decode if self.window == "decode" and self.decode is not None else self


@dataclass(frozen=True)
class Manifest:
    """A checked ``manifest.json`` (format ``hm-export-bundle``, version 1)."""

    format_version: int
    model: Annotated[dict[str, Any], ModelConfig]  # typed by ModelConfig.from_dict
    slot: Annotated[dict[str, Any], "slot-contract.schema.json"]  # typed by SlotContract.from_dict (+ strategy)
    tokenizer: TokenizerRef
    router: Router
    bank: BankRef
    targets: dict[str, Target]
    files: dict[str, FileRecord]
    checks: ChecksRef | None = None
    created: str | None = None
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def listed_size(self, relative: str) -> int:
        """The size the manifest declares for a listed file (reads of it are capped by it)."""
        return self.files[relative].bytes

    @classmethod
    def parse(cls, root: Path, record: dict[str, Any]) -> Manifest:
        """The typed view of the manifest ``record`` of the bundle ``root``, validated (:func:`validate`)."""
        validate(root, record)
        return cls.from_record(record)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Manifest:
        """The typed view of a manifest record that :func:`validate` accepted."""
        router = record["router"]
        return cls(
            format_version=record["format_version"],
            model=record["model"],
            slot=record["slot"],
            tokenizer=TokenizerRef(record["tokenizer"]["file"]),
            router=Router(
                file=router["file"],
                dim=router["dim"],
                embedder=router.get("embedder", "all-MiniLM-L6-v2"),
                tokenizer=RouterTokenizer(router["tokenizer"]["file"], router["tokenizer"]["max_tokens"])
                if "tokenizer" in router
                else None,
                program_io=router.get("program_io"),
                programs={
                    name: RouterProgram(entry["files"], entry, entry["runtime"])
                    for name, entry in router.get("programs", {}).items()
                },
            ),
            bank=BankRef(
                record["bank"]["dir"],
                record["bank"]["schema_hash"],
                record["bank"].get("scheme", ""),
                tuple(record["bank"].get("levels", ())),
            ),
            targets={name: _target(entry) for name, entry in record["targets"].items()},
            files={name: FileRecord(r["bytes"], r["sha256"]) for name, r in record["files"].items()},
            checks=_checks(record.get("checks")),
            created=record.get("created"),
            record=record,
        )


def _checks(entry: dict[str, Any] | None) -> ChecksRef | None:
    if entry is None:
        return None
    return ChecksRef(entry["file"], entry["expected"], entry["count"], entry.get("new_tokens", 0))


def _target(entry: dict[str, Any]) -> Target:
    decode = entry.get("decode")
    return Target(
        entry["files"],
        entry,
        entry.get("window") or "program",
        Program(decode["files"], decode) if decode is not None else None,
        _checks(entry.get("checks")),
    )


# ---- read / write ---------------------------------------------------------------------------------------------


def read(root: Path, verify_key: bytes | None = None) -> Manifest:
    """The checked manifest of the bundle ``root`` (see the module docstring); ``verify_key``: a trusted raw
    Ed25519 public key the bundle must be signed with."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise BundleError(f"{path}: missing (not an hm-export bundle)", path=path)
    data = read_capped(path, "bundle manifest", MAX_MANIFEST_BYTES, BundleError)
    check_seal(root, data, verify_key)
    return Manifest.parse(root, read_format_json(path, FORMAT, VERSION, BundleError, "an hm-export bundle", data=data))


def write(root: Path, record: dict[str, Any] | Manifest, sign_key: Path | None = None) -> None:
    """Write ``manifest.json`` canonically and seal it in ``bundle.sig`` (signed with ``sign_key`` if given).
    Bundles are written inside :func:`hm_export.atomic.atomic_directory`, which makes the pair appear at once."""
    data = canonical_json(record.record if isinstance(record, Manifest) else record)
    (Path(root) / MANIFEST).write_bytes(data)
    write_seal(Path(root), data, sign_key)


def is_bundle(path: Path) -> bool:
    """Whether ``path`` is a directory holding an hm-export bundle manifest (what ``--overwrite`` may replace)."""
    manifest = Path(path) / MANIFEST
    if not Path(path).is_dir() or Path(path).is_symlink() or not manifest.is_file() or manifest.is_symlink():
        return False
    try:
        read_format_json(manifest, FORMAT, VERSION, BundleError, "an hm-export bundle")
    except BundleError as exc:
        return exc.field == "format_version"  # another version of the format is still a bundle
    return True


# ---- validate ----------------------------------------------------------------------------------------------

_SECTIONS = {"model": dict, "slot": dict, "bank": dict, "tokenizer": dict, "router": dict, "targets": dict}


def validate(root: Path, manifest: dict[str, Any]) -> None:
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
    fields.get(manifest["router"], "embedder", "router.embedder", str, optional=True)
    _check_router_program(fields, files, manifest["router"], listed)
    bank = manifest["bank"]
    relative_parts(fields.get(bank, "dir", "bank.dir", str), "bank directory", fields.path, BundleError, "bank.dir")
    fields.get(bank, "schema_hash", "bank.schema_hash", str)
    fields.get(bank, "scheme", "bank.scheme", str, optional=True)
    levels = fields.get(bank, "levels", "bank.levels", list, optional=True) or []
    for level in range(len(levels)):
        fields.get(levels, level, f"bank.levels[{level}]", str)
    if f"{bank['dir']}/index.json" not in files:
        raise fields.refuse("bank.dir", f"{bank['dir']}/index.json is not listed in 'files'")
    if not manifest["targets"]:
        raise fields.refuse("targets", "no targets")
    for name in manifest["targets"]:
        entry = fields.get(manifest["targets"], name, f"targets.{name}", dict)
        decode = fields.get(entry, "decode", f"targets.{name}.decode", dict, optional=True)
        window = fields.get(entry, "window", f"targets.{name}.window", str, optional=True)
        if window not in (None, *WINDOWS) or (window == "decode" and decode is None):
            raise fields.refuse(f"targets.{name}.window", f"{window!r}: expected 'decode' (with a decode program)")
        programs = [(f"targets.{name}", entry)] + ([(f"targets.{name}.decode", decode)] if decode is not None else [])
        for field_name, program in programs:
            roles = fields.get(program, "files", f"{field_name}.files", dict)
            if not roles and not (field_name == f"targets.{name}" and window == "decode"):  # one program: decode
                raise fields.refuse(f"{field_name}.files", "no program files")
            for role in roles:
                _listed_program(fields, files, roles, role, f"{field_name}.files.{role}")
            fields.get(program, "prefill_method", f"{field_name}.prefill_method", str, optional=True)
        _check_checks(fields, entry, f"targets.{name}.checks", listed)
    _check_checks(fields, manifest, "checks", listed)
    fields.get(manifest, "created", "created", str, optional=True)


def _check_checks(fields: Fields, container: dict[str, Any], field_name: str, listed: Callable) -> None:
    checks = fields.get(container, "checks", field_name, dict, optional=True)
    if checks is not None:
        listed(checks, "file", f"{field_name}.file")
        listed(checks, "expected", f"{field_name}.expected")
        fields.get(checks, "count", f"{field_name}.count", int, 0, 1 << 16)
        fields.get(checks, "new_tokens", f"{field_name}.new_tokens", int, 0, 1 << 16, optional=True)


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
        field_name = f"router.programs.{name}"
        entry = fields.get(programs, name, field_name, dict)
        runtime = fields.get(entry, "runtime", f"{field_name}.runtime", str)
        if runtime not in ROUTER_RUNTIMES:
            raise fields.refuse(f"{field_name}.runtime", f"{runtime!r} is not one of {list(ROUTER_RUNTIMES)}")
        roles = fields.get(entry, "files", f"{field_name}.files", dict)
        if not roles:
            raise fields.refuse(f"{field_name}.files", "no program files")
        for role in roles:
            _listed_program(fields, files, roles, role, f"{field_name}.files.{role}")


def _listed_program(fields: Fields, files: dict[str, Any], container: dict[str, Any], key: str, field: str) -> None:
    """A program path: a listed file, or a directory (``.mlpackage``) whose files are all listed under it."""
    relative = fields.get(container, key, field, str)
    relative_parts(relative, field, fields.path, BundleError, field)
    if relative not in files and not any(name.startswith(relative + "/") for name in files):
        raise fields.refuse(field, f"{relative!r} is not listed in 'files' (no size or sha256 to check it by)")
