"""Hostile inputs: seeded mutations of a bundle and a harness that replays them against every reader.

Used by ``tests/test_hostile_inputs.py`` (a few hundred cases in the suite) and ``scripts/hostile_inputs.py``
(a thousand, with the CLI and the C++ runner; figures in docs/hostile-inputs.md).

A :class:`Mutation` changes one thing in a copy of a pristine bundle: a JSON field of the manifest, bank index,
checks, tokenizer or router tokenizer set to a hostile value (wrong type, 0, -1, 2^31, 2^63, huge or deeply nested JSON,
duplicate keys, path escapes), bytes flipped or cut in any file, or a file or folder replaced by a symlink
out of the bundle, a FIFO or a directory.  A *consistent* mutation then recomputes everything a careless
writer or an attacker would: block CRC-32s in the index, sizes and sha256s in the manifest, and the
manifest's seal -- everything but a signature, which needs the private key.

:class:`Harness` replays a mutation in a worker process (a crash or a hang there is recorded, not suffered)
and reports, per reader, whether it ran, refused with an :class:`~hm_export.errors.HmExportError` naming a
file of the bundle, or failed another way (a foreign exception, a crash, a hang); an inotify watch on the
directory the escapes point to counts every open of a file outside the bundle.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import struct
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

AREAS = ("manifest", "seal", "index", "blocks", "checks", "tokenizer", "router", "programs", "filesystem")
HOSTILE_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**31 - 1,
    -(2**31),
    2**53 + 1,
    2**63 - 1,
    -(2**63),
    1.5,
    1e308,
    "",
    "x",
    "é",
    "\u0000",
    "A" * 100_000,
    [],
    {},
    [1, 2, 3],
    {"a": 1},
    [[[[[]]]]],
)
RAW_VALUES = ("[" * 100_000 + "]" * 100_000, "9" * 5000, "1e999", "-1e999", "NaN", "Infinity")
ESCAPES = (
    "../outside/secret",
    "{outside}/secret",
    "../outside/fifo",
    "{outside}/fifo",
    "/dev/zero",
    "/proc/self/mem",
    "./tokenizer.json",
    "bank//index.json",
    "checks/../../outside/secret",
    "bank\\..\\..\\outside",
    "",
)
TOKENS = "__HOSTILE__"
BLOCK_FILES = (".hmb", ".hmp")
PROGRAM_FILES = (".pte", ".ptd", ".onnx", ".data")


@dataclass(frozen=True)
class Mutation:
    area: str
    description: str
    consistent: bool
    edit: Callable[[Path, Path], None]  # (bundle copy, outside directory) -> None


# ---- consistency: what a tamperer recomputes ---------------------------------------------------------------


def _manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_text())


def reseal(root: Path, manifest: dict[str, Any] | None = None) -> None:
    """Rewrite the manifest (when given) and its seal: the digest recomputed, no signature."""
    from hm_export.bundle import write_manifest
    from hm_export.integrity import write_seal

    if manifest is not None:
        write_manifest(root, manifest)
    else:
        write_seal(root, (root / "manifest.json").read_bytes())


def rerecord(root: Path, *relatives: str) -> None:
    """Record the current size and sha256 of files in the manifest and reseal it (files gone are dropped)."""
    manifest = _manifest(root)
    for relative in relatives:
        path = root / relative
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            manifest["files"][relative] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    reseal(root, manifest)


def recrc(root: Path, index_file: str = "bank/index.json") -> None:
    """Recompute every block's payload CRC-32 and sha256 in the bank index, then record the index and reseal."""
    import zlib

    index_path = root / index_file
    index = json.loads(index_path.read_text())
    for block in index.get("blocks", []):
        try:
            data = (index_path.parent / block["file"]).read_bytes()
            payload = data[block["offset"] : block["offset"] + block["length"]]
            block["crc32"], block["sha256"] = zlib.crc32(payload), hashlib.sha256(payload).hexdigest()
        except (OSError, KeyError, TypeError):
            continue
    index_path.write_text(json.dumps(index, indent=2))
    rerecord(root, index_file)


