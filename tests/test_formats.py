"""The formats as code (hm_export.formats): committed JSON Schemas up to date with the types, the typed manifest
and its validation, and the bank-index and manifest fixtures read by both readers (Python and the C++ runtime)
with the same verdicts (tests/fixtures/formats/make_fixtures.py writes them)."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hm_export.bank.reader import BankReader
from hm_export.bundle import verify_files
from hm_export.errors import BankError, BundleError
from hm_export.formats import manifest as manifest_format
from hm_export.formats.schema import render, schemas
from hm_export.integrity import write_seal
from hm_export.native import build_native_runner

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "formats"
BUILD_DIR = ROOT / "build" / "native"
VERDICTS = json.loads((FIXTURES / "bank-index" / "verdicts.json").read_text())


def test_committed_schemas_match_the_types() -> None:
    """docs/schemas/ is what ``python -m hm_export.formats.schema docs/schemas`` writes from the types."""
    for name, schema in schemas().items():
        assert (ROOT / "docs" / "schemas" / name).read_text() == render(schema), f"rerun the generator for {name}"
    manifest = schemas()["manifest.schema.json"]
    assert manifest["properties"]["format"] == {"const": "hm-export-bundle"}
    assert manifest["properties"]["slot"] == {"$ref": "slot-contract.schema.json"}
    assert manifest["$defs"]["FileRecord"]["required"] == ["bytes", "sha256"]
    block = schemas()["bank-index.schema.json"]["$defs"]["BlockEntry"]
    assert block["properties"]["sha256"] == {"type": "string"} and "sha256" in block["required"]


def bank_case(tmp_path: Path, name: str) -> Path:
    """The valid fixture bank with the index of case ``name``."""
    bank = tmp_path / name
    shutil.copytree(FIXTURES / "bank-index" / "valid", bank)
    if name != "valid":
        shutil.copyfile(FIXTURES / "bank-index" / "invalid" / f"{name}.json", bank / "index.json")
    return bank


# Unkeyed, a verified read checks the CRC-32 only (the per-block sha256 adds security only with an index
# authenticated by a signed manifest: docs/bank-format.md), so a sha256 that is not the payload's goes unseen.
UNKEYED_VERDICTS = {**VERDICTS, "sha256-of-other-bytes": "ok"}


def index_digest(bank: Path) -> str:
    """What a signed manifest would pin for this bank's index.json."""
    return hashlib.sha256((bank / "index.json").read_bytes()).hexdigest()


def read_python(bank: Path, keyed: bool) -> str:
    """``"ok"`` when the index opens and every block reads verified (``keyed``: as from a bundle opened with a
    trusted key, the index authenticated by its digest), else the error."""
    try:
        with BankReader(bank, index_sha256=index_digest(bank) if keyed else None) as reader:
            for entry in reader.index.blocks:
                reader.read_block(entry.level, entry.node)
    except BankError as exc:
        assert str(bank) in str(exc)  # every refusal names the bank's file
        return str(exc)
    return "ok"


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "unkeyed"])
@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_bank_index_fixtures_python(tmp_path: Path, name: str, keyed: bool) -> None:
    want = (VERDICTS if keyed else UNKEYED_VERDICTS)[name]
    verdict = read_python(bank_case(tmp_path, name), keyed)
    assert verdict == "ok" if want == "ok" else want in verdict


@pytest.mark.slow  # builds the C++ runtime (reused across tests and sessions)
def test_bank_index_fixtures_native_agree_with_python(tmp_path: Path) -> None:
    tool = build_native_runner(BUILD_DIR).parent / "hm_bank_read"
    for keyed, verdicts in ((True, VERDICTS), (False, UNKEYED_VERDICTS)):
        for name, want in sorted(verdicts.items()):
            bank = bank_case(tmp_path / str(keyed), name)
            digest = ["--index-sha256", index_digest(bank)] if keyed else []
            command = [str(tool), str(bank), "--check", *digest]
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
            python = read_python(bank, keyed)
            if want == "ok":
                assert done.returncode == 0 and json.loads(done.stdout) == {"blocks": 2} and python == "ok", name
            else:
                assert done.returncode == 2 and python != "ok", (name, keyed, done.stdout, python)
                assert want in done.stderr and str(bank) in done.stderr, (name, keyed, done.stderr)


# ---- the manifest -------------------------------------------------------------------------------------------


def sha(character: str) -> str:
    return character * 64


MANIFEST = {
    "format": "hm-export-bundle",
    "format_version": 1,
    "created": "2026-12-01T00:00:00+00:00",
    "model": {"vocab_size": 8},
    "slot": {"seq_len": 4},
    "tokenizer": {"file": "tokenizer.json"},
    "router": {"file": "router.safetensors", "dim": 384, "embedder": "all-MiniLM-L6-v2"},
    "bank": {"dir": "bank", "schema_hash": sha("b"), "scheme": "int8", "levels": ["int8", "int8"]},
    "targets": {
        "executorch": {
            "files": {},
            "window": "decode",
            "runtime": "executorch",
            "decode": {"files": {"program": "executorch/decode.pte"}, "cache": {"layers": 2}},
        }
    },
    "checks": {"file": "checks/checks.json", "expected": "checks/expected.safetensors", "count": 3, "new_tokens": 4},
    "files": {
        name: {"bytes": 10, "sha256": sha("a")}
        for name in (
            "tokenizer.json",
            "router.safetensors",
            "bank/index.json",
            "executorch/decode.pte",
            "checks/checks.json",
            "checks/expected.safetensors",
        )
    },
    "pipeline": {"passes": []},
}


