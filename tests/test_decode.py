"""The KV-cache decode program and generation: eager decode module == full window; the exported decode
programs (ExecuTorch, ONNX) == eager; greedy generation from the bundle == eager greedy; sampling, stop
tokens, a full cache, re-routing, and ``hm-export run``'s streaming output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import DECODE_CONTEXTS, tiny_config, tiny_model

from hm_export.bench import set_threads
from hm_export.checkpoint import Checkpoint, load_checkpoint
from hm_export.cli import main
from hm_export.decode import DecodeModule
from hm_export.errors import UsageError
from hm_export.model import assemble_path
from hm_export.runtime_stubs.generate import Generator, Sampling, WindowDecoder, next_token
from hm_export.runtime_stubs.loader import BundleLoader

TARGETS = ("executorch", "onnx")


@pytest.fixture(scope="module")
def ckpt(decode_bundle) -> Checkpoint:
    return load_checkpoint(decode_bundle[0])


@pytest.fixture(scope="module")
def loader(decode_bundle) -> BundleLoader:
    return BundleLoader(decode_bundle[1], target=None)


def eager_greedy(ckpt: Checkpoint, tokens: list[int], path: tuple[int, ...], new: int) -> list[int]:
    """The trained model's greedy continuation: the full window re-run for every token, no KV cache."""
    sequence = list(tokens)
    with torch.no_grad():
        for _ in range(new):
            logits = ckpt.model.forward_path(torch.tensor([sequence]), torch.tensor(path))[0, -1]
            sequence.append(int(logits.argmax()))
    return sequence[len(tokens) :]


@pytest.mark.parametrize("cache", ["state", "io"])
def test_eager_decode_module_equals_the_full_window(cache):
    cfg = tiny_config()
    model = tiny_model(cfg, seed=1)
    path = (1, 4)
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
    module = DecodeModule(model, assemble_path(model, path), cache).eval()
    with torch.no_grad():
        full = model.forward_path(tokens, torch.tensor(path))[0]
        past = module.cache_spec.empty()
        pieces = []
        for start, stop in [(0, 11), (11, 12), (12, 20), *((i, i + 1) for i in range(20, cfg.max_seq_len))]:
            out = module(tokens[:, start:stop], torch.tensor([start]), *past)
            if cache == "io":
                out, past = out[0], list(out[1:])
            pieces.append(out[0])
    incremental = torch.cat(pieces)
    assert incremental.shape == full.shape
    assert (incremental - full).abs().max() < 1e-5


def test_float16_cache_of_the_attention_kernel_stays_close_to_the_full_window():
    cfg = tiny_config()
    model = tiny_model(cfg, seed=1)
    path = (1, 4)
    tokens = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    module = DecodeModule(model, assemble_path(model, path), attention="kernel", cache_dtype="float16").eval()
    assert {getattr(module, name).dtype for name in module.cache_spec.names("state")} == {torch.float16}
    with torch.no_grad():
        full = model.forward_path(tokens, torch.tensor(path))[0]
        pieces = [module(tokens[:, :11], torch.tensor([0]))[0]]
        pieces += [module(tokens[:, i : i + 1], torch.tensor([i]))[0] for i in range(11, 24)]
        error = (torch.cat(pieces) - full).abs().max()
    # the rounding of keys and values to float16 (a relative 2^-11) is all that differs from the float32 window
    assert 1e-6 < error < 2e-3
    with pytest.raises(UsageError, match="float16 needs attention='kernel'"):
        DecodeModule(model, (), attention="masked", cache_dtype="float16")


def test_decode_module_without_memory_is_the_bare_anchor():
    cfg = tiny_config()
    model = tiny_model(cfg)
    module = DecodeModule(model, ()).eval()
    assert module.memory_parameter_names() == []
    tokens = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(module(tokens, torch.tensor([0]))[0], model(tokens)[0], atol=1e-5)


