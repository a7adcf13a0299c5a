"""Post-hoc memories on Hugging Face hosts, one tiny random config per family tested end to end (Llama, Qwen2,
Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3, SmolLM3), each with the quirk it is known for; refused models."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_WORDS, tiny_tokenizer, tiny_tree

transformers = pytest.importorskip("transformers")

from hm_export.architectures import decode_module  # noqa: E402
from hm_export.bench import bench_bundle  # noqa: E402
from hm_export.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from hm_export.checks import run_checks  # noqa: E402
from hm_export.cli import main  # noqa: E402
from hm_export.config import MemoryConfig  # noqa: E402
from hm_export.export import ExportRecipe, export_bundle  # noqa: E402
from hm_export.hf import TESTED_MODEL_TYPES, HostMemoryLM, HostRefused, host_model_config, inspect_host  # noqa: E402
from hm_export.hf.families import _structure_of, causal_lm_class  # noqa: E402
from hm_export.model import assemble_path  # noqa: E402
from hm_export.passes.base import SlotPassContext  # noqa: E402
from hm_export.passes.expand_tanh_gelu import expand_tanh_gelu  # noqa: E402
from hm_export.verify import verify_bundle  # noqa: E402

MEMORY = MemoryConfig(branching=(2, 3), widths=(8, 4), layers=(0, 1))
SEQ = 32
COMMON = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.1, 1.3, 1.6],
    "long_factor": [2.0, 3.0, 4.0, 6.0],
}
# Per family: its config class and the quirk it brings (each family is exported once, in hf_bundle).
HOSTS = {
    # dynamic NTK RoPE: static inside max_position_embeddings, held fixed
    "llama": (transformers.LlamaConfig, {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}),
    "qwen2": (transformers.Qwen2Config, {}),  # attention bias, per-layer-type masks
    "qwen3": (transformers.Qwen3Config, {"head_dim": 8}),  # q/k norms
    "mistral": (transformers.MistralConfig, {"sliding_window": 12}),  # one window (12 < 32 positions) on all layers
    # tanh-GELU, sandwich norms, scaled embeddings, attention and final-logit soft-capping, sliding layers
    "gemma2": (transformers.Gemma2Config, {"head_dim": 16, "sliding_window": 12}),
    "gemma3": (transformers.Gemma3TextConfig, {"head_dim": 16, "sliding_window": 16}),  # + q/k norms, 2 RoPEs
    # fused qkv and gate_up, longrope (short factors up to 32 positions = the window)
    "phi3": (transformers.Phi3Config, {"original_max_position_embeddings": SEQ, "rope_parameters": LONGROPE}),
    "smollm3": (transformers.SmolLM3Config, {"no_rope_layer_interval": 2}),  # NoPE layers
}


def host_config(family: str, **overrides: object) -> object:
    config_class, extra = HOSTS[family]
    return config_class(**{**COMMON, **overrides}, **extra, attn_implementation="eager")


def tiny_host(family: str, seed: int = 0) -> torch.nn.Module:
    """A host with eager attention, as hm-export runs and exports every host (sdpa differs in rounding)."""
    config = host_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return causal_lm_class(config.model_type)(config).eval()


def memory_model(family: str, seed: int = 0) -> HostMemoryLM:
    """A tiny host with memories whose ``D`` is random (so the memory changes the logits)."""
    host = tiny_host(family, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = HostMemoryLM.attach(host, host_model_config(host.config, MEMORY, SEQ)).eval()
        with torch.no_grad():
            for down in model.bank.down:
                down.normal_(0.0, 0.3)
    return model


def test_every_listed_family_is_tested() -> None:
    assert sorted(host_config(f).model_type for f in HOSTS) == sorted(TESTED_MODEL_TYPES)


@pytest.mark.parametrize("family", sorted(HOSTS))
def test_structure_is_found_from_the_config(family: str) -> None:
    structure = inspect_host(host_config(family), SEQ)
    assert structure.architecture == f"hf-{family}" and structure.layers == "model.layers"
    assert structure.mlp_form == ("fused gate_up/down" if family == "phi3" else "gate/up/down")
    assert structure.activation == ("gelu_pytorch_tanh" if family.startswith("gemma") else "silu")
    expected_quirks = {
        "llama": "rope dynamic",
        "qwen2": "attention bias",
        "qwen3": "q/k norms",
        "mistral": "sliding window 12 (all layers)",
        "gemma2": "logit soft-capping",
        "gemma3": "sandwich norms",
        "phi3": "rope longrope",
        "smollm3": "NoPE layers",
    }
    assert any(q.startswith(expected_quirks[family]) for q in structure.quirks), structure.quirks


def test_models_that_cannot_host_memories_are_refused_by_reason() -> None:
    """From the config alone: what the model is instead of a host, in one line."""
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(
        HostRefused,
        match=r"transformer\.h\.0\.mlp \(GPT2MLP, children: c_fc, c_proj, act, dropout\) "
        r"is not a gated MLP",
    ):
        inspect_host(gpt2)
    mixtral = transformers.MixtralConfig(**COMMON, num_local_experts=2)
    with pytest.raises(HostRefused, match=r"model\.layers\.0\.mlp is a mixture of experts"):
        inspect_host(mixtral)
    with pytest.raises(HostRefused, match="is a multimodal wrapper: attach memories to its text model"):
        inspect_host(transformers.Gemma3Config())
    with pytest.raises(HostRefused, match="model_type 't5' is not a causal language model"):
        inspect_host(transformers.T5Config())
    phi3 = host_config("phi3")
    with pytest.raises(
        HostRefused,
        match=r"^rope_type 'longrope' switches to its long factors beyond "
        r"original_max_position_embeddings 32: .*use --seq-len <= 32$",
    ):
        host_model_config(phi3, MEMORY, 48)


@pytest.mark.parametrize("family", sorted(HOSTS))
def test_zero_memory_leaves_the_host_logits_unchanged(family: str) -> None:
    host = tiny_host(family)
    model = HostMemoryLM.attach(host, host_model_config(host.config, MEMORY, SEQ)).eval()
    tokens = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = host(input_ids=tokens, use_cache=False).logits
        for path in ([0, 0], [1, 5]):
            assert torch.equal(model.forward_path(tokens, torch.tensor(path)), want)  # bit for bit
        for down in model.bank.down:
            down.normal_()
        assert (model.forward_path(tokens, torch.tensor([1, 5])) - want).abs().max() > 1e-2


def widened_host(model: HostMemoryLM, family: str, path: list[int]) -> torch.nn.Module:
    """The host with the path's blocks appended to every memory layer's MLP as extra hidden units."""
    width = MEMORY.total_width
    config = host_config(family, intermediate_size=COMMON["intermediate_size"] + width)
    wide = causal_lm_class(config.model_type)(config)
    state = model.host.state_dict()
    memory = dict(zip(MEMORY.layers, assemble_path(model, path)))
    for name, tensor in wide.state_dict().items():
        if tensor.shape == state[name].shape:
            continue
        layer = int(name.split(".")[2])
        gate_up, down = (m[0] for m in memory[layer])
        gate, up = gate_up[:, :width].T, gate_up[:, width:].T  # [R, d]
        if name.endswith("gate_up_proj.weight"):  # Phi-3: [gate; up] stacked
            host_gate, host_up = state[name].chunk(2)
            state[name] = torch.cat([host_gate, gate, host_up, up])
        elif name.endswith("gate_proj.weight"):
            state[name] = torch.cat([state[name], gate])
        elif name.endswith("up_proj.weight"):
            state[name] = torch.cat([state[name], up])
        else:  # down_proj [d, F]
            state[name] = torch.cat([state[name], down.T], dim=1)
    wide.load_state_dict(state)
    return wide.eval()


@pytest.mark.parametrize("family", sorted(HOSTS))
def test_memory_is_the_host_mlp_with_extra_hidden_units(family: str) -> None:
    """FFN(h) = D_a(act(G_a h) * U_a h) + D_m(act(G_m h) * U_m h), with the host's own activation."""
    model = memory_model(family)
    tokens = torch.randint(0, 64, (1, SEQ), generator=torch.Generator().manual_seed(1))
    path = [1, 4]
    with torch.no_grad():
        got = model.forward_path(tokens, torch.tensor(path))
        want = widened_host(model, family, path)(input_ids=tokens, use_cache=False).logits
    assert (got - want).abs().max() < 1e-5


