"""Golden checks in the bundle (``checks/``) and ``hm-export check`` / ``hm-export bench``.

A fresh bundle passes on every target that runs here (Core ML: structure checked, numerics skipped); a
tampered checks file, tampered expected logits or a tampered program fail with a message naming the problem.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import DECODE_CONTEXTS, rehash, tiny_tokenizer
from safetensors.torch import load_file, save_file

from hm_export.bundle import write_manifest
from hm_export.checks import (
    CHECKS_FILE,
    EXPECTED_FILE,
    check_lengths,
    compare_greedy,
    derive_contexts,
    run_checks,
)
from hm_export.cli import main


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


@pytest.fixture(scope="module")
def bundle(decode_bundle) -> Path:
    return decode_bundle[1]


@pytest.mark.slow
def test_checks_are_recorded_from_the_given_contexts(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["checks"] == {"file": CHECKS_FILE, "expected": EXPECTED_FILE, "count": 4, "new_tokens": 12}
    assert CHECKS_FILE in manifest["files"] and EXPECTED_FILE in manifest["files"]
    body = json.loads((bundle / CHECKS_FILE).read_text())
    tokenizer = tiny_tokenizer()
    assert [c["context"] for c in body["checks"]] == [item["context"] for item in DECODE_CONTEXTS]
    assert [c["prompt"] for c in body["checks"]] == [tokenizer.encode(item["text"]).ids for item in DECODE_CONTEXTS]
    assert all(len(c["greedy"]) == len(c["margins"]) == 12 for c in body["checks"])
    expected = load_file(str(bundle / EXPECTED_FILE))
    n = len(body["checks"][0]["prompt"])
    assert expected["check0.topk_ids"].shape == (n, 8) and expected["check0.last_logits"].shape == (64,)


@pytest.mark.slow
def test_fresh_bundle_passes_on_every_target_that_runs_here(bundle):
    report = run_checks(bundle)
    assert report.status == "skipped" and not report.passed  # Core ML's numerics cannot run here
    assert [r for r in report.results if r.status == "fail"] == []
    summary = report.summary()
    for name in ("executorch/window", "executorch/decode", "onnx/window", "onnx/decode", "router/route"):
        assert summary[name] == {"pass": 4, "fail": 0, "skipped": 0}, name
    blocks = {
        (level, path[level])
        for path in (c["path"] for c in json.loads((bundle / CHECKS_FILE).read_text())["checks"])
        for level in range(2)
    }
    assert summary["bank/blocks"] == {"pass": 1, "fail": 0, "skipped": 0}
    assert summary["bank/memory"] == {"pass": len(blocks), "fail": 0, "skipped": 0}
    assert summary["coreml/structure"] == {"pass": 2, "fail": 0, "skipped": 0}  # window and decode packages
    assert summary["coreml/decode"] == {"pass": 0, "fail": 0, "skipped": 4}
    decode = [r for r in report.results if r.program == "decode" and r.status == "pass"]
    assert all(r.tokens_matched == 12 and r.max_abs_diff < 1e-4 for r in decode)
    result = invoke("check", bundle, "--target", "onnx", "--json")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["summary"]) == {
        "bundle/files",
        "bank/blocks",
        "bank/memory",
        "router/route",
        "onnx/window",
        "onnx/decode",
    }


@pytest.mark.slow
def test_tampered_checks_file_fails_naming_it(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path)
    body = json.loads((root / CHECKS_FILE).read_text())
    tolerance = body["tolerance"]["float32"]
    # The first check whose first greedy token is no near-tie: a changed token there must fail.
    index = next(i for i, c in enumerate(body["checks"]) if c["margins"][0] > 2 * tolerance)
    check = body["checks"][index]
    check["greedy"][0] += 1
    (root / CHECKS_FILE).write_text(json.dumps(body))
    result = invoke("check", root, "--target", "executorch")
    assert result.exit_code == 1
    assert f"FAIL bundle/files -: {root / CHECKS_FILE}: " in result.stdout  # size or sha256 differs
    # With the manifest edited to match, the replay itself catches it.
    rehash(root, CHECKS_FILE)
    report = run_checks(root, ["executorch"])
    failed = [r for r in report.results if r.status == "fail"]
    assert {(r.program, r.check) for r in failed} == {("decode", check["name"])}
    want, got = check["greedy"][0], check["greedy"][0] - 1
    assert failed[0].detail.endswith(f"greedy token 0 is {got}, expected {want} (margin {check['margins'][0]:.3g})")


@pytest.mark.slow
def test_tampered_expected_logits_fail_beyond_tolerance(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path)
    expected = load_file(str(root / EXPECTED_FILE))
    expected["check2.last_logits"] = expected["check2.last_logits"] + 0.01
    save_file(expected, str(root / EXPECTED_FILE))
    rehash(root, EXPECTED_FILE)
    report = run_checks(root, ["executorch", "onnx"])
    failed = {(r.target, r.program, r.check) for r in report.results if r.status == "fail"}
    assert failed == {(t, p, "check2") for t in ("executorch", "onnx") for p in ("window", "decode")}
    detail = next(r.detail for r in report.results if r.status == "fail")
    tolerance = json.loads((root / CHECKS_FILE).read_text())["tolerance"]["float32"]
    assert f"(last-position logits) beyond tolerance {tolerance:g}" in detail and not report.passed


@pytest.mark.slow
def test_tampered_program_fails_only_where_it_runs(bundle, tmp_path):
    import onnx

    root = copy_bundle(bundle, tmp_path)
    data_file = "onnx/decode.onnx.data"
    graph = onnx.load(str(root / "onnx/decode.onnx"), load_external_data=False).graph
    embedding = max(graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the tied embedding [vocab, d]
    where = {entry.key: int(entry.value) for entry in embedding.external_data if entry.key in ("offset", "length")}
    raw = bytearray((root / data_file).read_bytes())
    span = slice(where["offset"], where["offset"] + where["length"])
    raw[span] = (np.frombuffer(bytes(raw[span]), dtype="<f4") * 1.01).astype("<f4").tobytes()  # 1 % off
    (root / data_file).write_bytes(bytes(raw))
    rehash(root, data_file)
    result = invoke("check", root, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["summary"]["onnx/decode"]["fail"] == 4
    for name in ("executorch/window", "executorch/decode", "onnx/window"):
        assert report["summary"][name]["fail"] == 0, name


@pytest.mark.slow
def test_bundle_without_checks_is_refused(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["checks"]
    write_manifest(root, manifest)
    result = invoke("check", root)
    assert result.exit_code == 2 and "has no golden checks" in result.stderr


def test_near_ties_stop_the_comparison_instead_of_failing():
    check = {"greedy": [5, 6, 7, 8], "margins": [1.0, 1.0, 0.0015, 1.0]}
    assert compare_greedy([5, 6, 7, 8], check, 1e-3) == (True, "4 greedy tokens equal", 4)
    ok, detail, matched = compare_greedy([5, 6, 9, 9], check, 1e-3)
    assert ok and matched == 2 and "near-tie" in detail
    ok, detail, matched = compare_greedy([5, 9, 7, 8], check, 1e-3)
    assert not ok and matched == 1 and detail == "greedy token 1 is 9, expected 6 (margin 1)"
    assert compare_greedy([5, 6], check, 1e-3)[0] is False


def test_derived_contexts_are_deterministic_and_fit_the_programs():
    tokenizer = tiny_tokenizer()
    first, second = derive_contexts(tokenizer, 3, 10), derive_contexts(tokenizer, 3, 10)
    assert first == second and len(first) == 3
    assert all(len(c["tokens"]) == 10 and max(c["tokens"]) < tokenizer.get_vocab_size() for c in first)
    assert all(c["context"] == tokenizer.decode(c["tokens"]) for c in first)
    assert check_lengths(seq_len=128, max_seq_len=128, new_tokens=16) == (32, 16)
    assert check_lengths(seq_len=16, max_seq_len=16, new_tokens=16) == (8, 8)


BENCH_FIELDS = {
    "bundle",
    "target",
    "program",
    "host",
    "threads",
    "runs",
    "contexts",
    "distinct_paths",
    "prompt_tokens",
    "new_tokens",
    "cache_policy",
    "route_ms",
    "fetch_fill_ms",
    "ttft_after_switch_ms",
    "ttft_breakdown_ms",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "decode_step_ms",
    "peak_rss_mb",
}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["executorch", "onnx"])
def test_bench_json_reports_every_field(bundle, tmp_path, target):
    plot = tmp_path / "bench.png"
    result = invoke(
        "bench", bundle, "--target", target, "--runs", 2, "-n", 3, "--new-tokens", 6, "--json", "--plot", plot
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == BENCH_FIELDS
    assert report["program"] == "decode" and report["runs"] == 2 and report["contexts"] == 3
    assert set(report["fetch_fill_ms"]) <= {"level0", "level1"} and report["fetch_fill_ms"]
    for stats in (report["route_ms"], report["ttft_after_switch_ms"], report["decode_step_ms"]):
        assert stats["n"] > 0 and 0 < stats["p50"] <= stats["p99"]
    for rate in (report["prefill_tokens_per_s"], report["decode_tokens_per_s"]):
        assert len(rate["runs"]) == 2 and rate["mean"] > 0 and rate["sd"] >= 0
    assert set(report["ttft_breakdown_ms"]) == {"route", "fetch_fill", "prefill", "first_sample"}
    assert report["peak_rss_mb"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = invoke("bench", bundle, "--target", target, "--runs", 1, "-n", 2, "--new-tokens", 4)
    assert table.exit_code == 0 and "first token after context switch" in table.stdout


@pytest.mark.slow
def test_checks_use_the_bundles_quantized_memory(decode_bundle, tmp_path):
    """With an int8 bank the bundle's expected values are the eager model's on the int8 memory (built here from
    the bank, independently of the recorder) and the checkpoint's are its float memory's: checks still pass."""
    from hm_export.bank import BankReader
    from hm_export.bank.accuracy import load_dequantized_bank
    from hm_export.checkpoint import load_checkpoint
    from hm_export.export import ExportRecipe, export_bundle

    bundle = tmp_path / "int8"
    export_bundle(
        decode_bundle[0], bundle, ExportRecipe(targets=("onnx",), bank_scheme="int8", checks=2, router_program=False)
    )
    report = run_checks(bundle)
    assert report.passed and report.summary()["onnx/decode"]["pass"] == 2
    body = json.loads((bundle / CHECKS_FILE).read_text())
    assert body["bank_scheme"] == "int8"
    expected = load_file(str(bundle / EXPECTED_FILE))
    ckpt = load_checkpoint(decode_bundle[0])
    dequantized = load_checkpoint(decode_bundle[0]).model
    load_dequantized_bank(dequantized, BankReader(bundle / "bank"))
    for index, check in enumerate(body["checks"]):
        tokens, path = torch.tensor([check["prompt"]]), torch.tensor(check["path"])
        with torch.no_grad():
            quantized = dequantized.forward_path(tokens, path)[0]
            floating = ckpt.model.forward_path(tokens, path)[0]
        torch.testing.assert_close(expected[f"check{index}.last_logits"], quantized[-1], rtol=0, atol=1e-5)
        torch.testing.assert_close(expected[f"float.check{index}.last_logits"], floating[-1], rtol=0, atol=1e-5)
        assert (quantized[-1] - floating[-1]).abs().max() > 1e-4  # the two references differ by the int8 error