# ---- JSON edits ------------------------------------------------------------------------------------------


def _json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _json_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value[:8]):  # the first items of long lists (block entries, token ids)
            out += _json_paths(child, (*prefix, index))
    return out


def _parent(doc: Any, path: tuple) -> tuple[Any, Any]:
    for key in path[:-1]:
        doc = doc[key]
    return doc, path[-1]


def _json_edit(rng: random.Random, doc: Any) -> tuple[str, str | None]:
    """Change ``doc`` in place at a random field; returns (description, raw text to splice for TOKENS)."""
    paths = [p for p in _json_paths(doc) if p]
    path = rng.choice(paths)
    parent, key = _parent(doc, path)
    where = ".".join(map(str, path))
    choice = rng.random()
    value = parent[key]
    if choice < 0.12 and isinstance(parent, dict):
        del parent[key]
        return f"delete {where}", None
    if choice < 0.22:
        raw = rng.choice(RAW_VALUES)
        parent[key] = TOKENS
        return f"{where} = {raw[:12]}... (raw)", raw
    if choice < 0.3 and isinstance(parent, dict):
        parent["__dup__"] = TOKENS
        return f"duplicate key {key!r} next to {where}", f"{json.dumps(key)}: {json.dumps(value)}"
    if choice < 0.55 and isinstance(value, int | float) and not isinstance(value, bool):
        new = rng.choice(
            [value + 1, value - 1, value * 2, -value, 0, value + 2**32, int(value) ^ (1 << rng.randrange(62))]
        )
        parent[key] = new
        return f"{where} = {new!r} (was {value!r})", None
    if choice < 0.62 and isinstance(value, list) and value:
        op = rng.choice(["truncate", "duplicate", "swap", "empty"])
        if op == "truncate":
            del value[rng.randrange(len(value)) :]
        elif op == "duplicate":
            value.append(value[0])
        elif op == "swap" and len(value) > 1:
            i, j = rng.sample(range(len(value)), 2)
            value[i], value[j] = value[j], value[i]
        else:
            value.clear()
        return f"{op} list {where}", None
    new = rng.choice(HOSTILE_VALUES)
    parent[key] = new
    return f"{where} = {str(new)[:24]!r}", None


def _dump(doc: Any, raw: str | None) -> str:
    text = json.dumps(doc, indent=2)
    if raw is None:
        return text
    if f'"__dup__": "{TOKENS}"' in text:
        return text.replace(f'"__dup__": "{TOKENS}"', raw)
    return text.replace(f'"{TOKENS}"', raw)


def _json_file_mutation(area: str, bundle: Path, relative: str, rng: random.Random, consistent: bool) -> Mutation:
    seed = rng.randrange(2**32)
    description, _ = _json_edit(random.Random(seed), json.loads((bundle / relative).read_text()))

    def edit(root: Path, outside: Path) -> None:
        doc = json.loads((root / relative).read_text())
        _, raw = _json_edit(random.Random(seed), doc)  # the same edit: same seed, same document
        (root / relative).write_text(_dump(doc, raw))
        if consistent and relative == "manifest.json":
            reseal(root)
        elif consistent:
            rerecord(root, relative)

    return Mutation(area, f"{relative}: {description}", consistent, edit)


# ---- byte edits --------------------------------------------------------------------------------------------


def _bytes_mutation(area: str, relative: str, rng: random.Random, consistent: bool, region: str = "any") -> Mutation:
    seed = rng.randrange(2**32)
    op = rng.choice(["flip", "flip", "flip", "truncate", "append", "empty", "zero"])

    def edit(root: Path, outside: Path) -> None:
        local = random.Random(seed)
        path = root / relative
        data = bytearray(path.read_bytes())
        if op == "flip" and data:
            lo, hi = (4096, len(data)) if region == "payload" and len(data) > 4096 else (0, len(data))
            if region == "header":
                lo, hi = 0, min(64, len(data))
            for _ in range(local.randint(1, 4)):
                position = local.randrange(lo, hi)
                data[position] ^= 1 << local.randrange(8)
        elif op == "truncate":
            del data[local.randrange(len(data) + 1) :]
        elif op == "append":
            data += bytes(local.randrange(256) for _ in range(local.randint(1, 5000)))
        elif op == "empty":
            data.clear()
        elif op == "zero" and data:
            start = local.randrange(len(data))
            data[start : start + local.randint(1, 4096)] = bytes(min(len(data) - start, 4096))
        path.write_bytes(bytes(data))
        if consistent and area == "blocks":
            recrc(root)
        elif consistent:
            rerecord(root, relative)

    return Mutation(area, f"{relative}: {op} bytes ({region}, seed {seed})", consistent, edit)


