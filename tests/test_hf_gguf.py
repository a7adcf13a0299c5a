"""GGUF intake: a tiny Llama written as llama.cpp writes GGUF files, read back as a host (weights, tokenizer,
provenance), attached with ``hm-export hf attach``, and unsupported files refused before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from gguf_fixture import byte_bpe, tiny_llama, write_llama_gguf  # noqa: E402

from hm_export.checkpoint import load_checkpoint  # noqa: E402
from hm_export.cli import main  # noqa: E402
from hm_export.config import ConfigError  # noqa: E402
from hm_export.hf.intake import HostSource  # noqa: E402

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "for index, value in enumerate(values):\n    total += index * value\n",
] * 8


@pytest.fixture(scope="module")
def llama_and_tokenizer() -> tuple[torch.nn.Module, object]:
    tokenizer = byte_bpe(TEXTS, 300)
    return tiny_llama(tokenizer.get_vocab_size()), tokenizer


def test_a_float_gguf_loads_as_the_model_it_was_written_from(llama_and_tokenizer, tmp_path: Path) -> None:
    model, tokenizer = llama_and_tokenizer
    path = write_llama_gguf(model, tokenizer, tmp_path / "tiny.gguf", quantize=())
    source = HostSource.locate(path)
    assert source.read_config().model_type == "llama" and source.source_dtype(source.read_config()) == "float32"
    record = source.record()
    assert record["format"] == "gguf" and record["architecture"] == "llama" and record["tensor_types"] == {"F32": 20}
    assert record["dequantized_to"] == "float32" and len(record["sha256"]) == 64
    host = source.load_model()
    ids = torch.tensor([tokenizer.encode(TEXTS[1]).ids])
    with torch.no_grad():
        assert (host(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-5  # q/k un-permuted
    assert source.load_tokenizer().encode(TEXTS[2]).ids == tokenizer.encode(TEXTS[2]).ids


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    docs = [{"text": " ".join(TEXTS[i : i + 12]), "context": f"topic {i}"} for i in range(4)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def test_attach_takes_a_quantized_gguf_and_states_the_truth(llama_and_tokenizer, tmp_path: Path) -> None:
    model, tokenizer = llama_and_tokenizer
    folder = tmp_path / "host"
    folder.mkdir()
    path = write_llama_gguf(model, tokenizer, folder / "tiny-q8.gguf")  # ffn weights Q8_0
    args = ["--branching", "2,2", "--widths", "4,4", "--seq-len", "32", "--steps", "0", "--json"]
    out = tmp_path / "ckpt"
    result = CliRunner().invoke(main, ["hf", "attach", str(folder), str(corpus(tmp_path)), "--out", str(out), *args])
    assert result.exit_code == 2 and "pass --gguf-file" in result.output  # a folder of GGUF files is ambiguous
    result = CliRunner().invoke(
        main, ["hf", "attach", str(folder), "--gguf-file", path.name, str(corpus(tmp_path)), "--out", str(out), *args]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["host"]["file_type"] == "Q8_0"
    config = json.loads((out / "config.json").read_text())
    host = config["metadata"]["host"]
    assert host["format"] == "gguf" and host["tensor_types"] == {"F32": 14, "Q8_0": 6}
    assert host["dequantized_to"] == host["stored_as"] == "float32" and "anchor_dtype" not in config
    assert "quantization_config" not in config["model"]["host"]
    checkpoint = load_checkpoint(out)
    assert checkpoint.tokenizer.encode(TEXTS[0]).ids == tokenizer.encode(TEXTS[0]).ids  # the GGUF's tokenizer
    dequantized = HostSource.locate(path).load_model()
    ids = torch.tensor([tokenizer.encode(TEXTS[3]).ids[:32]])
    with torch.no_grad():
        want = dequantized(input_ids=ids).logits
        assert torch.equal(checkpoint.model.forward_path(ids, torch.tensor([0, 0])), want)  # D = 0: the host
        assert (want - model(input_ids=ids).logits).abs().max() > 1e-6  # Q8_0 is not the float model

    bf16 = tmp_path / "ckpt-bf16"
    result = CliRunner().invoke(
        main, ["hf", "attach", str(path), str(corpus(tmp_path)), "--out", str(bf16), *args, "--host-dtype", "bfloat16"]
    )
    assert result.exit_code == 0, result.output
    config = json.loads((bf16 / "config.json").read_text())
    assert config["anchor_dtype"] == "bfloat16" and config["storage_dtype"] == "float32"
    assert config["metadata"]["host"]["stored_as"] == "bfloat16"
    with (
        safe_open(str(bf16 / "anchor.safetensors"), "pt") as anchor,
        safe_open(str(bf16 / "bank_level0.safetensors"), "pt") as bank,
    ):
        assert {anchor.get_tensor(k).dtype for k in anchor.keys()} == {torch.bfloat16}
        assert bank.get_tensor("gate").dtype == torch.float32
    assert load_checkpoint(bf16).anchor_dtype == "bfloat16"


def write_metadata_gguf(path: Path, architecture: str, fields: dict[str, int]) -> Path:
    """A GGUF file with metadata and one small float tensor: enough for the header to be read."""
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in fields.items():
        writer.add_uint32(f"{architecture}.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_ggufs_are_refused_from_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HostSource, "load_model", lambda self: pytest.fail("weights were read"))
    rwkv = write_metadata_gguf(tmp_path / "rwkv.gguf", "rwkv6", {"block_count": 1})
    with pytest.raises(ConfigError, match=r"rwkv\.gguf: GGUF architecture 'rwkv6' has no transformers loader"):
        HostSource.locate(rwkv).read_config()
    gpt2 = write_metadata_gguf(
        tmp_path / "gpt2.gguf",
        "gpt2",
        {"block_count": 1, "embedding_length": 32, "feed_forward_length": 128, "attention.head_count": 2},
    )
    result = CliRunner().invoke(main, ["hf", "attach", str(gpt2), str(corpus(tmp_path)), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "transformer.h.0.mlp (GPT2MLP, children: c_fc, c_proj, act, dropout) is not a gated MLP" in result.output
    assert not (tmp_path / "o").exists()
