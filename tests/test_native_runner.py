"""The native (C++) runtime in runtime_stubs/cpp, built once per session against the executorch wheel.

Bundles with an int8 and an int4-g32 bank (ExecuTorch target, golden checks on ``DECODE_CONTEXTS``):
``hm_runner`` replays their golden checks (prefill logits against the digest, greedy tokens equal to the
recorded continuations, routing from precomputed embeddings), fills the slot bit-identically to the Python
``SlotFiller`` (only changed levels; per-block files and level packs), runs the benchmark, and refuses
corrupt blocks, truncated blocks, modified files and a slot contract that does not match the model, naming
the file and the problem.  The C API (what Swift and JNI call) is driven through ctypes in a separate
process; ``hm-export native run`` once.

Quantized slots (``--slot-strategy fused-int4`` with an int4-g32 bank, ``fused-int8`` with an int8 bank): the
runner runs ``hm_export::memory_swiglu`` (compiled into libhm_runtime.so), replays the golden checks, fills
the slot's codes and float16 scales byte for byte like the Python ``SlotFiller``, and refuses the strategies
it does not run (``graph-*``, ``host-fp16``) and a quantized contract that does not match, naming the field.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DECODE_CONTEXTS, sign_and_edit_index, tiny_checkpoint

from hm_export.bench import leaf_path
from hm_export.bundle import file_record, write_manifest
from hm_export.cli import main
from hm_export.fuzz import crc_patch
from hm_export.integrity import generate_key, sign_bundle
from hm_export.native import NativeError, build_native_runner, run_native_runner, write_check_embeddings
from hm_export.runtime_stubs.block_cache import CachePolicy
from hm_export.runtime_stubs.loader import BundleLoader

BUILD_DIR = Path(__file__).resolve().parent.parent / "build" / "native"  # gitignored; reused across sessions
SCHEMES = ("int8", "int4-g32")
FUSED = {"fused-int4": "int4-g32", "fused-int8": "int8"}  # strategy -> bank scheme

pytestmark = pytest.mark.slow  # every test here needs an exported bundle or a C++ build


@pytest.fixture(scope="session")
def runner() -> Path:
    return build_native_runner(BUILD_DIR)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("native_ckpt"), name="ckpt", seed=3)


def export_checked(checkpoint: Path, work: Path, name: str, scheme: str, strategy: str = "host-fp32") -> Path:
    """A tiny ExecuTorch bundle with golden checks on ``DECODE_CONTEXTS`` (about 30 s)."""
    from hm_export.export import ExportRecipe, export_bundle
    from hm_export.targets import EmitOptions

    contexts = work / "contexts.jsonl"
    contexts.write_text("".join(json.dumps(item) + "\n" for item in DECODE_CONTEXTS))
    options = EmitOptions(slot_strategy=strategy)
    recipe = ExportRecipe(
        bank_scheme=scheme, check_contexts=contexts, check_new_tokens=12, options=options, router_program=False
    )
    export_bundle(checkpoint, work / name, recipe)
    return work / name


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> dict[str, Path]:
    """One tiny bundle per bank scheme, exported like the decode fixture."""
    work = tmp_path_factory.mktemp("native")
    return {scheme: export_checked(checkpoint, work, scheme, scheme) for scheme in SCHEMES}


@pytest.fixture(scope="module")
def fused_bundles(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> dict[str, Path]:
    """One tiny bundle per fused strategy; the eager export checks run the op through the kernel library."""
    from hm_export.kernels import build_kernel_library, load_kernel_library

    load_kernel_library(build_kernel_library(tmp_path_factory.mktemp("kernels-build")))
    work = tmp_path_factory.mktemp("native-fused")
    return {name: export_checked(checkpoint, work, name, scheme, name) for name, scheme in FUSED.items()}


def checks_of(bundle: Path) -> list[dict]:
    return json.loads((bundle / "checks" / "checks.json").read_text())["checks"]


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / bundle.name))


def with_edited_slot(bundle: Path, tmp_path: Path, edit) -> tuple[Path, str]:
    """A copy of ``bundle`` whose manifest slot section ``edit`` changed; also what ``edit`` says it changed."""
    bundle = copy_bundle(bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    field = edit(manifest["slot"])
    write_manifest(bundle, manifest)  # a consistent edit: the seal is recomputed
    return bundle, field


def python_slot(bundle: Path, *paths: list[int]) -> np.ndarray:
    """The bytes of the Python loader's slot (its SlotFiller, in the manifest's layout) after setting ``paths``
    in order, tensors in contract order: what ``hm_runner --dump-slot`` writes."""
    loader = BundleLoader(bundle, target=None, cache=CachePolicy(resident_levels=0, cache_bytes=0))
    for path in paths:
        loader.set_path(path)
    return np.concatenate([tensor.numpy().view(np.uint8).ravel() for tensor in loader.slot])


def assert_same_bytes(dump: Path, expected: np.ndarray) -> None:
    native = np.fromfile(dump, dtype=np.uint8)
    assert native.shape == expected.shape and np.any(expected != 0)
    assert np.array_equal(native, expected)


def assert_checks_pass(runner: Path, bundle: Path, tmp_path: Path) -> None:
    embeddings = write_check_embeddings(bundle, tmp_path / "embeddings.safetensors")
    report = run_native_runner(runner, bundle, checks=True, embeddings=embeddings)
    recorded = checks_of(bundle)
    assert report["checks"]["passed"] and report["checks"]["pass"] == len(recorded) == 4
    for result, check in zip(report["checks"]["results"], recorded):
        assert result["tokens"] == check["greedy"]  # every greedy token, no near-tie excuse
        assert result["route"] == check["path"]
        assert result["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("scheme", SCHEMES)
def test_golden_checks_pass_natively(runner, bundles, scheme, tmp_path):
    assert_checks_pass(runner, bundles[scheme], tmp_path)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_slot_fill_is_bit_identical_to_the_python_loader(runner, bundles, scheme, tmp_path):
    bundle = bundles[scheme]
    loader = BundleLoader(bundle, target=None)
    memory = loader.config.memory
    first, sibling = leaf_path(memory, 1), leaf_path(memory, 2)  # same level-0 node, another leaf
    report = run_native_runner(runner, bundle, fills=[first, sibling], dump_slot=tmp_path / "slot.bin")
    assert [fill["levels_changed"] for fill in report["fills"]] == [[0, 1], [1]]
    assert report["fills"][1]["storage_bytes"] == loader.bank.block_size(1)
    assert_same_bytes(tmp_path / "slot.bin", python_slot(bundle, first, sibling))


def test_level_packs_give_the_same_slot_and_checks(runner, bundles, checkpoint, tmp_path):
    """A bank re-quantized as one pack per level (kept open, blocks at a stride) reads like per-block files."""
    from hm_export.bank import quantize_bank

    bundle = copy_bundle(bundles["int4-g32"], tmp_path)
    shutil.rmtree(bundle / "bank")
    quantize_bank(bundle / "bank", checkpoint, "int4-g32", layout="per-level", workers=1)
    assert sorted(p.name for p in (bundle / "bank").iterdir()) == ["index.json", "level0.hmp", "level1.hmp"]
    slot = tmp_path / "slot.bin"
    manifest = json.loads((bundle / "manifest.json").read_text())  # the new index.json, recorded and sealed
    manifest["files"]["bank/index.json"] = file_record(bundle, "bank/index.json")
    write_manifest(bundle, manifest)
    report = run_native_runner(runner, bundle, checks=True, fills=[[1, 5]], dump_slot=slot)
    assert report["checks"]["passed"]
    assert_same_bytes(slot, python_slot(bundles["int4-g32"], [1, 5]))


def test_benchmark_reports_the_bench_fields(runner, bundles):
    settings = {"runs": 2, "contexts": 3, "prompt_tokens": 8, "new_tokens": 5, "cache": "stream"}
    report = run_native_runner(runner, bundles["int8"], bench=settings, threads=1)["bench"]
    assert (report["runs"], report["contexts"], report["prompt_tokens"], report["new_tokens"]) == (2, 3, 8, 5)
    assert report["threads"] == 1 and report["cache_policy"] == "stream" and 0 < report["peak_rss_mb"] < 200
    assert report["decode_step_ms"]["n"] == 2 * 3 * 4  # the first new token comes from the prefill
    assert report["ttft_after_switch_ms"]["n"] == 6 and report["route_ms"] == {"n": 0}  # no embeddings given
    assert set(report["fetch_fill_ms"]) <= {"level0", "level1"} and report["fetch_fill_ms"]
    assert all(stats["p50"] > 0 for stats in report["fetch_fill_ms"].values())
    for rate in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        assert len(report[rate]["runs"]) == 2 and report[rate]["mean"] > 0
    assert report["distinct_paths"] == len({tuple(c["path"]) for c in checks_of(bundles["int8"])[:3]})


def test_corrupt_block_is_refused_naming_the_file(runner, bundles, tmp_path):
    bundle = copy_bundle(bundles["int8"], tmp_path)
    block = bundle / "bank" / "level1" / "node000002.hmb"
    data = bytearray(block.read_bytes())
    data[4096 + 10] ^= 0xFF  # a payload byte: header intact, CRC-32 wrong
    block.write_bytes(bytes(data))
    run_native_runner(runner, bundle, fills=[[0, 1]])  # other blocks still load
    with pytest.raises(NativeError, match=rf"{block}: block \(level 1, node 2\): checksum mismatch"):
        run_native_runner(runner, bundle, fills=[[0, 2]])


def test_crc_preserving_block_forgery_is_read_unsigned_and_refused_signed_with_the_key(runner, bundles, tmp_path):
    """A payload edit that keeps the CRC-32 passes the header and CRC checks. Unsigned, that is all a verified read
    checks (whoever edits a block can rewrite the index and seal too: the trust model); opened with the signer's
    key, the index is authenticated and each block's sha256 refuses it -- the same rule as the Python loader."""
    bundle = copy_bundle(bundles["int8"], tmp_path)
    generate_key(tmp_path / "key.pem", tmp_path / "key.pub")
    sign_bundle(bundle, tmp_path / "key.pem")
    block = bundle / "bank" / "level1" / "node000002.hmb"
    data = bytearray(block.read_bytes())
    want = zlib.crc32(data[4096:])
    data[4096 + 20] ^= 0xFF
    data[4096 + 32 : 4096 + 36] = crc_patch(bytes(data[4096:]), 32, want)
    assert zlib.crc32(data[4096:]) == want
    block.write_bytes(bytes(data))
    pristine = run_native_runner(runner, bundles["int8"], fills=[[0, 2]], dump_slot=tmp_path / "pristine.bin")
    forged = run_native_runner(runner, bundle, fills=[[0, 2]], dump_slot=tmp_path / "forged.bin")
    assert pristine["fills"][0]["levels_changed"] == forged["fills"][0]["levels_changed"]
    assert (tmp_path / "pristine.bin").read_bytes() != (tmp_path / "forged.bin").read_bytes()  # read, as documented
    run_native_runner(runner, bundle, fills=[[0, 1]], verify_key=tmp_path / "key.pub")  # other blocks still load
    with pytest.raises(NativeError, match=rf"{block}: block \(level 1, node 2\): checksum mismatch \(payload sha256"):
        run_native_runner(runner, bundle, fills=[[0, 2]], verify_key=tmp_path / "key.pub")