# ---- filesystem edits and path escapes ---------------------------------------------------------------------


def _outside_copy(root: Path, relative: str, outside: Path) -> Path:
    source = root / relative
    target = outside / ("copy-" + relative.replace("/", "_"))
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
    return target


def _filesystem_mutation(relative: str, kind: str) -> Mutation:
    def edit(root: Path, outside: Path) -> None:
        path = root / relative
        if kind == "symlink-out":  # an identical copy outside: sizes and sha256 all match
            target = _outside_copy(root, relative, outside)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            path.symlink_to(target)
        elif kind == "symlink-in":  # to another file of the bundle
            path.unlink()
            path.symlink_to(os.path.relpath(root / "tokenizer.json", path.parent))
        elif kind == "fifo":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.mkfifo(path)
        elif kind == "directory":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            path.mkdir()
        elif kind == "missing":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif kind == "dev-zero":
            path.unlink()
            path.symlink_to("/dev/zero")

    return Mutation("filesystem", f"{relative}: {kind}", kind in ("symlink-out",), edit)


def _escape_mutation(area: str, relative: str, json_path: tuple, escape: str, consistent: bool) -> Mutation:
    def edit(root: Path, outside: Path) -> None:
        doc = json.loads((root / relative).read_text())
        parent, key = _parent(doc, json_path)
        value = escape.replace("{outside}", str(outside))
        if key == "__key__":  # rename a files entry
            old = next(iter(parent))
            parent[value] = parent.pop(old)
        else:
            parent[key] = value
        if consistent and relative == "manifest.json":
            secret = outside / "secret"
            doc["files"][value] = {
                "bytes": secret.stat().st_size,
                "sha256": hashlib.sha256(secret.read_bytes()).hexdigest(),
            }
        (root / relative).write_text(json.dumps(doc, indent=2))
        if relative == "manifest.json":
            if consistent:
                reseal(root)
        elif consistent:
            rerecord(root, relative)

    where = ".".join(map(str, json_path))
    return Mutation(area, f"{relative}: {where} -> {escape!r}", consistent, edit)


def _forged_block(rng: random.Random, block: str) -> Mutation:
    """A payload edit that keeps the block's CRC-32 (4 bytes solved for): no index or manifest change at all.
    Consistent: an unkeyed reader reads it (the trust model: whoever edits a block can rewrite the index and seal
    too); a bundle opened with its signer's key refuses it (the per-block sha256)."""
    seed = rng.randrange(2**32)

    def edit(root: Path, outside: Path) -> None:
        import zlib

        local = random.Random(seed)
        path = root / block
        data = bytearray(path.read_bytes())
        payload = data[4096:]
        want = zlib.crc32(payload)
        position = local.randrange(0, len(payload) - 8)
        payload[position] ^= 0xFF
        payload[position + 4 : position + 8] = crc_patch(bytes(payload), position + 4, want)
        data[4096:] = payload
        path.write_bytes(bytes(data))

    return Mutation("blocks", f"{block}: payload edit keeping its CRC-32 (forgery, seed {seed})", True, edit)