def test_typed_manifest_fields() -> None:
    manifest_format.validate(Path("bundle"), MANIFEST)
    typed = manifest_format.Manifest.from_record(MANIFEST)
    assert typed.bank == manifest_format.BankRef("bank", sha("b"), "int8", ("int8", "int8"))
    assert typed.bank.index == "bank/index.json" and typed.listed_size("bank/index.json") == 10
    target = typed.targets["executorch"]
    assert target.window == "decode" and target.one_program is target.decode and target.files == {}
    assert target.decode.files == {"program": "executorch/decode.pte"} and target.decode.get("cache") == {"layers": 2}
    assert target.get("runtime") == "executorch" and target.checks is None
    assert typed.checks == manifest_format.ChecksRef("checks/checks.json", "checks/expected.safetensors", 3, 4)
    assert typed.router.tokenizer is None and typed.router.programs == {} and typed.router.dim == 384
    assert typed.record["pipeline"] == {"passes": []}  # informational sections stay in the record


@pytest.mark.parametrize(
    ("edit", "field", "message"),
    [
        (lambda m: m["files"]["tokenizer.json"].update(sha256="A" * 64), "files['tokenizer.json'].sha256", "hex"),
        (lambda m: m["checks"].update(new_tokens=-1), "checks.new_tokens", "outside"),
        (lambda m: m["bank"].update(levels=["int8", 4]), "bank.levels[1]", "expected a string"),
        (lambda m: m["router"].update(embedder=7), "router.embedder", "expected a string"),
        (lambda m: m.update(created=None), "created", "expected a string"),
        (lambda m: m["targets"]["executorch"].update(checks={"file": "x.json"}), "targets.executorch.checks.file", ""),
        (lambda m: m["targets"]["executorch"].pop("decode"), "targets.executorch.window", "decode"),
    ],
)
def test_manifest_validation_names_the_field(edit, field: str, message: str) -> None:
    record = copy.deepcopy(MANIFEST)
    edit(record)
    with pytest.raises(BundleError, match=message) as info:
        manifest_format.validate(Path("bundle"), record)
    assert info.value.field == field and info.value.path == str(Path("bundle") / "manifest.json")


# ---- the manifest fixtures: both readers, the same verdicts ------------------------------------------------

MANIFEST_VERDICTS = json.loads((FIXTURES / "manifest" / "verdicts.json").read_text())


def manifest_case(tmp_path: Path, name: str) -> Path:
    """The valid fixture bundle with the manifest of case ``name``, sealed as the exporter seals it (the seal
    is checked before anything is parsed: an unsealed edit would only test the seal)."""
    bundle = tmp_path / name
    shutil.copytree(FIXTURES / "manifest" / "valid", bundle)
    if name != "valid":
        data = (FIXTURES / "manifest" / "invalid" / f"{name}.json").read_bytes()
        (bundle / manifest_format.MANIFEST).write_bytes(data)
        write_seal(bundle, data)
    return bundle


def read_manifest_python(bundle: Path) -> str:
    """``"ok"`` when the manifest reads (seal, structure) and every listed file matches it, else the error."""
    try:
        verify_files(bundle, manifest_format.read(bundle))
    except BundleError as exc:
        assert str(bundle) in str(exc)  # every refusal names the bundle's file
        return str(exc)
    return "ok"


@pytest.mark.parametrize("name", sorted(MANIFEST_VERDICTS))
def test_manifest_fixtures_python(tmp_path: Path, name: str) -> None:
    want = MANIFEST_VERDICTS[name]
    verdict = read_manifest_python(manifest_case(tmp_path, name))
    assert verdict == "ok" if want == "ok" else want in verdict, verdict


@pytest.mark.slow  # builds the C++ runtime (reused across tests and sessions)
def test_manifest_fixtures_native_agree_with_python(tmp_path: Path) -> None:
    tool = build_native_runner(BUILD_DIR).parent / "hm_bundle_check"
    files = len(json.loads((FIXTURES / "manifest" / "valid" / manifest_format.MANIFEST).read_text())["files"])
    for name, want in sorted(MANIFEST_VERDICTS.items()):
        bundle = manifest_case(tmp_path, name)
        done = subprocess.run([str(tool), str(bundle)], capture_output=True, text=True, timeout=60)
        python = read_manifest_python(bundle)
        if want == "ok":
            assert done.returncode == 0 and python == "ok", (name, done.stderr, python)
            assert json.loads(done.stdout) == {"files": files, "targets": 1}
        else:
            assert done.returncode == 2 and python != "ok", (name, done.stdout, python)
            assert want in done.stderr and str(bundle) in done.stderr, (name, done.stderr)
