"""``hm-export verify`` and ``check`` against the float checkpoint, not against the bundle's own memory.

On the session's decode bundle (ExecuTorch, ONNX, Core ML; float32 bank) and on copies of it whose bank is
rewritten (``rebank``): a correct bundle passes with export, quantization and end-to-end error reported
separately; a bank written wrong but consistently (one block holding another block's values, valid checksums,
checks recorded from it) fails both commands, naming the block; a quantized bank shows its quantization error
against the checkpoint; a damaged block fails ``check`` naming its file (blocks the checks do not use only
with ``--full``); a target whose numerics cannot run here exits 3 unless ``--allow-skipped``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import DECODE_CONTEXTS, rebank, rehash

from hm_export.bank import BankReader
from hm_export.bank.accuracy import load_dequantized_bank
from hm_export.checkpoint import load_checkpoint
from hm_export.checks import CHECKS_FILE, run_checks
from hm_export.cli import main
from hm_export.model import assemble_path
from hm_export.reference import PROGRAM_TOLERANCE, default_tolerances, scheme_tolerance
from hm_export.router import MiniLMEmbedder
from hm_export.verify import verify_bundle

pytestmark = pytest.mark.slow  # the session's decode bundle: about a minute of exports


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fidelity") / "contexts.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in DECODE_CONTEXTS))
    return path


@pytest.fixture(scope="module")
def routes(decode_bundle) -> list[tuple[int, ...]]:
    """The checkpoint tree's route of every context, computed here (MiniLM + the checkpoint's centroids)."""
    ckpt = load_checkpoint(decode_bundle[0])
    embeddings = MiniLMEmbedder().embed([item["context"] for item in DECODE_CONTEXTS])
    return [tuple(int(n) for n in path) for path in ckpt.tree.route(embeddings)]


@pytest.fixture(scope="module")
def wrong_block(decode_bundle, routes) -> tuple[int, int, int]:
    """(level 1, the node of context 0's path, another node): the block a consistent-but-wrong bank gets wrong."""
    node = routes[0][1]
    return 1, node, (node + 1) % 6


def checks_through(routes: list[tuple[int, ...]], level: int, node: int) -> set[int]:
    return {i for i, path in enumerate(routes) if path[level] == node}


@pytest.mark.parametrize("target", ["executorch", "onnx"])
def test_a_correct_float32_bundle_passes_with_every_figure(decode_bundle, contexts, routes, target):
    checkpoint, bundle = decode_bundle
    report = verify_bundle(bundle, checkpoint, contexts, target=target)
    assert report.status == "pass" and report.failures == [] and report.passed
    assert [r.path for r in report.results] == [r.checkpoint_path for r in report.results] == routes
    assert report.distinct_paths == len(set(routes))
    ckpt = load_checkpoint(checkpoint)
    tokenizer = ckpt.tokenizer
    for result, item in zip(report.results, DECODE_CONTEXTS):
        ids = tokenizer.encode(item["text"]).ids
        with torch.no_grad():  # the float checkpoint, computed here from its own memory of the path
            want = ckpt.model(torch.tensor([ids]), assemble_path(ckpt.model, result.path))[0]
        assert result.tokens == len(ids) and result.scored_tokens == len(ids) - 1
        assert result.logit_scale == pytest.approx(float(want.abs().max()), rel=1e-6)
        nll = torch.nn.functional.cross_entropy(want[:-1], torch.tensor(ids[1:]))
        assert result.perplexity["checkpoint"] == pytest.approx(float(nll.exp()), rel=1e-5)
        # A float32 bank is the checkpoint's memory exactly: no memory or quantization error at all.
        assert result.memory_error == [0.0, 0.0]
        assert result.quantization.max_abs == 0.0 and result.quantization.top1 == 1.0
        limit = PROGRAM_TOLERANCE["float32"].limit(result.logit_scale)
        assert 0 < result.export.max_abs <= limit and result.end_to_end.max_abs <= limit
        assert result.export.max_rel == pytest.approx(result.export.max_abs / result.logit_scale)
    assert report.export["passed"] and report.quantization["passed"] and report.end_to_end["passed"]
    assert report.tolerances.exact and report.tolerances.memory_rmse == (1e-6, 1e-6)


def test_verify_json_carries_every_figure(decode_bundle, contexts):
    checkpoint, bundle = decode_bundle
    result = invoke("verify", bundle, "--checkpoint", checkpoint, "--contexts", contexts, "--target", "onnx", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "pass" and report["passed"] is True and report["skipped"] is None
    for section in ("export", "quantization", "end_to_end"):
        assert {"max_abs", "max_rel", "top1", "passed"} <= set(report[section]), section
    assert set(report["perplexity"]) == {"checkpoint", "as_exported", "bundle"}
    assert report["routes"] == {"agree": 4, "disagree": [], "passed": True}
    assert report["tolerances"]["rtol"] == 1e-4 and report["tolerances"]["atol"] == 1e-5
    first = report["results"][0]
    assert {"export", "quantization", "end_to_end", "memory_error", "perplexity", "logit_scale"} <= set(first)
    # Tolerances are overridable: an export tolerance below the measured error fails.
    measured = report["export"]["max_abs"]
    assert measured > 0
    base = ["verify", bundle, "--checkpoint", checkpoint, "--contexts", contexts, "--target", "onnx", "--json"]
    failed = invoke(*base, "--rtol", 0, "--atol", measured / 2)
    assert failed.exit_code == 1 and json.loads(failed.stdout)["export"]["passed"] is False


def test_verify_of_core_ml_on_linux_is_skipped_not_passed(decode_bundle, contexts):
    checkpoint, bundle = decode_bundle
    base = ["verify", bundle, "--checkpoint", checkpoint, "--contexts", contexts, "--target", "coreml", "--json"]
    result = invoke(*base)
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "skipped" and report["passed"] is False and "macOS" in report["skipped"]
    assert report["export"] == report["end_to_end"] == {"skipped": report["skipped"]}
    # What does not need the runtime is still checked: routes, memory, quantization, the package's structure.
    assert report["quantization"]["passed"] and report["memory"]["passed"] and report["structure"]["passed"]
    assert report["precision"] == "float16" and report["tolerances"]["rtol"] == PROGRAM_TOLERANCE["float16"].rtol
    assert invoke(*base, "--allow-skipped").exit_code == 0


def test_check_of_a_bundle_with_core_ml_on_linux_exits_3(decode_bundle):
    bundle = decode_bundle[1]
    result = invoke("check", bundle, "--json")
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "skipped" and report["passed"] is False
    assert set(report["skipped"]) == {"coreml/decode"}  # one program: the decode package serves the window
    assert invoke("check", bundle, "--allow-skipped").exit_code == 0
    assert invoke("check", bundle, "--target", "onnx").exit_code == 0


@pytest.mark.parametrize("scheme", ["float32", "int8"])
def test_a_consistent_but_wrong_bank_fails_verify_and_check(
    decode_bundle, contexts, routes, wrong_block, tmp_path, scheme
):
    checkpoint, bundle = decode_bundle
    level, node, _ = wrong_block
    wrong = rebank(bundle, checkpoint, tmp_path / "wrong", scheme, wrong_block=wrong_block)
    affected = checks_through(routes, level, node)
    assert affected and len(affected) < len(routes)  # context 0 goes through the block, some other context not
    # Everything the bundle says about itself is consistent: files, checksums, its own expected values.
    check = run_checks(wrong, ["onnx"])
    by_program = {(r.program, r.check): r for r in check.results}
    assert by_program[("files", "-")].status == by_program[("blocks", "-")].status == "pass"
    assert all(r.max_abs_diff <= 1e-4 for r in check.results if r.program in ("window", "decode"))
    # ...but not what the checkpoint says.
    assert not check.passed and check.status == "fail"
    memory = by_program[("memory", f"level{level}/node{node}")]
    assert memory.status == "fail" and f"level{level}/node{node:06d}.hmb: relative RMSE" in memory.detail
    other_blocks = [r for r in check.results if r.program == "memory" and r.check != f"level{level}/node{node}"]
    assert other_blocks and all(r.status == "pass" for r in other_blocks)
    if scheme == "float32":  # an exact memory: the distance to the checkpoint's logits must be within tolerance
        failed = {r.check for r in check.results if r.program == "decode" and r.status == "fail"}
        assert failed == {f"check{i}" for i in affected}
    result = invoke("check", wrong, "--target", "onnx")
    assert result.exit_code == 1 and f"FAIL bank/memory level{level}/node{node}" in result.stdout

    report = verify_bundle(wrong, checkpoint, contexts, target="onnx")
    assert report.status == "fail" and not report.memory["passed"]
    assert report.export["passed"]  # the programs compute exactly what the (wrong) bank holds
    assert report.memory["max_relative_rmse"][level] > 0.5  # another block's values: ~1.4
    wrong_contexts = {r.index for r in report.results if r.memory_error[level] > 0.5}
    assert wrong_contexts == affected
    assert any(f"level {level} node {node}: relative RMSE" in failure for failure in report.failures)
    if scheme == "float32":
        assert not report.quantization["passed"]


def test_an_int8_bank_reports_its_quantization_error_against_the_checkpoint(decode_bundle, contexts, tmp_path):
    checkpoint, bundle = decode_bundle
    int8 = rebank(bundle, checkpoint, tmp_path / "int8", "int8")
    report = verify_bundle(int8, checkpoint, contexts, target="executorch")
    assert report.bank_schemes == ["int8", "int8"] and not report.tolerances.exact
    assert report.tolerances.memory_rmse == (scheme_tolerance("int8").memory_rmse,) * 2
    # The as-exported reference is the eager model on the dequantized int8 memory, built here independently.
    ckpt = load_checkpoint(checkpoint)
    dequantized = load_checkpoint(checkpoint).model
    load_dequantized_bank(dequantized, BankReader(int8 / "bank"))
    tokenizer = ckpt.tokenizer
    for result, item in zip(report.results, DECODE_CONTEXTS):
        tokens = torch.tensor([tokenizer.encode(item["text"]).ids])
        with torch.no_grad():
            quantized = dequantized.forward_path(tokens, torch.tensor(result.path))[0]
            floating = ckpt.model.forward_path(tokens, torch.tensor(result.path))[0]
        assert result.quantization.max_abs == pytest.approx(float((quantized - floating).abs().max()), rel=1e-4)
        assert result.export.max_abs < 1e-4 < result.quantization.max_abs
        assert 0.001 < max(result.memory_error) < 0.02
    # Three distances, each reported on its own; export is tiny, end to end is about the quantization error.
    assert report.export["max_abs"] < 1e-4
    assert report.end_to_end["max_abs"] == pytest.approx(report.quantization["max_abs"], rel=0.01)
    assert report.perplexity["as_exported"] != report.perplexity["checkpoint"]
    assert report.quantization["perplexity_increase_pct"] == pytest.approx(
        100 * (report.perplexity["as_exported"] / report.perplexity["checkpoint"] - 1), rel=1e-6
    )
    assert report.memory["passed"] and report.export["passed"]
    # The golden checks of the int8 bundle: bundle-side within tolerance, checkpoint-side reported.
    check = run_checks(int8, ["onnx"])
    assert check.passed, [r for r in check.results if r.status != "pass"]
    decode = [r for r in check.results if r.program == "decode"]
    assert all(r.max_abs_diff < 1e-4 < r.checkpoint_max_abs_diff for r in decode)


def test_a_damaged_block_fails_check_naming_its_file(decode_bundle, routes, tmp_path):
    bundle = decode_bundle[1]
    used = {(level, path[level]) for path in routes for level in range(2)}
    unused = next((1, node) for node in range(6) if (1, node) not in used)
    for name, (level, node) in (("used", (1, routes[0][1])), ("unused", unused)):
        root = Path(shutil.copytree(bundle, tmp_path / name))
        block = root / f"bank/level{level}/node{node:06d}.hmb"
        data = bytearray(block.read_bytes())
        data[-1] ^= 0x01  # the payload's last byte: the CRC-32 no longer matches
        block.write_bytes(bytes(data))
        result = invoke("check", root, "--target", "onnx")
        full = invoke("check", root, "--target", "onnx", "--full", "--json")
        assert full.exit_code == 1
        failed = [r for r in json.loads(full.stdout)["results"] if r["program"] == "blocks"]
        assert failed[0]["status"] == "fail" and str(block) in failed[0]["detail"] and "checksum" in failed[0]["detail"]
        if name == "used":
            assert result.exit_code == 1 and f"FAIL bank/blocks level{level}/node{node}: {block}" in result.stdout
        else:
            assert result.exit_code == 0, result.output  # the checks never read it; --full does


def test_checks_record_both_references(decode_bundle, routes):
    bundle = decode_bundle[1]
    body = json.loads((bundle / CHECKS_FILE).read_text())
    scale = max(check["logit_scale"] for check in body["checks"])
    assert body["tolerance_rule"]["logit_scale"] == pytest.approx(scale, rel=1e-5)
    for precision, rule in PROGRAM_TOLERANCE.items():
        assert body["tolerance"][precision] == pytest.approx(rule.atol + rule.rtol * scale)
    assert [check["path"] for check in body["checks"]] == [list(path) for path in routes]


def test_default_tolerances_follow_the_scheme_and_the_slot():
    mixed = default_tolerances(["int8", "int4-g32"], "float32", "float32")
    assert mixed.memory_rmse == (0.02, 0.2) and mixed.max_ppl_increase_pct == 3.0 and mixed.min_top1 == 0.9
    assert not mixed.exact
    # A float16 slot rounds a float32 bank: judged as float16, not exact.
    fp16_slot = default_tolerances(["float32", "float32"], "float16", "float32")
    assert not fp16_slot.exact and fp16_slot.memory_rmse == (1e-3, 1e-3)
    assert default_tolerances(["float32"], "float32", "float16").rtol == PROGRAM_TOLERANCE["float16"].rtol
    overridden = mixed.with_overrides({"memory_rmse": 0.5, "min_top1": None, "rtol": 1e-3})
    assert overridden.memory_rmse == (0.5, 0.5) and overridden.min_top1 == 0.9 and overridden.rtol == 1e-3


def test_tampered_program_fails_verify_by_its_export_error(decode_bundle, contexts, tmp_path):
    """1 % on the tied embedding of the ONNX program: an export error far beyond tolerance, while the
    quantization error (no bundle runtime involved) stays zero."""
    import numpy as np
    import onnx

    checkpoint, bundle = decode_bundle
    root = Path(shutil.copytree(bundle, tmp_path / "copy"))
    data_file = "onnx/decode.onnx.data"
    graph = onnx.load(str(root / "onnx/decode.onnx"), load_external_data=False).graph
    embedding = max(graph.initializer, key=lambda t: int(np.prod(t.dims)))
    where = {entry.key: int(entry.value) for entry in embedding.external_data if entry.key in ("offset", "length")}
    raw = bytearray((root / data_file).read_bytes())
    span = slice(where["offset"], where["offset"] + where["length"])
    raw[span] = (np.frombuffer(bytes(raw[span]), dtype="<f4") * 1.01).astype("<f4").tobytes()
    (root / data_file).write_bytes(bytes(raw))
    rehash(root, data_file)
    report = verify_bundle(root, checkpoint, contexts, target="onnx")
    assert report.status == "fail" and not report.export["passed"]
    assert report.export["max_rel"] > 100 * report.tolerances.rtol
    assert report.quantization["max_abs"] == 0.0 and report.memory["passed"]


def test_a_bundle_tokenizer_that_disagrees_with_the_checkpoint_fails(decode_bundle, contexts, tmp_path):
    checkpoint, bundle = decode_bundle
    root = Path(shutil.copytree(bundle, tmp_path / "copy"))
    tokenizer = json.loads((root / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]
    (root / "tokenizer.json").write_text(json.dumps(tokenizer))
    rehash(root, "tokenizer.json")
    report = verify_bundle(root, checkpoint, contexts, target="onnx")
    with_cat_or_dog = [i for i, item in enumerate(DECODE_CONTEXTS) if {"cat", "dog"} & set(item["text"].split())]
    assert report.status == "fail" and report.tokenizer["disagree"] == with_cat_or_dog
    assert report.export["passed"]  # the numbers are measured on the checkpoint's token ids
