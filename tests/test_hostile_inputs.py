"""Hostile and careless input: seeded mutations of a bundle (hm_export.fuzz) against the Python API, the golden
checks, the CLI and the C++ runner.

The fuzz test replays a few hundred mutations of the session's decode bundle -- JSON fields of the manifest,
bank index and checks set to hostile values, bytes flipped or cut in blocks and checks, path escapes, symlinks
out of the bundle, FIFOs, consistent edits with every checksum and the seal recomputed -- and asserts: no
foreign exception (every failure is an HmExportError naming a file of the bundle), no crash and no hang (the
readers run in a worker process and a subprocess), no traceback from ``hm-export check``, and no open of any
file outside the bundle (inotify).  It mutates a copy without the router programs (as exported with
``--no-router-program``: three MiniLM programs would make each case copy and hash 270 MB); the router fuzz test
mutates a copy with the ExecuTorch router program and its tokenizer and replays them in Python and in the C++
runner routing on device.  The other tests pin the individual defences down.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import sys
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import sign_and_edit_index

from hm_export.bundle import read_manifest, write_manifest
from hm_export.cli import main
from hm_export.errors import BundleError, HmExportError, IntegrityError
from hm_export.formats import parse_json
from hm_export.fuzz import Harness, OutsideWatch, crc_patch, mutations, probe_native, problems, rerecord, run_case
from hm_export.integrity import generate_key, public_key_bytes, sign_bundle
from hm_export.router_program import open_router_program
from hm_export.runtime_stubs.loader import BundleLoader

FUZZ_CASES = 240
FUZZ_AREAS = ("manifest", "seal", "index", "blocks", "checks", "filesystem")
ROUTER_FUZZ_CASES = 20
NATIVE_BUILD = Path(__file__).resolve().parent.parent / "build" / "native" / "hm_runner"


def router_subset(source: Path, out: Path, keep: tuple[str, ...]) -> Path:
    """A copy of ``source`` keeping only the router programs of ``keep`` (none: no router program, tokenizer or
    program I/O, as ``--no-router-program`` exports), its manifest rewritten and resealed."""
    manifest = json.loads((source / "manifest.json").read_text())
    router = manifest["router"]
    roots = [f for name, entry in router["programs"].items() if name not in keep for f in entry["files"].values()]
    router["programs"] = {name: entry for name, entry in router["programs"].items() if name in keep}
    if not keep:
        roots.append(router.pop("tokenizer")["file"])
        del router["program_io"], router["programs"]
    gone = {f for f in manifest["files"] if any(f == r or f.startswith(f"{r}/") for r in roots)} | set(roots)
    manifest["files"] = {f: record for f, record in manifest["files"].items() if f not in gone}

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if (Path(folder) / n).relative_to(source).as_posix() in gone]

    shutil.copytree(source, out, ignore=ignore)
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def bundle(decode_bundle, tmp_path_factory) -> Path:
    return router_subset(decode_bundle[1], tmp_path_factory.mktemp("hostile") / "bundle", ())


@pytest.fixture(scope="module")
def router_bundle(decode_bundle, tmp_path_factory) -> Path:
    return router_subset(decode_bundle[1], tmp_path_factory.mktemp("hostile_router") / "bundle", ("executorch",))


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify and /proc are Linux")
def test_seeded_mutations_are_refused_or_harmless(bundle, tmp_path):
    """A few hundred seeded mutations: no foreign exception, crash, hang, traceback or read outside the bundle;
    every refusal names a file of the bundle.  The C++ runner replays every fifth case when it is built."""
    harness, watch = Harness(timeout=60), OutsideWatch()
    cpu_before = _cpu_seconds()
    native = NATIVE_BUILD if NATIVE_BUILD.is_file() else None
    failures, statuses = [], {}
    try:
        for index, mutation in enumerate(mutations(bundle, FUZZ_CASES, seed=16, areas=FUZZ_AREAS)):
            probes = {"api": lambda b: harness.run("api", b, ("onnx",))}
            if index % 5 == 0:
                probes["checks"] = lambda b: harness.run("checks", b)
                if native is not None:
                    probes["native"] = lambda b: probe_native(native, b, timeout=60)
            if index % 20 == 0:
                probes["cli"] = lambda b: harness.run("cli", b)
            result = run_case(index, mutation, bundle, tmp_path, probes, watch)
            failures += [f"case {index} ({mutation.description}): {problem}" for problem in problems(result)]
            for name, outcome in result.outcomes.items():
                key = (name, outcome["status"])
                statuses[key] = statuses.get(key, 0) + 1
    finally:
        harness.close()
        watch.close()
    print(f"fuzz: {FUZZ_CASES} cases, {_cpu_seconds() - cpu_before:.1f} CPU seconds (test, worker, runner)")
    assert not failures, "\n".join(failures)
    refused = sum(n for (name, status), n in statuses.items() if name == "api" and status == "refused")
    ran = sum(n for (name, status), n in statuses.items() if name == "api" and status == "ok")
    assert refused > FUZZ_CASES // 3 and ran > 10, statuses  # the mutations bite, and harmless ones still run


def router_mutations(bundle: Path) -> list:
    """The seeded router mutations, less the consistent byte edits of the program itself: a ``.pte`` whose sha256
    was recomputed is code the unsigned bundle vouches for, and ExecuTorch's Python bindings abort on some (the
    XNNPACK delegate logs the corrupt blob's bytes and the binding's log callback raises UnicodeDecodeError
    through C++: ``terminate``).  The C++ runner refuses those; a signed bundle refuses them all
    (docs/hostile-inputs.md)."""
    cases = mutations(bundle, ROUTER_FUZZ_CASES, seed=17, areas=("router",))
    return [
        m
        for m in cases
        if not (m.consistent and m.description.startswith("router/minilm.pte: ") and " bytes (" in m.description)
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify and /proc are Linux")
def test_seeded_router_mutations_are_refused_or_harmless(router_bundle, tmp_path):
    """Seeded mutations of the router files (centroids, the router tokenizer, the ExecuTorch router program) and of
    the manifest's router paths, replayed against the router program in Python and the C++ runner routing the
    golden checks from their text: no foreign exception, crash, hang or read outside; refusals name a file."""
    harness, watch = Harness(timeout=120), OutsideWatch()
    native = NATIVE_BUILD if NATIVE_BUILD.is_file() else None
    failures, statuses = [], {}
    try:
        for index, mutation in enumerate(router_mutations(router_bundle)):
            probes = {"router": lambda b: harness.run("router", b, ("executorch",))}
            if native is not None:
                probes["native"] = lambda b: probe_native(native, b, timeout=120, route_on_device=True)
            result = run_case(index, mutation, router_bundle, tmp_path, probes, watch)
            failures += [f"case {index} ({mutation.description}): {problem}" for problem in problems(result)]
            for name, outcome in result.outcomes.items():
                statuses[(name, outcome["status"])] = statuses.get((name, outcome["status"]), 0) + 1
    finally:
        harness.close()
        watch.close()
    assert not failures, "\n".join(failures)
    assert statuses.get(("router", "refused"), 0) > ROUTER_FUZZ_CASES // 4 and statuses.get(("router", "ok"), 0), (
        statuses
    )


def _outside_copy(path: Path, outside: Path) -> None:
    shutil.copytree(path, outside) if path.is_dir() else shutil.copyfile(path, outside)


def _set_json(root: Path, relative: str, keys: tuple, value: object) -> None:
    doc = json.loads((root / relative).read_text())
    parent = doc
    for key in keys[:-1]:
        parent = parent[key]
    parent[keys[-1]] = value
    (root / relative).write_text(json.dumps(doc))
    if relative == "manifest.json":
        write_manifest(root, doc)
    else:
        rerecord(root, relative)


ROUTER_DAMAGE = {
    "tokenizer [CLS] id outside the vocabulary": (
        lambda root, out: _set_json(
            root, "router/tokenizer.json", ("post_processor", "special_tokens", "[CLS]", "ids"), [10**6]
        ),
        r"router/(tokenizer.json|minilm.pte)",  # Python: the embedding op refuses the id; C++ reads the tokenizer
        r"router/tokenizer.json: post-processor id 1000000",
    ),
    "tokenizer is a symlink out of the bundle": (
        lambda root, out: (
            _outside_copy(root / "router/tokenizer.json", out),
            (root / "router/tokenizer.json").unlink(),
            (root / "router/tokenizer.json").symlink_to(out),
        ),
        "is a symbolic link",
        "manifest.json: files do not match the manifest",
    ),
    "program truncated, consistently": (
        lambda root, out: (
            (root / "router/minilm.pte").write_bytes((root / "router/minilm.pte").read_bytes()[:4096]),
            rerecord(root, "router/minilm.pte"),
        ),
        "minilm.pte",
        "minilm.pte",
    ),
    "tokenizer path escapes": (
        lambda root, out: _set_json(root, "manifest.json", ("router", "tokenizer", "file"), "../outside.json"),
        r"router.tokenizer.file",
        r"router.tokenizer.file: unsafe path '\.\./outside.json'",  # hm::validate_manifest, as Python's validate
    ),
    "token range is no range": (
        lambda root, out: _set_json(root, "manifest.json", ("router", "program_io", "inputs", 0, "tokens"), [2, 1]),
        r"router.program_io.inputs\[0\].tokens",
        r"router.program_io.inputs\[0\].tokens",
    ),
    "program not listed": (
        lambda root, out: _set_json(
            root, "manifest.json", ("router", "programs", "executorch", "files", "program"), "router/other.pte"
        ),
        r"router.programs.executorch.files.program",
        r"'router/other.pte' is not listed",
    ),
}


@pytest.mark.parametrize("damage", list(ROUTER_DAMAGE))
def test_router_damage_is_refused_naming_the_file(router_bundle, tmp_path, damage):
    """Each reader of the router files refuses, naming a file of the bundle: open_router_program (Python) and
    the C++ runtime routing the checks from their text (when built)."""
    edit, message, native_message = ROUTER_DAMAGE[damage]
    root = copy_bundle(router_bundle, tmp_path)
    edit(root, tmp_path / "outside.json")
    with pytest.raises(HmExportError, match=message) as info:
        open_router_program(root, "executorch").embed(["Parse an email message"])
    assert str(root) in str(info.value)
    if NATIVE_BUILD.is_file():
        outcome = probe_native(NATIVE_BUILD, root, route_on_device=True)
        assert outcome["status"] == "refused" and outcome["names_file"], outcome
        assert re.search(native_message, outcome["message"]), outcome


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children: what the fuzz costs, however busy the machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def test_manifest_edit_without_reseal_is_refused_before_parsing(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path)
    text = (root / "manifest.json").read_text().replace('"vocab_size": 64', '"vocab_size": 0')
    (root / "manifest.json").write_text(text)
    with pytest.raises(IntegrityError, match=r"manifest.json: sha256 .* differs from the one sealed in .*bundle.sig"):
        BundleLoader(root, target=None)
    (root / "bundle.sig").unlink()
    with pytest.raises(IntegrityError, match=r"bundle.sig: missing: the bundle has no integrity root"):
        read_manifest(root)


@pytest.mark.parametrize(
    ("value", "message"),
    [(0, r"vocab_size must be an integer in \[1, 4194304\], got 0"), (2**31, "got 2147483648"), ("64", "got '64'")],
)
def test_resealed_vocab_size_out_of_range_is_refused(bundle, tmp_path, value, message):
    root = copy_bundle(bundle, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["model"]["vocab_size"] = value
    write_manifest(root, manifest)
    with pytest.raises(BundleError, match=message) as info:
        BundleLoader(root, target=None)
    assert info.value.path == str(root / "manifest.json") and info.value.field == "model.vocab_size"


def test_resealed_vocab_size_that_the_program_does_not_have_is_refused(bundle, tmp_path):
    """In range, consistent, and still wrong: the program's own metadata says 64."""
    root = copy_bundle(bundle, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["model"]["vocab_size"] = 65  # the tokenizer still fits; the slot contract does not depend on it
    write_manifest(root, manifest)
    loader = BundleLoader(root, target=None)
    with pytest.raises(BundleError, match=r"decode.pte: the program takes 32 positions with a vocabulary of 64"):
        loader.open_decoder("executorch")


def test_signed_bundle_refuses_any_consistent_edit(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path)
    generate_key(tmp_path / "key.pem", tmp_path / "key.pub")
    other = generate_key(tmp_path / "other.pem", tmp_path / "other.pub")
    signer = sign_bundle(root, tmp_path / "key.pem")
    key = public_key_bytes(tmp_path / "key.pub")
    assert signer == key.hex() and signer != other
    BundleLoader(root, target=None, verify_key=key)  # signed by the trusted key: opens
    with pytest.raises(IntegrityError, match="signature does not verify with the given key"):
        BundleLoader(root, target=None, verify_key=public_key_bytes(tmp_path / "other.pub"))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["model"]["norm_eps"] = 1e-3  # a consistent edit: the seal's digest recomputed, the signature dropped
    write_manifest(root, manifest)
    BundleLoader(root, target=None)  # without a key: the edit is consistent, and harmless to the reader
    with pytest.raises(IntegrityError, match="the bundle is not signed, and a verify key was given"):
        BundleLoader(root, target=None, verify_key=key)
    result = invoke("inspect", root, "--verify-key", tmp_path / "key.pub")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "not signed" in result.stderr


def test_crc_preserving_block_forgery_is_read_unsigned_and_refused_signed_with_the_key(bundle, tmp_path):
    """The trust model (docs/hostile-inputs.md): without a trusted key whoever edits a block can rewrite the index,
    manifest and seal as well, so verified reads check the CRC-32 alone and a CRC-preserving edit is read; a
    bundle opened with its signer's key authenticates the index, and each block's sha256 refuses the edit."""
    root = copy_bundle(bundle, tmp_path)
    generate_key(tmp_path / "key.pem", tmp_path / "key.pub")
    sign_bundle(root, tmp_path / "key.pem")
    key = public_key_bytes(tmp_path / "key.pub")
    loader = BundleLoader(root, target=None)
    loader.set_path([0, 1])
    pristine = [t.clone() for t in loader.slot]
    entry = loader.bank.index.entry(1, 1)
    block = loader.bank_dir / entry.file
    data = bytearray(block.read_bytes())
    start, want = entry.offset, entry.crc32
    data[start + 3] ^= 0xFF
    data[start + 8 : start + 12] = crc_patch(bytes(data[start : start + entry.length]), 8, want)
    assert zlib.crc32(data[start : start + entry.length]) == want
    block.write_bytes(bytes(data))
    unsigned = BundleLoader(root, target=None)
    assert not unsigned.bank.authenticated
    unsigned.set_path([0, 1])  # header and CRC-32 match: read
    assert any(not torch.equal(a, b) for a, b in zip(pristine, unsigned.slot, strict=True))
    signed = BundleLoader(root, target=None, verify_key=key)
    assert signed.bank.authenticated
    with pytest.raises(HmExportError, match=rf"{block}: block \(level 1, node 1\): checksum mismatch \(payload sha256"):
        signed.set_path([0, 1])


def test_signed_index_is_checked_even_in_trusted_storage_mode(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path)
    index = sign_and_edit_index(root, tmp_path)
    BundleLoader(root, target=None, verify=False)  # unkeyed trusted storage: opens
    with pytest.raises(HmExportError, match=rf"{index}: sha256 .* differs from the signed manifest's"):
        BundleLoader(root, target=None, verify=False, verify_key=public_key_bytes(tmp_path / "key.pub"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs and symlink checks as on Linux")
@pytest.mark.parametrize(
    ("relative", "kind", "message"),
    [
        ("bank/level1/node000002.hmb", "fifo", "is a FIFO, expected a regular file"),
        ("bank/level1", "symlink", "is a symbolic link"),
        ("tokenizer.json", "symlink", "is a symbolic link"),
        ("manifest.json", "symlink", "is a symbolic link"),
        ("checks/checks.json", "fifo", "is a FIFO"),
    ],
)
def test_fifos_and_symlinks_are_refused_without_blocking(bundle, tmp_path, relative, kind, message):
    root = copy_bundle(bundle, tmp_path)
    path, outside = root / relative, tmp_path / "outside"
    shutil.copytree(path, outside) if path.is_dir() else shutil.copyfile(path, outside)  # identical bytes
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.mkfifo(path) if kind == "fifo" else path.symlink_to(outside)
    with pytest.raises(HmExportError, match=message) as info:
        loader = BundleLoader(root, target=None)
        loader.set_path((1, 5))
        loader.set_path((0, 2))
    assert str(root) in str(info.value)
    result = invoke("check", root, "--target", "onnx")  # a block on no check's path is not read by the replay
    assert "Traceback" not in result.output and result.exit_code in (0, 1, 2), result.output
    assert message in result.output or result.exit_code == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("file", "../outside.json"),
        ("file", "/dev/zero"),
        ("expected", "/proc/self/mem"),
        ("file", "checks/../../../x"),
    ],
)
def test_check_refuses_paths_out_of_the_bundle(bundle, tmp_path, field, value):
    root = copy_bundle(bundle, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["checks"][field] = value
    write_manifest(root, manifest)
    result = invoke("check", root)
    assert result.exit_code == 1, result.output
    assert "FAIL bundle/manifest" in result.stdout and "must stay inside the bundle" in result.stdout


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / "tokenizer.json").unlink(), "tokenizer.json: missing"),
        (lambda root: (root / "router.safetensors").write_bytes(b""), "router.safetensors: 0 bytes"),
        (lambda root: _drop_key(root, "checks/checks.json", "tolerance"), "checks.json"),
    ],
)
def test_check_reports_damage_as_fail_rows(bundle, tmp_path, damage, message):
    root = copy_bundle(bundle, tmp_path)
    damage(root)
    result = invoke("check", root, "--target", "onnx")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert any(line.startswith("  FAIL bundle/") and message in line for line in result.stdout.splitlines())


def _drop_key(root: Path, relative: str, key: str) -> None:
    body = json.loads((root / relative).read_text())
    del body[key]
    (root / relative).write_text(json.dumps(body))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"a": ' * 70 + "1" + "}" * 70, "nested deeper than 64"),
        ('{"a": ' + "9" * 5000 + "}", "integer of 5000 digits"),
        ('{"a": 1e999}', "number 1e999 is out of range"),
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"a": "\xff"}', "not UTF-8"),
    ],
)
def test_json_reader_refuses_what_could_crash_or_mislead_a_reader(text, message):
    with pytest.raises(BundleError, match=message) as info:
        parse_json(text, "/bundle/manifest.json", BundleError)
    assert info.value.path == "/bundle/manifest.json"