@pytest.mark.slow
def test_manifest_describes_the_decode_programs(decode_bundle):
    manifest = json.loads((decode_bundle[1] / "manifest.json").read_text())
    for target, cache in (("executorch", "state"), ("onnx", "io"), ("coreml", "state")):
        decode = manifest["targets"][target]["decode"]
        assert decode["cache"]["form"] == cache and decode["cache"]["shape"] == [2, 32, 8]
        names = [i["name"] for i in decode["io"]["inputs"]]
        assert names[:2] == ["tokens", "input_pos"] and names[-4:] == manifest["io"]["inputs"][1:]
        assert decode["io"]["inputs"][0]["shape"] == [1, "n"] and decode["io"]["axes"] == {"n": [1, 32]}
        if cache == "io":
            assert names[2:6] == ["past_key0", "past_value0", "past_key1", "past_value1"]
            assert [o["name"] for o in decode["io"]["outputs"]][1:3] == ["present_key0", "present_value0"]
        else:
            assert [s["name"] for s in decode["io"]["states"]] == ["k_cache0", "v_cache0", "k_cache1", "v_cache1"]
        assert [p["name"] for p in decode["pipeline"]["passes"]][-1] == "check_slot_access"
        for path in decode["files"].values():  # programs and packages (directories) are all listed with sha256
            assert any(f == path or f.startswith(path + "/") for f in manifest["files"])
    assert manifest["targets"]["executorch"]["decode"]["delegation"]["slot_inputs_delegated"] is True
    entry = manifest["targets"]["executorch"]
    assert entry["files"] == {} and entry["window"] == "decode"  # the decode program is the target's one program
    assert entry["decode"]["attention"] == "kernel" and "hm_export::attend_cache" in entry["decode"]["custom_ops"]
    # Only ExecuTorch's program holds a second method: the prompt's prefill, the last position's logits.
    assert entry["decode"]["prefill_method"] == "prefill"
    assert all("prefill_method" not in manifest["targets"][t]["decode"] for t in ("onnx", "coreml"))


@pytest.mark.slow
def test_prefill_method_gives_the_last_row_and_fills_the_cache_forward_reads(loader, ckpt):
    decoder = loader.open_decoder("executorch")
    assert decoder.inner.prefill_method is not None  # the program's own method, not the fallback to forward
    path = (1, 5)
    loader.set_path(path)
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    with torch.no_grad():
        want = ckpt.model.forward_path(torch.tensor([tokens]), torch.tensor(path))[0]
    decoder(torch.tensor([[7, 7, 7, 7, 7, 7, 7, 7, 7]]), 0, loader.slot)  # another sequence in the cache first
    last = decoder.last(torch.tensor([tokens[:7]]), 0, loader.slot)
    assert last.shape == (ckpt.config.vocab_size,) and (last - want[6]).abs().max() < 1e-4
    # The prefill method wrote positions 0..6 of the KV cache that forward's steps read.
    steps = [decoder(torch.tensor([[t]]), 7 + i, loader.slot) for i, t in enumerate(tokens[7:])]
    assert (torch.cat(steps) - want[7:]).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_decode_program_logits_equal_eager(loader, ckpt, target):
    decoder = loader.open_decoder(target)
    path = (1, 5)
    loader.set_path(path)
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    with torch.no_grad():
        want = ckpt.model.forward_path(torch.tensor([tokens]), torch.tensor(path))[0]
    got = [decoder(torch.tensor([tokens[:7]]), 0, loader.slot)]
    got += [decoder(torch.tensor([[t]]), 7 + i, loader.slot) for i, t in enumerate(tokens[7:])]
    assert (torch.cat(got) - want).abs().max() < 1e-4
    # A new sequence is just a prefill from position 0: the previous one's cache does not leak in.
    assert (decoder(torch.tensor([tokens[:3]]), 0, loader.slot) - want[:3]).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_greedy_generation_equals_eager_token_for_token(loader, ckpt, target):
    generator = Generator(loader, target)
    for item in DECODE_CONTEXTS:
        generator.set_context(item["context"])
        prompt = ckpt.tokenizer.encode(item["text"]).ids
        result = generator.generate(prompt, Sampling(max_new_tokens=16))
        assert result.path == loader.route(item["context"])
        assert result.new_tokens == eager_greedy(ckpt, prompt, result.path, 16), item
        assert result.stop_reason == "max_new_tokens" and len(result.step_seconds) == 15


@pytest.mark.slow
def test_window_fallback_generates_the_same_tokens(loader, ckpt, monkeypatch):
    generator = Generator(loader, "executorch")
    generator.set_context("cats and mats")
    prompt = ckpt.tokenizer.encode("the cat sat on").ids
    with_cache = generator.generate(prompt, Sampling(max_new_tokens=8)).new_tokens
    monkeypatch.setattr(loader, "has_decoder", lambda target: False)
    fallback = Generator(loader, "executorch")
    assert isinstance(fallback.decoder, WindowDecoder) and fallback.capacity == loader.contract.seq_len
    fallback.set_context("cats and mats")
    assert fallback.generate(prompt, Sampling(max_new_tokens=8)).new_tokens == with_cache


@pytest.mark.slow
def test_sampling_is_reproducible_with_a_seed(loader):
    generator = Generator(loader, "executorch")
    generator.set_context("memory trees")
    prompt = [1, 3, 5]

    def sample(seed: int) -> list[int]:
        settings = Sampling(max_new_tokens=12, temperature=1.5, top_k=20, top_p=0.95, seed=seed)
        return generator.generate(prompt, settings).new_tokens

    assert sample(7) == sample(7)
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1