def crc_patch(data: bytes, at: int, want: int) -> bytes:
    """The 4 bytes to put at ``at`` so that crc32(data) == want: CRC-32 is affine in the data, so flipping bit
    ``i`` of those bytes xors a fixed column into the CRC; solve for the columns that give ``want`` over GF(2)."""
    import zlib

    base = bytearray(data)
    base[at : at + 4] = b"\0\0\0\0"
    start = zlib.crc32(bytes(base))
    basis: dict[int, tuple[int, int]] = {}  # pivot (highest bit) -> (column combination, bits that make it)
    for bit in range(32):
        probe = bytearray(base)
        probe[at + bit // 8] ^= 1 << (bit % 8)
        vector, combo = zlib.crc32(bytes(probe)) ^ start, 1 << bit
        for pivot in range(31, -1, -1):
            if vector >> pivot & 1:
                if pivot not in basis:
                    basis[pivot] = (vector, combo)
                    break
                vector, combo = vector ^ basis[pivot][0], combo ^ basis[pivot][1]
    target, solution = start ^ want, 0
    for pivot in range(31, -1, -1):
        if target >> pivot & 1:
            target, solution = target ^ basis[pivot][0], solution ^ basis[pivot][1]
    return struct.pack("<I", solution)


# ---- the mutation list ---------------------------------------------------------------------------------------


def _bundle_files(bundle: Path) -> dict[str, list[str]]:
    manifest = _manifest(bundle)
    files = sorted(manifest["files"])
    blocks = sorted(p.relative_to(bundle).as_posix() for p in (bundle / "bank").rglob("*") if p.suffix in BLOCK_FILES)
    programs = [f for f in files if f.endswith(PROGRAM_FILES)]
    router = manifest["router"]
    # The router area: the centroids, and the router program's tokenizer and program files (hm_export.router_program).
    roots = [router["tokenizer"]["file"]] if "tokenizer" in router else []
    roots += [f for entry in router.get("programs", {}).values() for f in entry["files"].values()]
    router_files = [router["file"], *(f for f in files if any(f == r or f.startswith(f"{r}/") for r in roots))]
    return {
        "files": files,
        "blocks": blocks,
        "programs": programs,
        "router": router_files,
        "targets": sorted(manifest["targets"]),
    }


def mutations(bundle: Path, count: int, seed: int = 0, areas: tuple[str, ...] = AREAS) -> list[Mutation]:
    """``count`` seeded mutations of ``bundle`` spread over ``areas`` (about half of them consistent)."""
    rng = random.Random(seed)
    info = _bundle_files(bundle)
    manifest = _manifest(bundle)
    escape_fields = [("tokenizer", "file"), ("router", "file"), ("bank", "dir"), ("files", "__key__")]
    escape_fields += [("checks", "file"), ("checks", "expected")] if "checks" in manifest else []
    for target in info["targets"]:
        entry = manifest["targets"][target]
        if entry["files"]:
            escape_fields.append(("targets", target, "files", next(iter(entry["files"]))))
        elif "decode" in entry:  # the target's one program is its decode program
            escape_fields.append(("targets", target, "decode", "files", next(iter(entry["decode"]["files"]))))
    router_escapes = [("router", "tokenizer", "file")] if "tokenizer" in manifest["router"] else []
    for target, entry in manifest["router"].get("programs", {}).items():
        router_escapes.append(("router", "programs", target, "files", next(iter(entry["files"]))))
    escape_fields += router_escapes
    out: list[Mutation] = []
    while len(out) < count:
        area = areas[len(out) % len(areas)]
        consistent = rng.random() < 0.5
        if area == "manifest":
            if rng.random() < 0.25:
                out.append(
                    _escape_mutation(area, "manifest.json", rng.choice(escape_fields), rng.choice(ESCAPES), consistent)
                )
            elif rng.random() < 0.2:
                out.append(_bytes_mutation(area, "manifest.json", rng, False))
            else:
                out.append(_json_file_mutation(area, bundle, "manifest.json", rng, consistent))
        elif area == "seal":
            if rng.random() < 0.5:
                out.append(_json_file_mutation(area, bundle, "bundle.sig", rng, False))
            else:
                out.append(_bytes_mutation(area, "bundle.sig", rng, False))
        elif area == "index":
            if rng.random() < 0.2:
                out.append(
                    _escape_mutation(
                        area, "bank/index.json", ("blocks", rng.randrange(3), "file"), rng.choice(ESCAPES), consistent
                    )
                )
            else:
                out.append(_json_file_mutation(area, bundle, "bank/index.json", rng, consistent))
        elif area == "blocks":
            block = rng.choice(info["blocks"])
            roll = rng.random()
            if roll < 0.1:
                out.append(_forged_block(rng, block))
            else:
                out.append(_bytes_mutation(area, block, rng, consistent, rng.choice(["header", "payload", "any"])))
        elif area in ("checks", "tokenizer", "router", "programs"):
            candidates = {
                "checks": [f for f in info["files"] if f.startswith("checks/")],
                "tokenizer": ["tokenizer.json"],
                "router": info["router"],
                "programs": info["programs"],
            }[area]
            if not candidates:
                continue
            if area == "router" and router_escapes and rng.random() < 0.2:
                escape = _escape_mutation(
                    area, "manifest.json", rng.choice(router_escapes), rng.choice(ESCAPES), consistent
                )
                out.append(escape)
                continue
            relative = rng.choice(candidates)
            if relative.endswith(".json") and rng.random() < 0.7:
                out.append(_json_file_mutation(area, bundle, relative, rng, consistent))
            else:
                out.append(_bytes_mutation(area, relative, rng, consistent))
        else:
            kind = rng.choice(
                ["symlink-out", "symlink-out", "fifo", "fifo", "directory", "missing", "dev-zero", "symlink-in"]
            )
            pool = [*info["files"], *info["blocks"], "manifest.json", "bundle.sig"]
            if kind in ("symlink-out", "fifo", "missing"):
                pool += ["bank", "bank/level1", "checks", *info["targets"]]
            relative = rng.choice(pool)
            if kind in ("directory", "dev-zero", "symlink-in") and (bundle / relative).is_dir():
                continue
            out.append(_filesystem_mutation(relative, kind))
    return out


# ---- watching for reads outside the bundle ---------------------------------------------------------------


class OutsideWatch:
    """inotify on a directory tree (Linux): counts opens and reads of anything under it."""

    IN_ACCESS, IN_OPEN, IN_NONBLOCK = 0x1, 0x20, 0o4000

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(self.IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")

    def watch(self, root: Path) -> None:
        for directory in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
            self._libc.inotify_add_watch(self.fd, str(directory).encode(), self.IN_ACCESS | self.IN_OPEN)

    def events(self) -> int:
        count = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return count
            offset = 0
            while offset < len(data):
                _, _, _, length = struct.unpack_from("iIII", data, offset)
                offset += 16 + length
                count += 1

    def close(self) -> None:
        os.close(self.fd)


# ---- the worker: readers run where a crash cannot take the harness down --------------------------------------


def _classify(exc: BaseException, bundle: str) -> dict[str, Any]:
    from hm_export.errors import HmExportError

    message = str(exc)
    if isinstance(exc, HmExportError):
        return {
            "status": "refused",
            "error": type(exc).__name__,
            "message": message[:500],
            "names_file": bundle in message,
        }
    return {
        "status": "foreign",
        "error": type(exc).__name__,
        "message": message[:500],
        "traceback": traceback.format_exc()[-3000:],
    }


class _FixedEmbedder:
    """Deterministic unit vectors (MiniLM's width): routing without loading MiniLM in every case."""

    def embed(self, texts: list[str]) -> Any:
        import numpy as np

        rng = np.random.default_rng(len(texts))
        vectors = rng.standard_normal((len(texts), 384)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def probe_api(bundle: Path, targets: tuple[str, ...], verify_key: bytes | None = None) -> dict[str, Any]:
    """The Python API on ``bundle``: open, fill the slot with every leaf's path (every block is read), route,
    run each target's window and decode programs."""
    from hm_export.bench import leaf_path
    from hm_export.runtime_stubs.generate import Generator, Sampling
    from hm_export.runtime_stubs.loader import BundleLoader

    try:
        loader = BundleLoader(bundle, target=None, embedder=_FixedEmbedder(), verify_key=verify_key)
        memory = loader.config.memory
        for leaf in range(memory.nodes_at(memory.num_levels - 1)):
            loader.set_path(leaf_path(memory, leaf))
        loader.route_and_set("a context")
        for target in targets:
            loader.use_target(target)
            loader.logits([1, 2, 3])
            Generator(loader, target).generate([1, 2, 3], Sampling(max_new_tokens=3))
        return {"status": "ok"}
    except Exception as exc:
        return _classify(exc, str(bundle))


def probe_checks(bundle: Path, verify_key: bytes | None = None) -> dict[str, Any]:
    """``run_checks`` (what ``hm-export check`` prints): damage must be fail rows, not exceptions."""
    from hm_export.checks import run_checks

    try:
        report = run_checks(bundle, embedder=_FixedEmbedder(), verify_key=verify_key)
        numerics = [r for r in report.results if r.program in ("window", "decode")]
        return {
            "status": "ok",
            "numerics_pass": bool(numerics) and all(r.status == "pass" for r in numerics),
            "fails": sum(r.status == "fail" for r in report.results),
        }
    except Exception as exc:
        return _classify(exc, str(bundle))


ROUTER_TEXTS = ("Parse an email message", "naïve café 日本語 🎉", "")


def probe_router(bundle: Path, targets: tuple[str, ...], verify_key: bytes | None = None) -> dict[str, Any]:
    """The router programs (:func:`~hm_export.router_program.open_router_program`): open each target's with its
    tokenizer, embed a few texts and route them through the bundle's tree."""
    from hm_export.router_program import open_router_program
    from hm_export.runtime_stubs.loader import read_tree

    try:
        for target in targets:
            embeddings = open_router_program(bundle, target, verify_key=verify_key).embed(ROUTER_TEXTS)
            read_tree(bundle).route(embeddings)
        return {"status": "ok"}
    except Exception as exc:
        return _classify(exc, str(bundle))


def probe_cli(bundle: Path, args: tuple[str, ...] = ()) -> dict[str, Any]:
    """``hm-export check BUNDLE`` through click: exit code, and no traceback in its output."""
    from click.testing import CliRunner

    from hm_export.cli import main

    result = CliRunner().invoke(main, ["check", str(bundle), *args])
    output = result.output
    foreign = (result.exception is not None and not isinstance(result.exception, SystemExit)) or (
        "internal error" in output  # the CLI's last resort for an exception that is not an HmExportError
    )
    return {
        "status": "foreign" if foreign else "ok",
        "exit_code": result.exit_code,
        "traceback": "Traceback" in output or foreign,
        "error_lines": output.count("error:"),
        "names_file": result.exit_code != 2 or str(bundle) in output,
        "message": (output.strip().splitlines() or [""])[-1][:300],
    }


def _worker(connection: Any) -> None:
    import hm_export.runtime_stubs.loader as loader_module
    from hm_export.console import library_output

    with library_output():
        embedder = loader_module.MiniLMEmbedder()  # loaded once for every `hm-export check` this worker runs
        loader_module.MiniLMEmbedder = lambda: embedder  # type: ignore[assignment]
        while True:
            request = connection.recv()
            if request is None:
                return
            probe, args = request
            result = {"api": probe_api, "checks": probe_checks, "cli": probe_cli, "router": probe_router}[probe](*args)
            connection.send(result)


class Harness:
    """Replays probes in a worker process; a worker that crashes or hangs is replaced and the case recorded."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._context = multiprocessing.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self._connection, child = self._context.Pipe()
        self._process = self._context.Process(target=_worker, args=(child,), daemon=True)
        self._process.start()

    def run(self, probe: str, *args: Any) -> dict[str, Any]:
        self._connection.send((probe, args))
        if not self._connection.poll(self.timeout):
            self._process.kill()
            self._process.join()
            self._start()
            return {"status": "hang"}
        try:
            return self._connection.recv()
        except (EOFError, ConnectionResetError):
            self._process.join()
            code = self._process.exitcode
            self._start()
            return {"status": "crash", "signal": -code if code and code < 0 else None, "exit_code": code}

    def close(self) -> None:
        try:
            self._connection.send(None)
        except (BrokenPipeError, OSError):
            pass
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def probe_native(
    runner: Path, bundle: Path, timeout: float = 60.0, verify_key: Path | None = None, route_on_device: bool = False
) -> dict[str, Any]:
    """``hm_runner BUNDLE --checks --json`` (``route_on_device``: the checks routed from their text by the
    bundle's router tokenizer and program): exit 0/1 (ran), 2 (refused, naming a file), or a crash / hang."""
    command = [
        str(runner),
        str(bundle),
        "--checks",
        "--json",
        *(["--route-on-device"] if route_on_device else []),
        *(["--verify-key", str(verify_key)] if verify_key else []),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "hang"}
    if done.returncode < 0:
        return {"status": "crash", "signal": -done.returncode}
    if done.returncode == 2:
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        message = errors[-1] if errors else done.stderr[-300:]
        return {"status": "refused", "message": message[:500], "names_file": str(bundle) in message}
    if done.returncode in (0, 1):
        return {"status": "ok", "exit_code": done.returncode}
    return {"status": "foreign", "exit_code": done.returncode, "message": done.stderr[-300:]}


# ---- one case ---------------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    index: int
    area: str
    description: str
    consistent: bool
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    outside_reads: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare_outside(outside: Path, bundle: Path) -> None:
    """The directory escapes point at: a secret file (the size of the tokenizer), and a FIFO with no writer."""
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret").write_bytes((bundle / "tokenizer.json").read_bytes())
    if not (outside / "fifo").exists():
        os.mkfifo(outside / "fifo")


def run_case(
    index: int,
    mutation: Mutation,
    pristine: Path,
    work: Path,
    probes: dict[str, Callable[[Path], dict[str, Any]]],
    watch: OutsideWatch | None,
) -> CaseResult:
    """Apply ``mutation`` to a fresh copy of ``pristine`` under ``work`` and run every probe on it."""
    start = time.perf_counter()
    case = work / f"case{index}"
    shutil.rmtree(case, ignore_errors=True)
    bundle, outside = case / "bundle", case / "outside"
    shutil.copytree(pristine, bundle, symlinks=True)
    prepare_outside(outside, pristine)
    result = CaseResult(index, mutation.area, mutation.description, mutation.consistent)
    try:
        mutation.edit(bundle, outside)
    except Exception as exc:  # a mutation that does not apply to this bundle (e.g. a list too short)
        result.outcomes["mutation"] = {"status": "not applicable", "message": f"{type(exc).__name__}: {exc}"[:200]}
        shutil.rmtree(case, ignore_errors=True)
        return result
    if watch is not None:
        watch.watch(outside)
        watch.events()  # drain what setting up caused
    for name, probe in probes.items():
        result.outcomes[name] = probe(bundle)
    if watch is not None:
        result.outside_reads = watch.events()
    result.seconds = round(time.perf_counter() - start, 3)
    shutil.rmtree(case, ignore_errors=True)
    return result


def problems(result: CaseResult) -> list[str]:
    """What makes a case a failure of the hardening: a crash, a hang, a foreign exception, a traceback, a read
    outside the bundle, or a refusal that names no file of the bundle."""
    found = []
    for name, outcome in result.outcomes.items():
        status = outcome.get("status")
        if status in ("crash", "hang", "foreign"):
            found.append(f"{name}: {status} {outcome.get('error', '')} {outcome.get('message', '')[:200]}")
        if outcome.get("traceback") is True:
            found.append(f"{name}: traceback in the output")
        if status == "refused" and not outcome.get("names_file"):
            found.append(f"{name}: refusal names no file of the bundle: {outcome.get('message', '')[:200]}")
        if name == "cli" and outcome.get("exit_code") == 2 and not outcome.get("names_file"):
            found.append(f"cli: exit 2 naming no file of the bundle: {outcome.get('message', '')[:200]}")
    if result.outside_reads:
        found.append(f"{result.outside_reads} reads outside the bundle")
    return found