def test_signed_index_is_checked_even_in_trusted_storage_mode(runner, bundles, tmp_path):
    """Trusted storage skips the open-time file hashes, but a keyed open still checks the index's bytes against
    the signed manifest's sha256: the per-block sha256s it authenticates are only as good as that check."""
    bundle = copy_bundle(bundles["int8"], tmp_path)
    index = sign_and_edit_index(bundle, tmp_path)
    run_native_runner(runner, bundle, fills=[[0, 2]], verify_files=False)  # unkeyed trusted storage: opens
    with pytest.raises(NativeError, match=rf"{index}: sha256 differs from the signed manifest's"):
        run_native_runner(runner, bundle, fills=[[0, 2]], verify_files=False, verify_key=tmp_path / "key.pub")


def test_truncated_block_is_refused_naming_the_file(runner, bundles, tmp_path):
    bundle = copy_bundle(bundles["int4-g32"], tmp_path)
    block = bundle / "bank" / "level0" / "node000001.hmb"
    size = block.stat().st_size
    block.write_bytes(block.read_bytes()[: size - 100])
    with pytest.raises(NativeError, match=rf"{block}: truncated: block \(level 0, node 1\).*file has {size - 100}"):
        run_native_runner(runner, bundle, fills=[[1, 3]])


def swap_levels(slot: dict) -> str:
    ranges = slot["tensors"][1]["level_ranges"]
    ranges[0], ranges[1] = ranges[1], ranges[0]  # mem0_down's levels swapped
    return r"slot.tensors\[1\].level_ranges\[0\]"