def test_training_moves_only_the_bank() -> None:
    model = memory_model("qwen2").train()
    host_before = {n: p.clone() for n, p in model.host.named_parameters()}
    tokens = torch.randint(0, 64, (2, 17))
    loss = model.forward_path(tokens[:, :-1], torch.tensor([0, 1])).logsumexp(-1).mean()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(p.grad is None for p in model.host.parameters())
    assert all(torch.equal(p, host_before[n]) for n, p in model.host.named_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.bank.parameters())


@pytest.mark.parametrize("family", sorted(HOSTS))
def test_checkpoint_round_trip_is_exact(family: str, tmp_path: Path) -> None:
    model = memory_model(family)
    path = save_checkpoint(tmp_path / "ckpt", model, tiny_tree(MEMORY), tiny_tokenizer())
    stored = json.loads((path / "config.json").read_text())["model"]
    assert stored["architecture"] == f"hf-{family}" and stored["host"]["model_type"] == model.host.config.model_type
    _structure_of.cache_clear()  # as in a fresh process (load_checkpoint probes the MLP under `meta`)
    loaded = load_checkpoint(path)
    tokens = torch.randint(0, 64, (2, SEQ))
    with torch.no_grad():
        for p in ([0, 0], [1, 5]):
            assert torch.equal(
                loaded.model.forward_path(tokens, torch.tensor(p)), model.forward_path(tokens, torch.tensor(p))
            )


