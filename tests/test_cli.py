"""The ``hm-export`` command line on a tiny checkpoint: export, inspect, verify, run, and its exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import tiny_checkpoint, tiny_config

from hm_export.bundle import write_manifest
from hm_export.checkpoint import Checkpoint, load_checkpoint
from hm_export.cli import main
from hm_export.router import MiniLMEmbedder

SEQ = 16
CONTEXTS = [
    {"text": "the cat sat on the mat ."},
    {"text": "a dog sat on a tree , the memory", "context": "dogs and trees"},
    {"tokens": [1, 3, 5, 6, 1, 7, 10]},
]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def checkpoint_dir(workdir: Path) -> Path:
    return tiny_checkpoint(workdir, name="ckpt", cfg=tiny_config(max_seq_len=SEQ), seed=5)


@pytest.fixture(scope="module")
def ckpt(checkpoint_dir: Path) -> Checkpoint:
    return load_checkpoint(checkpoint_dir)


@pytest.fixture(scope="module")
def exported(workdir: Path, checkpoint_dir: Path) -> tuple[Path, Result]:
    bundle = workdir / "bundle"
    return bundle, invoke("export", checkpoint_dir, bundle, "--no-router-program", "--json")


@pytest.fixture(scope="module")
def bundle(exported) -> Path:
    path, result = exported
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def contexts(workdir: Path) -> Path:
    path = workdir / "contexts.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CONTEXTS))
    return path


@pytest.mark.slow
def test_export_json_writes_a_bundle(exported):
    bundle, result = exported
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout is the JSON report and nothing else
    assert report["bundle"] == str(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert report["slot_schema_hash"] == manifest["slot"]["schema_hash"]
    # Every size reported is the file's size on disk, and the manifest lists every file the report sizes.
    sizes = dict(report["sizes"])
    bank_files = [p for p in (bundle / "bank").rglob("*") if p.is_file()]
    assert sizes.pop("bank_total") == sum(p.stat().st_size for p in bank_files)
    assert sizes == {relative: (bundle / relative).stat().st_size for relative in manifest["files"]}
    assert report["targets"]["executorch"]["decode"]["delegation"]["slot_inputs_delegated"] is True
    assert report["seconds"]["total"] > 0


@pytest.mark.slow
def test_export_refuses_to_overwrite_without_the_flag(bundle, checkpoint_dir):
    before = (bundle / "manifest.json").read_bytes()
    result = invoke("export", checkpoint_dir, bundle, "--no-router-program", "--json")
    assert result.exit_code == 2
    assert "already exists" in result.stderr and str(bundle) in result.stderr
    assert result.stdout == ""
    assert (bundle / "manifest.json").read_bytes() == before


@pytest.mark.slow
def test_inspect_json(bundle):
    result = invoke("inspect", bundle, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert summary["model"]["d_model"] == 32 and summary["model"]["n_kv_heads"] == 2
    assert summary["memory"]["branching"] == [2, 3] and summary["memory"]["widths"] == [8, 4]
    assert summary["slot"]["seq_len"] == SEQ
    assert summary["slot"]["schema_hash"] == manifest["slot"]["schema_hash"]
    assert [(i["name"], i["shape"]) for i in summary["slot"]["inputs"]] == [
        ("mem0_gate_up", [1, 32, 24]),
        ("mem0_down", [1, 12, 32]),
        ("mem1_gate_up", [1, 32, 24]),
        ("mem1_down", [1, 12, 32]),
    ]
    bank_bytes = sum(p.stat().st_size for p in (bundle / "bank").rglob("*") if p.is_file())
    assert summary["bank"]["bytes_on_disk"] == bank_bytes
    assert summary["files"] == manifest["files"]
    assert summary["targets"]["executorch"]["files"] == {} and summary["targets"]["executorch"]["window"] == "decode"


def test_inspect_a_directory_that_is_not_a_bundle(tmp_path):
    result = invoke("inspect", tmp_path, "--json")
    assert result.exit_code == 2
    assert f"{tmp_path / 'manifest.json'}: missing" in result.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("slot"), "malformed manifest, missing ['slot']"),
        (lambda m: m["bank"].update(dir="../.."), "unsafe path '../..'"),
    ],
)
@pytest.mark.slow
def test_inspect_a_malformed_manifest_exits_2(bundle, tmp_path, edit, message):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    write_manifest(copy, manifest)  # a consistent edit: the seal is recomputed
    result = invoke("inspect", copy, "--json")
    assert result.exit_code == 2
    assert str(copy / "manifest.json") in result.stderr and message in result.stderr


@pytest.mark.slow
def test_verify_json_passes_on_a_fresh_bundle(bundle, checkpoint_dir, contexts):
    result = invoke("verify", bundle, "--checkpoint", checkpoint_dir, "--contexts", contexts, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["status"] == "pass" and report["contexts"] == len(CONTEXTS)
    assert report["quantization"]["max_abs"] == 0.0 and report["end_to_end"]["top1"] == 1.0
    assert [r["tokens"] for r in report["results"]] == [7, 9, 7]
    human = invoke("verify", bundle, "--checkpoint", checkpoint_dir, "--contexts", contexts)
    assert human.exit_code == 0 and human.stdout.startswith("PASS: executorch, 3 contexts")
    assert "quantization  max |diff| 0 " in human.stdout


@pytest.mark.slow
def test_verify_exits_1_beyond_tolerance(bundle, checkpoint_dir, contexts):
    base = ["verify", bundle, "--checkpoint", checkpoint_dir, "--contexts", contexts, "--json"]
    first = json.loads(invoke(*base).stdout)
    # An unreachable top-1 requirement always fails.
    result = invoke(*base, "--min-top1", "1.1")
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["passed"] is False
    # So does an export tolerance below the measured difference (XNNPACK is not bit-exact with eager).
    assert first["export"]["max_abs"] > 0
    result = invoke(*base, "--rtol", "0", "--atol", str(first["export"]["max_abs"] / 2))
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is False and report["export"]["passed"] is False and report["quantization"]["passed"]


@pytest.mark.slow
def test_verify_rejects_a_bad_contexts_file(bundle, checkpoint_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"neither": 1}\n')
    result = invoke("verify", bundle, "--checkpoint", checkpoint_dir, "--contexts", bad, "--json")
    assert result.exit_code == 2
    assert f"{bad}:2" in result.stderr


@pytest.mark.slow
def test_run_json_continues_the_prompt(bundle, ckpt):
    context, prompt, new = "the memory tree", "the cat sat on", 6
    result = invoke("run", bundle, "--context", context, "--prompt", prompt, "--max-new-tokens", new, "--json")
    assert result.exit_code == 0, result.output
    completion = json.loads(result.stdout)
    path = tuple(completion["context_path"])
    # Routed with MiniLM through the bundle's router tree...
    assert path == tuple(int(n) for n in ckpt.tree.route(MiniLMEmbedder().embed([context]))[0])
    assert completion["slot_update"]["levels_changed"] == [0, 1]
    # ...and continued exactly as the eager model does greedily on that path.
    tokens = ckpt.tokenizer.encode(prompt).ids
    assert completion["prompt_tokens"] == len(tokens) == 4
    with torch.no_grad():
        for _ in range(new):
            padded = torch.zeros(1, SEQ, dtype=torch.long)
            padded[0, : len(tokens)] = torch.tensor(tokens)
            logits = ckpt.model.forward_path(padded, torch.tensor(path))[0, len(tokens) - 1]
            tokens.append(int(logits.argmax()))
    assert completion["new_tokens"] == tokens[4:]
    assert len(completion["new_tokens"]) == new
    assert completion["text"] == ckpt.tokenizer.decode(completion["new_tokens"])


def test_export_of_a_missing_checkpoint_exits_2(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    result = invoke("export", missing, tmp_path / "out", "--json")
    assert result.exit_code == 2
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "out").exists()


def test_export_of_a_corrupt_checkpoint_exits_2(checkpoint_dir, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for source in checkpoint_dir.iterdir():
        (corrupt / source.name).write_bytes(source.read_bytes())
    (corrupt / "anchor.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    result = invoke("export", corrupt, tmp_path / "out", "--json")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and str(corrupt / "anchor.safetensors") in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt"]  # no temp directory left behind


def test_export_with_an_unknown_target_exits_2(checkpoint_dir, tmp_path):
    result = invoke("export", checkpoint_dir, tmp_path / "out", "--target", "tflite", "--json")
    assert result.exit_code == 2
    assert "tflite" in result.stderr


# --- a quiet, consistent command line --------------------------------------------------------------------------


def test_short_help_everywhere():
    for args in ([], ["export"], ["bank", "check"], ["native", "run"]):
        result = invoke(*args, "-h")
        assert result.exit_code == 0 and result.stdout.startswith("Usage:"), args


def test_inspect_prints_a_summary_and_json_on_request(bundle):
    result = invoke("inspect", bundle)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{bundle}: hm-export bundle v1, created ") and lines[0].endswith("not signed")
    assert "  model     vocab 64, d_model 32, 2 layers, 4/2 heads, FFN 64" in lines
    assert "  target    executorch: executorch/decode.pte" in lines  # the target's one program
    assert json.loads(invoke("inspect", bundle, "--json").stdout)["model"]["vocab_size"] == 64


def test_run_ends_with_a_newline_and_quiet_drops_the_stats(bundle):
    args = ("run", bundle, "--context", "trees", "--prompt", "the cat", "--max-new-tokens", 2)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("the cat") and result.stdout.endswith("\n")
    assert result.stderr.startswith("[path ")
    quiet = invoke("-q", *args)
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run", "{bundle}", "--context", "x", "--prompt", "bad \udcff byte"), "not valid UTF-8"),
        (("run", "{bundle}", "--context", "x", "--prompt", "x", "--target", "executorch,onnx"), "runs one target"),
        (("check", "{bundle}", "--target", "executorch,tflite"), "unknown ['tflite']"),
        (("verify", "{bundle}", "--checkpoint", "{bundle}", "--contexts", "{manifest}", "-n", "0"), "'-n'"),
        (("bench", "{bundle}", "--runs", "0"), "'--runs'"),
    ],
)
def test_bad_arguments_exit_2(bundle, args, message):
    result = invoke(*(a.format(bundle=bundle, manifest=bundle / "manifest.json") for a in args))
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_targets_take_comma_lists_and_repeats(bundle):
    one = json.loads(invoke("check", bundle, "--target", "executorch", "--json").stdout)
    both = invoke("check", bundle, "--target", "executorch,executorch", "-t", "executorch", "--json")
    assert both.exit_code == 0 and json.loads(both.stdout)["summary"] == one["summary"]


def test_bench_plot_into_a_missing_folder_fails_before_the_benchmark(bundle, tmp_path):
    target = tmp_path / "no-such-folder" / "latency.png"
    result = invoke("bench", bundle, "--plot", target)
    assert result.exit_code == 2 and result.stdout == ""
    assert (
        result.stderr
        == f"error: {target}: cannot write the plot there (folder missing, not writable, or a directory)\n"
    )


def test_a_missing_extra_is_one_line_naming_it(checkpoint_dir, tmp_path, monkeypatch):
    import hm_export.targets as targets

    real = targets.importlib.util.find_spec
    monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    result = invoke("export", checkpoint_dir, tmp_path / "out", "--target", "executorch,onnx")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert result.stderr == "error: the onnx target needs onnxruntime: pip install 'hm-export[onnx]'\n"


def test_export_prints_no_third_party_line_on_stderr(checkpoint_dir, tmp_path):
    """A real process (C++ and Python noise included): stdout the one result line, stderr empty."""
    out = tmp_path / "quiet"
    hm_export = Path(sys.executable).parent / "hm-export"
    args = [hm_export, "export", checkpoint_dir, out, "--target", "onnx", "--no-decode", "--checks", "0"]
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "default"}
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith(f"wrote {out} in ") and done.stdout.count("\n") == 1


def test_choice_lists_come_from_the_registries() -> None:
    """Every option choosing among registered names reads them from the registry (no list copied into cli.py),
    and only when click needs them: importing the CLI imports no torch."""
    from hm_export.anchor_quant import PRESETS
    from hm_export.bench import CACHE_POLICIES
    from hm_export.checkpoint import STORAGE_DTYPES
    from hm_export.cli import RegistryChoice
    from hm_export.kernels.strategies import STRATEGIES
    from hm_export.targets.coreml import ANCHOR_COMPRESSION

    choices = {
        f"{command.name} {param.name}": list(param.type.choices)
        for command in [*main.commands.values(), *main.commands["hf"].commands.values()]
        for param in getattr(command, "params", [])
        if isinstance(param.type, RegistryChoice)
    }
    assert choices["export slot_strategy"] == ["auto", *STRATEGIES]
    assert choices["export anchor_quant"] == list(PRESETS)
    assert choices["export coreml_compress_anchor"] == list(ANCHOR_COMPRESSION)
    assert choices["bench cache"] == list(CACHE_POLICIES)
    assert choices["attach host_dtype"] == list(STORAGE_DTYPES)
    code = "import sys, hm_export.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
