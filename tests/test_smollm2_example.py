"""The small-scale twin of ``examples/smollm2_stdlib/run.py``: the same script, end to end, on a tiny Llama
written as a GGUF file instead of SmolLM2 (fetch, stdlib corpus, attach, train, evaluate, export, verify).

Kept cheap for CI: a few documents and steps, the ONNX target only (every family's ExecuTorch export is
covered by ``tests/test_hf.py``, the GGUF intake by ``tests/test_hf_gguf.py``)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from gguf_fixture import byte_bpe, tiny_llama, write_llama_gguf  # noqa: E402

from hm_export.corpus import stdlib_documents  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "smollm2_stdlib" / "run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("smollm2_stdlib_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_example_runs_end_to_end_on_a_tiny_gguf_host(tmp_path: Path) -> None:
    tokenizer = byte_bpe(list(stdlib_documents().values())[:30], 384)
    model = tiny_llama(tokenizer.get_vocab_size())
    gguf_path = write_llama_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    args = ["--gguf", str(gguf_path), "--work", str(tmp_path / "work"), "--eval-json", str(tmp_path / "eval.json")]
    args += ["--docs", "10", "--branching", "2,2", "--widths", "4,4", "--layers", "1", "--seq-len", "32"]
    args += ["--steps", "4", "--eval-every", "2", "--validation-docs", "0.2", "--validation-limit", "2"]
    args += ["--eval-windows", "4", "--verify-contexts", "2", "--targets", "onnx"]
    args += ["--no-router-program"]  # the router programs are tested by tests/test_router_program.py
    result = load_script().main(args)

    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(result))
    assert result["host"]["format"] == "gguf" and result["host"]["file_type"] == "Q8_0"
    assert result["memory"]["share_of_ffn_width"] == 8 / 64 and result["memory"]["layers"] == "1 of 2 (1..1)"
    assert result["corpus"]["training_documents"] == 10 and result["corpus"]["never_trained_documents"] > 0
    assert result["training"]["steps"] == 4 and result["training"]["kept_step"] in (0, 2, 4)
    for name in ("heldout_windows_of_training_documents", "never_trained_documents"):
        evaluated = result["evaluation"][name]
        assert 0 < evaluated["windows"] <= 4 and evaluated["scored_tokens_per_window"] == 32
        perplexities = [evaluated[c]["perplexity"] for c in ("no_memory", "routed_memory", "wrong_path_memory")]
        assert all(math.isfinite(p) and p > 1 for p in perplexities)
        change = evaluated["routed_memory"]["perplexity"] / evaluated["no_memory"]["perplexity"] - 1
        assert evaluated["routed_vs_no_memory_perplexity_change"] == pytest.approx(change, abs=1e-3)
    exported = result["export"]
    assert exported["bank_scheme"] == "int4-g32" and exported["golden_checks"]["passed"]
    assert list(exported["verify"]) == ["onnx"]
    verified = exported["verify"]["onnx"]
    assert verified["passed"] and verified["contexts"] == 2 and verified["export"]["max_rel"] <= 1e-4
    manifest = json.loads((tmp_path / "work" / "bundle" / "manifest.json").read_text())
    assert manifest["source"]["host"]["format"] == "gguf" and manifest["source"]["anchor_dtype"] == "float32"