@pytest.mark.parametrize("family", sorted(HOSTS))
@pytest.mark.parametrize("cache", ["state", "io"])
def test_decode_module_matches_the_full_window(family: str, cache: str) -> None:
    """A prompt fed in pieces through the KV-cache module gives the full-window logits."""
    model = memory_model(family)
    tokens = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(2))
    path = [1, 4]
    with torch.no_grad():
        want = model.forward_path(tokens, torch.tensor(path))
        decoder = decode_module(model, assemble_path(model, path), cache).eval()
        past = decoder.cache_spec.empty() if cache == "io" else []
        pieces = []
        for start, stop in ((0, 7), (7, 8), (8, 15), (15, 20)):
            out = decoder(tokens[:, start:stop], torch.tensor([start]), *past)
            if cache == "io":
                out, *past = out
            pieces.append(out)
    assert (torch.cat(pieces, 1) - want).abs().max() < 1e-5


def test_sliding_window_layers_mask_beyond_the_window() -> None:
    """Gemma 3 with a window shorter than the sequence: the decode module still equals the window program."""
    host = tiny_host("gemma3")
    host.config.sliding_window = 6
    host = transformers.Gemma3ForCausalLM(host.config).eval()
    model = HostMemoryLM.attach(host, host_model_config(host.config, MEMORY, SEQ)).eval()
    tokens = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(tokens)
        decoder = decode_module(model, (), "state").eval()
        got = torch.cat([decoder(tokens[:, i : i + 1], torch.tensor([i])) for i in range(24)], 1)
    assert set(host.config.layer_types) == {"sliding_attention"}  # every layer windowed at 6 < 24 positions
    assert (got - want).abs().max() < 1e-5


def test_a_host_config_of_another_family_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt", memory_model("llama"), tiny_tree(MEMORY), tiny_tokenizer())
    config = json.loads((path / "config.json").read_text())
    config["model"]["architecture"] = "hf-qwen2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"config\.json: invalid model config: host config has model_type 'llama' "
        r"\(architecture 'hf-llama'\), the model config says 'hf-qwen2'",
    ):
        load_checkpoint(path)
    config["model"]["architecture"] = "hf-gpt2"
    config["model"]["host"] = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64).to_dict()
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"invalid model config: transformer\.h\.0\.mlp .* is not a gated MLP"):
        load_checkpoint(path)