def test_next_token_filters():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    assert next_token(logits, Sampling(), None) == 1
    generator = torch.Generator().manual_seed(0)
    # top-k 1 and a tiny top-p both leave only the most likely token.
    assert {next_token(logits, Sampling(temperature=2.0, top_k=1), generator) for _ in range(20)} == {1}
    assert {next_token(logits, Sampling(temperature=2.0, top_p=1e-3), generator) for _ in range(20)} == {1}
    # top-k 2 samples only among the two most likely.
    assert {next_token(logits, Sampling(temperature=5.0, top_k=2), generator) for _ in range(200)} == {1, 2}
    # top-p 0.7 of softmax([0, 3, 2.9, -1, 1]) = [.02, .49, .44, .01, .05]: tokens 1 and 2 (0.93 >= 0.7).
    assert {next_token(logits, Sampling(temperature=1.0, top_p=0.7), generator) for _ in range(200)} == {1, 2}
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


@pytest.mark.slow
def test_stop_tokens_end_generation(loader):
    generator = Generator(loader, "onnx")
    generator.set_context("a dog on a mat")
    prompt = [2, 4, 5, 6]
    free = generator.generate(prompt, Sampling(max_new_tokens=12)).new_tokens
    stop = free[5]
    result = generator.generate(prompt, Sampling(max_new_tokens=12, stop_tokens=(stop, 999)))
    assert result.stop_reason == "stop_token" and result.new_tokens == free[: free.index(stop)]


@pytest.mark.slow
def test_onnx_sessions_take_the_benchmark_thread_count(loader):
    """``hm-export bench --threads N`` (set_threads) bounds ONNX Runtime too, not only torch and XNNPACK."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            set_threads(threads)
            options = loader.open_decoder("onnx").inner.session.get_session_options()  # inside the bounds checks
            assert (options.intra_op_num_threads, options.inter_op_num_threads) == (threads, 1)
    finally:
        set_threads(before)


@pytest.mark.slow
def test_generation_stops_when_the_cache_is_full(loader):
    generator = Generator(loader, "executorch")
    generator.set_context("lists of words")
    capacity = loader.config.max_seq_len
    result = generator.generate([1] * (capacity - 2), Sampling(max_new_tokens=10))
    # Positions capacity-2 and capacity-1 are fed; the token predicted at the last position ends it.
    assert result.stop_reason == "cache_full" and len(result.new_tokens) == 3
    with pytest.raises(ValueError, match="prompt of 33 tokens"):
        generator.generate([1] * (capacity + 1))


class CountingEmbedder:
    dim = 384

    def __init__(self) -> None:
        self.calls: list[str] = []

    def embed(self, texts):
        self.calls += list(texts)
        rng = np.random.default_rng(len(texts[0]))
        vectors = rng.standard_normal((len(texts), self.dim)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.slow
def test_the_path_is_chosen_once_per_context(decode_bundle):
    embedder = CountingEmbedder()
    loader = BundleLoader(decode_bundle[1], target=None, embedder=embedder)
    generator = Generator(loader, "executorch")
    assert generator.set_context("short") is not None
    assert generator.set_context("short") is None  # same context: no routing, no fetch
    assert generator.set_context("a much longer context") is not None  # a new context is routed
    assert embedder.calls == ["short", "a much longer context"]
    pinned = Generator(loader, "executorch", reroute="never")
    pinned.set_context("first")
    path = loader.path
    assert pinned.set_context("a different context entirely") is None and loader.path == path
    with pytest.raises(ValueError, match="reroute"):
        Generator(loader, "executorch", reroute="sometimes")


@pytest.mark.slow
def test_run_streams_the_continuation(decode_bundle, ckpt):
    bundle = decode_bundle[1]
    args = ["run", str(bundle), "--context", "cats and mats", "--prompt", "the cat sat", "--max-new-tokens", "6"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    loader = BundleLoader(bundle, target=None)
    prompt = ckpt.tokenizer.encode("the cat sat").ids
    new = eager_greedy(ckpt, prompt, loader.route("cats and mats"), 6)
    assert result.stdout.startswith("the cat sat") and result.stdout.rstrip("\n").endswith(ckpt.tokenizer.decode(new))
    assert "decode program" in result.stderr
    sampled = CliRunner().invoke(main, [*args, "--temperature", "1", "--seed", "5", "--target", "onnx", "--json"])
    again = CliRunner().invoke(main, [*args, "--temperature", "1", "--seed", "5", "--target", "onnx", "--json"])
    assert sampled.exit_code == 0 and json.loads(sampled.stdout)["new_tokens"] == json.loads(again.stdout)["new_tokens"]
    assert json.loads(sampled.stdout)["program"] == "decode"
