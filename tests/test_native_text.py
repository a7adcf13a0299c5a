"""Text in, text out in the native runtime: its tokenizers against the ``tokenizers`` library, routing from text
with the bundle's router program, generate() against the Python runtime, the C API, prefetch, CRC-32.

The corpus: every document of the shipped example (the Python standard library's modules and pydoc topics,
626 documents, sampled to their first 2,000 and a middle 1,000 characters to keep the test fast; the whole
documents are compared by scripts/tokenizer_agreement.py, docs/native-runtime.md) plus non-ASCII text
(accents, CJK, emoji sequences, control characters, added tokens) and random code points from every plane.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DECODE_CONTEXTS
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hm_export.native import (
    NativeError,
    build_native_runner,
    native_detokenize,
    native_tokenize,
    run_native,
    run_native_generate,
)
from hm_export.router import default_minilm_dir
from hm_export.router_program import write_router_tokenizer
from hm_export.runtime_stubs.loader import BundleLoader, complete

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / "build" / "native"
EXAMPLE_TOKENIZER = ROOT / "examples" / "stdlib_docs" / "checkpoint" / "tokenizer.json"
NON_ASCII = (
    "naïve café résumé Ångström façade ÉCOLE Ǆemal",
    "e\u0301\u0327 a\u0308\u0323 A\u030a \u1e69 (combining marks in both orders)",
    "日本語のテキスト、中文字符，한국어 문장 ㄱㄴ",
    "emoji 🎉👍🏽👨‍👩‍👧 🇫🇷 ❤️ ok",
    "ctrl\x00\x01\x07\x1b[0m\x7f\x85 tab\tcr\r\nend\x0b\x0c",
    "\u200b zero\u00a0width \ufeffbom \u2028 \u3000 ideographic space",
    "Ελληνικά Кириллица עברית العربية हिन्दी ไทย",
    "  leading   spaces \n\n\n  trailing   ",
    "digits 1234567890 ١٢٣ ½ ² ⅷ",
    "İstanbul ǅ ß ﬁ Σσς ẞ",
    "<|endoftext|> special <|endoftext|>x [CLS] a [SEP] b [MASK]",
    "it's we're they've I'm we'll he'd 'quoted' ''s",
    "x" * 300,
    "",
)

pytestmark = pytest.mark.slow  # every test here needs the C++ build


def example_documents() -> list[str]:
    spec = importlib.util.spec_from_file_location("stdlib_train", ROOT / "examples" / "stdlib_docs" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return list(train.stdlib_documents().values())


def random_strings(count: int = 300, length: int = 40, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    points = np.concatenate([rng.integers(0, 0x3000, count * length // 2), rng.integers(0, 0x110000, count * length)])
    points = [p for p in points.tolist() if not 0xD800 <= p <= 0xDFFF]
    return ["".join(map(chr, points[i : i + length])) for i in range(0, count * length, length)]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    texts = []
    for document in example_documents():
        middle = len(document) // 2
        texts += [document[:2000], document[middle : middle + 1000]]
    return texts + list(NON_ASCII) + random_strings()


@pytest.fixture(scope="session")
def runner() -> Path:
    return build_native_runner(BUILD_DIR)


def assert_same_ids(runner: Path, path: Path, texts: list[str]) -> None:
    want = [e.ids for e in Tokenizer.from_file(str(path)).encode_batch(texts)]
    got = native_tokenize(runner, path, texts)
    differ = [(texts[i][:60], want[i][:12], got[i][:12]) for i in range(len(texts)) if want[i] != got[i]]
    assert len(got) == len(texts) and not differ, differ[:3]


def digits_tokenizer(path: Path, texts: list[str]) -> Path:
    """A byte-level BPE with individual digits split first and a prefix space (SmolLM2's pre-tokenizer style)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=True)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=special, initial_alphabet=alphabet)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return path


def test_lm_byte_level_bpe_matches_the_library(runner, corpus):
    assert_same_ids(runner, EXAMPLE_TOKENIZER, corpus)


def test_digits_and_prefix_space_bpe_matches_the_library(runner, corpus, tmp_path):
    assert_same_ids(runner, digits_tokenizer(tmp_path / "digits.json", corpus[:400]), corpus)


def test_router_wordpiece_matches_the_library(runner, corpus, tmp_path):
    write_router_tokenizer(default_minilm_dir(), tmp_path / "minilm.json")
    assert_same_ids(runner, tmp_path / "minilm.json", corpus)


def test_decode_matches_the_library(runner, corpus):
    tokenizer = Tokenizer.from_file(str(EXAMPLE_TOKENIZER))
    rng = np.random.default_rng(1)
    ids = [e.ids for e in tokenizer.encode_batch(corpus[-320:])]  # non-ASCII and random code points
    ids += [rng.integers(0, tokenizer.get_vocab_size(), 12).tolist() for _ in range(200)]  # split characters too
    ids += [[300, tokenizer.get_vocab_size() + 7, 301]]  # an id past the tokenizer's vocabulary is skipped
    assert native_detokenize(runner, EXAMPLE_TOKENIZER, ids) == tokenizer.decode_batch(ids)


def test_unsupported_tokenizer_is_refused_naming_the_component(runner, tmp_path):
    body = json.loads(EXAMPLE_TOKENIZER.read_text())
    body["normalizer"] = {"type": "NFKC"}
    (tmp_path / "nfkc.json").write_text(json.dumps(body))
    with pytest.raises(NativeError, match=r"nfkc\.json: normalizer NFKC is not supported"):
        native_tokenize(runner, tmp_path / "nfkc.json", ["x"])


def test_checks_route_on_device_from_their_text(runner, decode_bundle):
    report = run_native(decode_bundle[1], BUILD_DIR, route_on_device=True)
    checks, routing = report["checks"], report["routing"]
    assert checks["passed"] and checks["routing"] == "on-device"
    assert routing["routes_matched"] == routing["contexts"] == len(DECODE_CONTEXTS)
    assert routing["tokens_matched"] == routing["tokens_total"] > 0
    assert routing["min_cosine"] >= 0.9999


def test_generate_equals_the_python_runtime_and_uses_the_prefetch(runner, decode_bundle):
    bundle = decode_bundle[1]
    loader = BundleLoader(bundle, target="executorch")
    first = DECODE_CONTEXTS[0]  # and a context that routes elsewhere, so the second fill has levels to prefetch
    second = next(c for c in DECODE_CONTEXTS[1:] if loader.route(c["context"]) != loader.route(first["context"]))
    report = run_native_generate(runner, bundle, first["context"], first["text"], 8, next_context=second["context"])
    for item, native in ((first, report["generation"]), (second, report["next"])):
        python = complete(loader, item["context"], first["text"], max_new_tokens=8)
        assert native["path"] == list(python.context_path)
        assert native["prompt_tokens"] == loader.tokenizer.encode(first["text"]).ids
        assert native["new_tokens"] == python.new_tokens and native["text"] == python.text
    assert report["prefetched_path"] == report["next"]["path"]
    changed = report["next"]["fill"]["sources"]
    assert changed and set(changed) <= {"prefetch", "resident"}


C_API_TEXT = """
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1])
class Options(ctypes.Structure):
    _fields_ = [("verify_files", ctypes.c_int), ("verify_blocks", ctypes.c_int), ("resident_levels", ctypes.c_int),
                ("cache_bytes", ctypes.c_uint64), ("threads", ctypes.c_int)]
class Generate(ctypes.Structure):
    _fields_ = [("max_new_tokens", ctypes.c_int), ("temperature", ctypes.c_float), ("top_k", ctypes.c_int),
                ("top_p", ctypes.c_float), ("seed", ctypes.c_uint64), ("stop_tokens", ctypes.POINTER(ctypes.c_int64)),
                ("stop_count", ctypes.c_size_t)]
lib.hm_default_options.restype = Options
lib.hm_default_generate_options.restype = Generate
lib.hm_last_error.restype = ctypes.c_char_p
runtime = ctypes.c_void_p()
options = lib.hm_default_options()
assert lib.hm_open(sys.argv[2].encode(), ctypes.byref(options), ctypes.byref(runtime)) == 0, lib.hm_last_error()
levels = lib.hm_num_levels(runtime)
path = (ctypes.c_int32 * levels)()
assert lib.hm_route_text(runtime, sys.argv[3].encode(), path) == 0, lib.hm_last_error()
pieces = []
Callback = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p)
on_text = Callback(lambda piece, length, user: pieces.append(ctypes.string_at(piece, length).decode()))
settings = lib.hm_default_generate_options()
settings.max_new_tokens = 8
text = ctypes.c_char_p()
status = lib.hm_generate(runtime, sys.argv[3].encode(), sys.argv[4].encode(), ctypes.byref(settings), on_text, None,
                         ctypes.byref(text))
assert status == 0, lib.hm_last_error()
whole = text.value.decode()
lib.hm_free_text(text)
lib.hm_close(runtime)
print(json.dumps({"path": list(path), "text": whole, "streamed": "".join(pieces)}))
"""


def test_c_api_routes_and_generates_from_text(runner, decode_bundle):
    bundle, item = decode_bundle[1], DECODE_CONTEXTS[2]
    done = subprocess.run(
        [sys.executable, "-c", C_API_TEXT, str(runner.parent / "libhm_runtime.so"), str(bundle), item["context"],
         item["text"]],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    python = complete(BundleLoader(bundle, target="executorch"), item["context"], item["text"], max_new_tokens=8)
    assert out["path"] == list(python.context_path)
    assert out["text"] == out["streamed"] == python.text


def test_crc32_matches_zlib_on_every_length_and_alignment(runner):
    done = subprocess.run([str(runner.parent / "hm_bank_read"), "--crc-self-test"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["failures"] == 0 and report["cases"] > 50