def test_tanh_gelu_is_expanded_and_exact_gelu_kept() -> None:
    class Activations(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.gelu(x, approximate="tanh") + torch.nn.functional.gelu(x)

    x = torch.linspace(-6, 6, 97).reshape(1, 97)
    ep = torch.export.export(Activations(), (x,))
    ctx = SlotPassContext([], [], [])
    ep = expand_tanh_gelu(ep, ctx)
    gelus = [n.args[1:] + tuple(n.kwargs.values()) for n in ep.graph.nodes if n.target == torch.ops.aten.gelu.default]
    assert ctx.notes["tanh_gelus_expanded"] == 1 and gelus == [()]  # only the exact (erf) GELU is left
    assert (ep.module()(x) - Activations()(x)).abs().max() < 1e-6


def contexts_file(directory: Path, count: int = 16) -> Path:
    rng = random.Random(0)
    words = TINY_WORDS[1:]
    lines = [
        {
            "text": " ".join(rng.choice(words) for _ in range(rng.randint(4, 40))),
            "context": " ".join(rng.sample(words, 3)),
        }
        for _ in range(count)
    ]
    path = directory / "contexts.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture(scope="module", params=sorted(HOSTS))
def hf_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    family = request.param
    workdir = tmp_path_factory.mktemp(f"hf_{family}")
    checkpoint = save_checkpoint(workdir / "ckpt", memory_model(family), tiny_tree(MEMORY), tiny_tokenizer())
    targets = ("executorch", "onnx", "coreml") if family == "gemma3" else ("executorch", "onnx")
    export_bundle(checkpoint, workdir / "bundle", ExportRecipe(targets=targets, checks=4, router_program=False))
    return family, checkpoint, workdir / "bundle"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["executorch", "onnx"])
def test_bundle_matches_the_eager_host_with_memory(hf_bundle, target: str, tmp_path: Path) -> None:
    family, checkpoint, bundle = hf_bundle
    report = verify_bundle(bundle, checkpoint, contexts_file(tmp_path), target=target)
    assert report.contexts == 16 and report.distinct_paths >= 2
    assert report.passed, (family, target, report.failures)
    assert report.export["max_rel"] <= 1e-4 and report.quantization["max_abs"] == 0.0  # float32 bank: exact
    assert report.end_to_end["top1"] == 1.0 and report.memory["max_relative_rmse"] == [0.0, 0.0]


@pytest.mark.slow
def test_bundle_golden_checks_and_manifest(hf_bundle) -> None:
    family, _, bundle = hf_bundle
    report = run_checks(bundle)
    assert report.status == ("skipped" if family == "gemma3" else "pass"), report.to_dict()  # Core ML: skipped
    assert not [r for r in report.results if r.status == "fail"]
    summary = report.summary()
    for program in ("executorch/decode", "onnx/decode"):
        assert summary[program]["pass"] == 4, (program, summary)
    greedy = [r for r in report.results if r.program == "decode" and r.target in ("executorch", "onnx")]
    assert all(r.tokens_matched and r.tokens_matched >= 8 for r in greedy), [r.detail for r in greedy]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == f"hf-{family}"
    executorch = manifest["targets"]["executorch"]
    assert executorch["decode"]["delegation"]["slot_inputs_delegated"]
    assert "aten_alias_copy_default" not in executorch["decode"]["delegation"]["non_delegated_ops"]
    assert executorch["decode"]["cache"]["shape"] == [2, SEQ, getattr(host_config(family), "head_dim", None) or 8]
    if family == "gemma3":
        assert summary["coreml/structure"]["pass"] >= 1


def write_host_dir(directory: Path, family: str) -> Path:
    tiny_host(family).save_pretrained(directory)
    tiny_tokenizer().save(str(directory / "tokenizer.json"))
    return directory


def corpus_file(directory: Path) -> Path:
    """Eight 'documents', each repeating its own word pattern (so a routed memory can learn it)."""
    rng = random.Random(1)
    words = list(TINY_WORDS[1:])
    lines = []
    for index in range(8):
        pattern = rng.sample(words, 5)
        lines.append({"text": " ".join(pattern * 40), "context": f"document {index}: {' '.join(pattern)}"})
    path = directory / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