def swap_sources(slot: dict) -> str:
    slot["tensors"][0]["sources"] = ["up", "gate"]
    return r"slot.tensors\[0\].sources"


def other_widths(slot: dict) -> str:
    slot["widths"] = [4, 8]
    return "widths"


@pytest.mark.parametrize("edit", [swap_levels, swap_sources, other_widths])
def test_mismatching_slot_contract_is_refused(runner, bundles, tmp_path, edit):
    bundle, field = with_edited_slot(bundles["int8"], tmp_path, edit)
    with pytest.raises(NativeError, match=rf"manifest.json: slot contract does not match the model config \({field}\)"):
        run_native_runner(runner, bundle)


def test_modified_file_is_refused_unless_storage_is_trusted(runner, bundles, tmp_path):
    bundle = copy_bundle(bundles["int8"], tmp_path)
    tokenizer = bundle / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace("memory", "memorx"))
    with pytest.raises(NativeError, match=rf"files do not match the manifest:\s+{tokenizer}: sha256 differs"):
        run_native_runner(runner, bundle)
    assert run_native_runner(runner, bundle, verify_files=False)["bundle"] == str(bundle)


def test_cli_native_run_replays_the_checks(runner, bundles):
    result = CliRunner().invoke(main, ["native", "run", str(bundles["int8"]), "--build-dir", str(BUILD_DIR), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["checks"]["passed"] and "bench" not in report


C_API_SCRIPT = """
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1])
class Options(ctypes.Structure):
    _fields_ = [("verify_files", ctypes.c_int), ("verify_blocks", ctypes.c_int), ("resident_levels", ctypes.c_int),
                ("cache_bytes", ctypes.c_uint64), ("threads", ctypes.c_int)]
lib.hm_default_options.restype = Options
lib.hm_last_error.restype = ctypes.c_char_p
options = lib.hm_default_options()
runtime = ctypes.c_void_p()
if lib.hm_open(sys.argv[2].encode(), ctypes.byref(options), ctypes.byref(runtime)) != 0:
    sys.exit(lib.hm_last_error().decode())
vocab, levels = lib.hm_vocab_size(runtime), lib.hm_num_levels(runtime)
logits = (ctypes.c_float * vocab)()
out = []
for check in json.loads(sys.argv[3]):
    path = (ctypes.c_int32 * levels)(*check["path"])
    assert lib.hm_set_path(runtime, path, levels, None) == 0
    prompt = (ctypes.c_int64 * len(check["prompt"]))(*check["prompt"])
    assert lib.hm_prefill(runtime, prompt, len(check["prompt"]), logits) == 0
    tokens = []
    while len(tokens) < len(check["greedy"]):
        tokens.append(max(range(vocab), key=logits.__getitem__))
        if len(tokens) < len(check["greedy"]):
            assert lib.hm_decode(runtime, tokens[-1], logits) == 0
    out.append(tokens)
bad = (ctypes.c_int32 * levels)(*([99] * levels))
assert lib.hm_set_path(runtime, bad, levels, None) == -1
out.append(lib.hm_last_error().decode())
lib.hm_close(runtime)
print(json.dumps(out))
"""


def test_c_api_generates_the_recorded_continuations(runner, bundles):
    bundle = bundles["int4-g32"]
    checks = checks_of(bundle)
    library = runner.parent / "libhm_runtime.so"
    done = subprocess.run(
        [sys.executable, "-c", C_API_SCRIPT, str(library), str(bundle), json.dumps(checks)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    *tokens, error = json.loads(done.stdout)
    assert tokens == [check["greedy"] for check in checks]
    assert "node 99 of level 0 is not a child" in error


# --- quantized slots: the fused memory kernel ------------------------------------------------------------


@pytest.mark.parametrize("strategy", FUSED)
def test_fused_bundle_golden_checks_pass_natively(runner, fused_bundles, strategy, tmp_path):
    bundle = fused_bundles[strategy]
    assert json.loads((bundle / "manifest.json").read_text())["slot"]["strategy"] == strategy
    assert_checks_pass(runner, bundle, tmp_path)


@pytest.mark.parametrize("strategy", FUSED)
def test_fused_slot_fill_is_bit_identical_to_the_python_slot_filler(runner, fused_bundles, strategy, tmp_path):
    bundle = fused_bundles[strategy]
    loader = BundleLoader(bundle, target=None)
    assert loader.filler.layout.strategy.name == strategy
    memory = loader.config.memory
    first, sibling = leaf_path(memory, 1), leaf_path(memory, 4)  # another level-0 node too
    report = run_native_runner(runner, bundle, fills=[first, sibling], dump_slot=tmp_path / "slot.bin")
    assert report["slot_strategy"] == strategy
    assert report["slot_bytes"] == sum(t.numel() * t.element_size() for t in loader.slot)
    assert [fill["levels_changed"] for fill in report["fills"]] == [[0, 1], [0, 1]]
    assert_same_bytes(tmp_path / "slot.bin", python_slot(bundle, first, sibling))


@pytest.mark.parametrize("strategy", ["graph-int4", "graph-int8", "host-fp16"])
def test_unsupported_slot_strategy_is_refused_naming_it(runner, fused_bundles, tmp_path, strategy):
    bundle = copy_bundle(fused_bundles["fused-int4"], tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["slot"]["strategy"] = strategy
    write_manifest(bundle, manifest)
    with pytest.raises(NativeError, match=rf"slot.strategy: slot strategy '{strategy}' is not supported by the native"):
        run_native_runner(runner, bundle)


def finer_gate_up_grid(slot: dict) -> str:
    slot["gate_up_group"] = 16
    return r"dtype: 'int4-gu32-d4', slot strategy fused-int4 gives 'int4-gu16-d4'"


def float32_scales(slot: dict) -> str:
    slot["tensors"][1]["dtype"] = "float32"
    return r"slot.tensors\[1\].dtype: 'float32', expected 'float16'"


def unpacked_codes(slot: dict) -> str:
    slot["tensors"][0]["shape"][2] *= 2
    return r"slot.tensors\[0\].shape"


def shifted_down_scales(slot: dict) -> str:
    ranges = slot["tensors"][3]["level_ranges"]
    ranges[0], ranges[1] = ranges[1], ranges[0]
    return r"slot.tensors\[3\].level_ranges\[0\]"


@pytest.mark.parametrize("edit", [finer_gate_up_grid, float32_scales, unpacked_codes, shifted_down_scales])
def test_mismatching_quantized_slot_contract_is_refused(runner, fused_bundles, tmp_path, edit):
    bundle, field = with_edited_slot(fused_bundles["fused-int4"], tmp_path, edit)
    with pytest.raises(NativeError, match=rf"manifest.json: slot contract does not match the model config \({field}"):
        run_native_runner(runner, bundle)


def test_bank_that_cannot_fill_the_quantized_slot_is_refused(runner, fused_bundles, checkpoint, tmp_path):
    """A fused-int8 slot copies int8 codes: an int4 bank (schema hash updated in the manifest) is refused."""
    from hm_export.bank import quantize_bank

    bundle = copy_bundle(fused_bundles["fused-int8"], tmp_path)
    shutil.rmtree(bundle / "bank")
    quantize_bank(bundle / "bank", checkpoint, "int4-g32", workers=1)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["bank"]["schema_hash"] = json.loads((bundle / "bank" / "index.json").read_text())["schema_hash"]
    manifest["files"]["bank/index.json"] = file_record(bundle, "bank/index.json")
    write_manifest(bundle, manifest)
    with pytest.raises(NativeError, match=r"index.json: level 0 \(int4-g32\) cannot fill an int8 slot"):
        run_native_runner(runner, bundle, verify_files=False)


def test_fused_kernel_is_compiled_into_the_library_only(runner):
    """The op registers from libhm_runtime.so's static initializer; hm_runner must not carry a second copy."""
    assert b"memory_swiglu.out" in (runner.parent / "libhm_runtime.so").read_bytes()
    assert b"memory_swiglu.out" not in runner.read_bytes()


# --- hostile input: refused with a message naming the file, never a crash -------------------------------------


def set_model_field(field: str, value: object):
    def edit(manifest: dict) -> None:
        manifest["model"][field] = value

    return edit


def set_prefill_method(value: object):
    def edit(manifest: dict) -> None:
        manifest["targets"]["executorch"]["decode"]["prefill_method"] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (set_model_field("vocab_size", 0), r"model.vocab_size: 0 is outside \[1, 4194304\]"),
        (set_model_field("vocab_size", -1), r"model.vocab_size: -1 is outside"),
        (set_model_field("vocab_size", 2**31), r"model.vocab_size: 2147483648 is outside"),
        (set_model_field("vocab_size", 63), r"decode.pte: method 'forward': its logits are not float32 \[1, n, 63\]"),
        (
            set_model_field("max_seq_len", 64),
            r"decode.pte: method 'forward': its tokens input holds fewer than the manifest's max_seq_len",
        ),
        (set_model_field("vocab_size", "64"), r"model.vocab_size: expected a number"),
        (set_prefill_method("nosuch"), r"decode.pte: ExecuTorch cannot load method 'nosuch'"),
        (set_prefill_method("forward"), r"decode.pte: method 'forward': its logits are not float32 \[1, 1, 64\]"),
        (set_prefill_method(3), r"prefill_method"),
    ],
)
def test_consistent_hostile_manifest_values_are_refused(runner, bundles, tmp_path, edit, message):
    """Edits with the seal recomputed (what a buggy writer or a hostile download produces): the old runtime
    crashed on vocab_size 0 (SIGFPE) and -1 or 2^31 (SIGSEGV)."""
    bundle = copy_bundle(bundles["int8"], tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    write_manifest(bundle, manifest)
    for verify in (True, False):
        with pytest.raises(NativeError, match=message) as info:
            run_native_runner(runner, bundle, checks=True, verify_files=verify, timeout=120)
        assert "signal" not in str(info.value)


@pytest.mark.parametrize("offset", [8, 20, 1000])
def test_trusted_storage_still_runs_program_verification(runner, bundles, tmp_path, offset):
    bundle = copy_bundle(bundles["int8"], tmp_path)
    program = bundle / "executorch" / "decode.pte"
    data = bytearray(program.read_bytes())
    data[offset] ^= 0xFF  # same size: only the sha256, which trusted storage skips, would see it
    program.write_bytes(bytes(data))
    with pytest.raises(NativeError, match=rf"{program}: ExecuTorch (refuses the program|cannot load method)"):
        run_native_runner(runner, bundle, checks=True, verify_files=False, timeout=120)


def test_fifos_symlinks_and_unsealed_edits_are_refused(runner, bundles, tmp_path):
    bundle = copy_bundle(bundles["int8"], tmp_path)
    block = bundle / "bank" / "level1" / "node000002.hmb"
    block.unlink()
    os.mkfifo(block)  # would block a reader that opens it plainly
    with pytest.raises(NativeError, match=rf"{block}: is a FIFO, expected a regular file"):
        run_native_runner(runner, bundle, fills=[[0, 2]], timeout=120)
    level = bundle / "bank" / "level1"
    shutil.move(level, tmp_path / "outside")
    level.symlink_to(tmp_path / "outside")
    with pytest.raises(NativeError, match=rf"{level}: is a symbolic link"):
        run_native_runner(runner, bundle, timeout=120)
    manifest = bundle / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"vocab_size": 64', '"vocab_size": 0'))  # not resealed
    with pytest.raises(NativeError, match=r"manifest.json: sha256 differs from the one sealed in .*bundle.sig"):
        run_native_runner(runner, bundle, verify_files=False, timeout=120)


def test_signed_bundles_need_the_trusted_key(runner, bundles, tmp_path):
    from hm_export.integrity import generate_key, sign_bundle

    bundle = copy_bundle(bundles["int8"], tmp_path)
    public = generate_key(tmp_path / "key.pem", tmp_path / "key.pub")
    generate_key(tmp_path / "other.pem", tmp_path / "other.pub")
    (tmp_path / "key.hex").write_text(public)
    with pytest.raises(NativeError, match=r"bundle\.sig: the bundle is not signed, and a verify key was given"):
        run_native_runner(runner, bundle, verify_key=tmp_path / "key.pub", timeout=120)
    sign_bundle(bundle, tmp_path / "key.pem")
    for key in ("key.pub", "key.hex"):  # PEM or hex
        assert run_native_runner(runner, bundle, checks=True, verify_key=tmp_path / key)["checks"]["passed"]
    with pytest.raises(NativeError, match="signature does not verify with the given key"):
        run_native_runner(runner, bundle, verify_key=tmp_path / "other.pub", timeout=120)


def test_a_build_directory_of_another_checkout_is_configured_again(tmp_path, monkeypatch):
    """A build directory configured for another source tree (a worktree, a moved clone) would build that tree's
    runtime: it is configured again for this one; one configured for this checkout is only built."""
    import hm_export.native as native

    steps: list[str] = []
    monkeypatch.setattr(native, "_check_call", lambda command, step: steps.append(step))
    cache = tmp_path / "CMakeCache.txt"
    cache.write_text("CMAKE_HOME_DIRECTORY:INTERNAL=/elsewhere/runtime_stubs/cpp\nHM_KERNELS_DIR:PATH=/elsewhere/kernels\n")
    (tmp_path / "CMakeFiles").mkdir()
    native.build_native_runner(tmp_path)
    assert steps == ["configure", "build"] and not cache.exists() and not (tmp_path / "CMakeFiles").exists()
    cache.write_text(
        f"CMAKE_HOME_DIRECTORY:INTERNAL={native.NATIVE_SOURCE}\nHM_KERNELS_DIR:PATH={native.KERNELS_SOURCE}\n"
    )
    steps.clear()
    native.build_native_runner(tmp_path)
    assert steps == ["build"] and cache.exists()