@pytest.mark.slow
def test_attach_recipe_trains_memories_that_lower_the_loss(tmp_path: Path) -> None:
    host_dir = write_host_dir(tmp_path / "host", "llama")
    args = ["hf", "attach", str(host_dir), str(corpus_file(tmp_path)), "--branching", "2,2", "--widths", "8,4"]
    args += ["--seq-len", "32", "--batch", "4", "--json"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "trained"), "--steps", "60"])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)  # stdout holds only the JSON; progress went to stderr
    nll = report["held_out_nll"]["test"]
    assert nll["host_with_memory"] < nll["host"] - 0.1, nll
    assert (
        report["architecture"] == "hf-llama"
        and report["train_windows"] > report["held_out_nll"]["validation"]["windows"] > 0
    )
    assert report["memory_share_of_ffn"] == round(12 / 48, 4) and report["host"]["format"] == "transformers"
    assert "validation nll" in result.stderr

    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "untrained"), "--steps", "0"])
    assert result.exit_code == 0, result.output
    untrained = load_checkpoint(tmp_path / "untrained")
    host = transformers.AutoModelForCausalLM.from_pretrained(str(host_dir), attn_implementation="eager").eval()
    tokens = torch.randint(3, 12, (2, 32))
    with torch.no_grad():
        assert torch.equal(untrained.model.forward_path(tokens, torch.tensor([1, 3])), host(input_ids=tokens).logits)


def test_attach_refuses_a_bad_corpus(tmp_path: Path) -> None:
    host_dir = write_host_dir(tmp_path / "host", "qwen2")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "the cat"}\n{"title": "no text"}\n')
    result = CliRunner().invoke(main, ["hf", "attach", str(host_dir), str(corpus), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and f"{corpus}:2: a document needs a string 'text'" in result.output
    assert not (tmp_path / "o").exists()


def test_inspect_reads_the_config_only(tmp_path: Path) -> None:
    host_dir = tmp_path / "gemma2"
    host_config("gemma2").save_pretrained(host_dir)  # a config and no weights at all
    result = CliRunner().invoke(main, ["hf", "inspect", str(host_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["architecture"] == "hf-gemma2" and report["formula"] == "down(gelu_pytorch_tanh(gate x) * up x)"
    assert "attention soft-capping" in report["quirks"] and report["mask"] == "per-layer-type"
    gpt2_dir = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(gpt2_dir)
    result = CliRunner().invoke(main, ["hf", "inspect", str(gpt2_dir)])
    assert (
        result.exit_code == 2 and "(GPT2MLP, children: c_fc, c_proj, act, dropout) is not a gated MLP" in result.output
    )


@pytest.mark.slow
@pytest.mark.parametrize("hf_bundle", ["phi3"], indirect=True)  # bench only talks to the runtime and loader
def test_bench_runs_the_decode_program(hf_bundle) -> None:
    _, _, bundle = hf_bundle
    report = bench_bundle(bundle, "executorch", runs=1, contexts=2, prompt_tokens=8, new_tokens=4, threads=1)
    assert report.program == "decode" and report.distinct_paths >= 1
    assert report.decode_tokens_per_s["mean"] > 0 and report.prefill_tokens_per_s["mean"] > 0
    assert report.fetch_fill_ms and set(report.fetch_fill_ms) <= {"level0", "level1"}


def test_fused_silu_kernel_is_refused_for_a_gelu_host() -> None:
    from hm_export.kernels.strategies import SlotLayout, resolve_layout

    gemma, llama = (host_model_config(tiny_host(f).config, MEMORY, SEQ) for f in ("gemma3", "llama"))
    int4 = ["int4-g32", "int4-g32"]
    with pytest.raises(ValueError, match="runs the SiLU memory kernel; this model's memory uses 'gelu_pytorch_tanh'"):
        SlotLayout.for_bank("fused-int4", gemma, int4)
    assert SlotLayout.for_bank("fused-int4", llama, int4).strategy.reader == "memory_swiglu"
    assert resolve_layout("auto", ["executorch"], llama, int4).strategy.name == "fused-int4"
    assert resolve_layout("auto", ["executorch"], gemma, int4).strategy.reader != "memory_swiglu"
