"""``bench``: latency of a bundle on this host, the way a device app pays it.

One *run* goes through every benchmark context in turn; each context is a *context switch* away from a
random leaf's path (seeded, untimed): route the context (embed + tree descent), fill the slot (fetch +
dequantize only the levels whose node differs from the previous path), prefill its prompt, sample the
first token (time to first token after the switch counts all of these), then decode ``new_tokens``
greedily with the KV cache.  ``runs`` runs follow one warm-up generation; like
llama-bench, throughputs are reported as mean and standard deviation over runs, latencies as p50/p99
over every measured event.  Peak RSS is the process's (``ru_maxrss``), Python and the runtime included.

Fetch + fill times are per level and only for levels that changed.  The default cache policy streams
(``CachePolicy(resident_levels=0, cache_bytes=0)``): every changed level is one read from the bank file
(through the OS page cache), the cost a device pays on a cache miss; ``cache="default"`` uses the
loader's default policy (shallow levels resident, an LRU for the rest).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hm_export.bundle import BundleError
from hm_export.checks import check_contexts, load_checks
from hm_export.config import MemoryConfig
from hm_export.errors import UsageError, missing_extra
from hm_export.router import Embedder
from hm_export.runtime_stubs.block_cache import CachePolicy
from hm_export.runtime_stubs.generate import Generator, Sampling, WindowDecoder
from hm_export.runtime_stubs.loader import BundleLoader

CACHE_POLICIES = {"stream": CachePolicy(resident_levels=0, cache_bytes=0), "default": CachePolicy()}


def latency(seconds: list[float]) -> dict[str, float]:
    """n, p50, p99, mean, sd of a list of durations, in milliseconds."""
    if not seconds:
        return {"n": 0}
    ms = np.asarray(seconds) * 1e3
    return {
        "n": len(ms),
        "p50": round(float(np.percentile(ms, 50)), 4),
        "p99": round(float(np.percentile(ms, 99)), 4),
        "mean": round(float(ms.mean()), 4),
        "sd": round(float(ms.std(ddof=1)) if len(ms) > 1 else 0.0, 4),
    }


def throughput(per_run: list[float]) -> dict[str, Any]:
    """mean and sd over runs of a rate (tokens/s), with the per-run values."""
    return {
        "mean": round(statistics.fmean(per_run), 2),
        "sd": round(statistics.stdev(per_run), 2) if len(per_run) > 1 else 0.0,
        "runs": [round(v, 2) for v in per_run],
    }


@dataclass
class BenchReport:
    """Every field of ``hm-export bench --json`` (latencies in ms, throughputs in tokens/s)."""

    bundle: str
    target: str
    program: str  # "decode" (KV cache) or "window" (no decode program: the window is re-run per token)
    host: dict[str, Any]
    threads: int
    runs: int
    contexts: int
    distinct_paths: int
    prompt_tokens: int
    new_tokens: int
    cache_policy: str
    route_ms: dict[str, float]
    fetch_fill_ms: dict[str, dict[str, float]]
    ttft_after_switch_ms: dict[str, float]
    ttft_breakdown_ms: dict[str, float]
    prefill_tokens_per_s: dict[str, Any]
    decode_tokens_per_s: dict[str, Any]
    decode_step_ms: dict[str, float]
    peak_rss_mb: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bench_contexts(
    loader: BundleLoader, contexts_file: Path | None, count: int, prompt_tokens: int
) -> list[tuple[str, list[int]]]:
    """The contexts to switch between: from ``contexts_file``, else the bundle's golden checks, else derived."""
    if contexts_file is None and loader.manifest.checks is not None:
        body, _ = load_checks(loader.root, loader.manifest, loader.config)
        return [(c["context"], c["prompt"][:prompt_tokens]) for c in body["checks"]][:count]
    return check_contexts(contexts_file, loader.tokenizer, count, prompt_tokens)


def bench_bundle(
    bundle_dir: Path,
    target: str = "executorch",
    runs: int = 3,
    contexts_file: Path | None = None,
    contexts: int = 8,
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    threads: int | None = None,
    cache: str = "stream",
    embedder: Embedder | None = None,
) -> BenchReport:
    """Measure ``bundle_dir`` with ``target``'s runtime (see the module docstring)."""
    if runs < 1 or contexts < 1 or prompt_tokens < 1 or new_tokens < 1:
        raise UsageError("runs, contexts, prompt_tokens and new_tokens must be positive")
    if cache not in CACHE_POLICIES:
        raise UsageError(f"cache must be one of {sorted(CACHE_POLICIES)}, not {cache!r}")
    if threads:
        set_threads(threads)
    loader = BundleLoader(bundle_dir, target=None, embedder=embedder, cache=CACHE_POLICIES[cache])
    generator = Generator(loader, target)
    new_tokens = min(new_tokens, generator.capacity // 2)
    pairs = _bench_contexts(loader, contexts_file, contexts, min(prompt_tokens, generator.capacity - new_tokens))
    if not pairs:
        raise BundleError(f"{bundle_dir}: no benchmark contexts")
    sampling = Sampling(max_new_tokens=new_tokens)
    generator.set_context(pairs[0][0])
    generator.generate(pairs[0][1], sampling)  # warm-up: first-call allocations, page cache, lazy inits

    route, ttft, steps = [], [], []
    parts: dict[str, list[float]] = {"route": [], "fetch_fill": [], "prefill": [], "first_sample": []}
    fetch: dict[int, list[float]] = {}
    prefill_rates, decode_rates, paths = [], [], set()
    rng = np.random.default_rng(0)
    memory = loader.config.memory
    for _ in range(runs):
        prefill_tokens = prefill_seconds = decoded = decode_seconds = 0.0
        for context, prompt in pairs:
            leaf = int(rng.integers(memory.nodes_at(memory.num_levels - 1)))
            loader.set_path(leaf_path(memory, leaf))  # the context we switch away from
            start = time.perf_counter()
            path = loader.route(context)
            routed = time.perf_counter()
            update = loader.set_path(path)
            result = generator.generate(prompt, sampling)
            route.append(routed - start)
            ttft.append(routed - start + update.seconds + result.first_token_seconds)
            parts["route"].append(routed - start)
            parts["fetch_fill"].append(update.seconds)
            parts["prefill"].append(result.prefill_seconds)
            parts["first_sample"].append(result.first_token_seconds - result.prefill_seconds)
            for level, seconds in zip(update.levels_changed, update.level_seconds):
                fetch.setdefault(level, []).append(seconds)
            paths.add(tuple(path))
            prefill_tokens += result.prompt_tokens
            prefill_seconds += result.prefill_seconds
            decoded += len(result.step_seconds)
            decode_seconds += result.decode_seconds
            steps += result.step_seconds
        prefill_rates.append(prefill_tokens / prefill_seconds)
        decode_rates.append(decoded / decode_seconds if decode_seconds else 0.0)
    return BenchReport(
        bundle=str(bundle_dir),
        target=target,
        program="window" if isinstance(generator.decoder, WindowDecoder) else "decode",
        host={"machine": platform.machine(), "system": platform.system(), "cpus": _cpu_count()},
        threads=threads or torch.get_num_threads(),
        runs=runs,
        contexts=len(pairs),
        distinct_paths=len(paths),
        prompt_tokens=round(statistics.fmean(len(p) for _, p in pairs)),
        new_tokens=new_tokens,
        cache_policy=cache,
        route_ms=latency(route),
        fetch_fill_ms={f"level{level}": latency(fetch[level]) for level in sorted(fetch)},
        ttft_after_switch_ms=latency(ttft),
        ttft_breakdown_ms={name: round(statistics.fmean(v) * 1e3, 4) for name, v in parts.items()},
        prefill_tokens_per_s=throughput(prefill_rates),
        decode_tokens_per_s=throughput(decode_rates),
        decode_step_ms=latency(steps),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )


def leaf_path(memory: MemoryConfig, leaf: int) -> list[int]:
    """The root-to-leaf path ending at node ``leaf`` of the deepest level."""
    path = [leaf]
    for level in range(memory.num_levels - 1, 0, -1):
        path.insert(0, path[0] // memory.branching[level])
    return path


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(threads: int) -> None:
    """Use ``threads`` threads in torch and in ExecuTorch's XNNPACK threadpool; ONNX Runtime sessions opened
    afterwards take torch's count as their intra-op threads (``hm_export.targets.onnx``)."""
    torch.set_num_threads(threads)
    try:
        from executorch.extension.pybindings import portable_lib
    except ImportError:
        return
    portable_lib._unsafe_reset_threadpool(threads)


def check_plot_target(out: Path) -> None:
    """Refuse a plot that could not be written, before the benchmark runs: no matplotlib, or a folder that
    does not exist or is not writable."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise missing_extra("matplotlib", "bench", f"writing {out}") from None
    folder = Path(out).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK) or Path(out).is_dir():
        raise UsageError(f"{out}: cannot write the plot there (folder missing, not writable, or a directory)")


def plot_report(report: BenchReport, out: Path) -> None:
    """PNG of the latency breakdown: time to first token after a context switch split into route, fetch +
    fill, prefill and first sample (mean ms), fetch + fill p50/p99 per level, and decode step p50/p99."""
    check_plot_target(out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    start = 0.0
    for (name, value), color in zip(report.ttft_breakdown_ms.items(), ("#4c72b0", "#dd8452", "#55a868", "#c44e52")):
        left.barh([0], [value], left=start, color=color, label=f"{name} {value:.2f} ms")
        start += value
    left.set_yticks([])
    left.set_xlabel("ms (mean)")
    left.set_title(f"time to first token after a context switch: {start:.2f} ms")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=8)
    labels = [*report.fetch_fill_ms, "decode step"]
    stats = [*report.fetch_fill_ms.values(), report.decode_step_ms]
    positions = np.arange(len(labels))
    right.bar(positions - 0.2, [s.get("p50", 0) for s in stats], 0.4, label="p50")
    right.bar(positions + 0.2, [s.get("p99", 0) for s in stats], 0.4, label="p99")
    right.set_xticks(positions, labels)
    right.set_ylabel("ms")
    right.set_title(f"fetch + fill per level ({report.cache_policy}) and decode step")
    right.legend(fontsize=8)
    fig.suptitle(
        f"{Path(report.bundle).name} [{report.target}, {report.threads} threads]: prefill "
        f"{report.prefill_tokens_per_s['mean']:.0f} tok/s, decode {report.decode_tokens_per_s['mean']:.0f} tok/s"
    )
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120)
    except OSError as exc:
        raise UsageError(f"{out}: cannot write the plot: {exc.strerror}") from None
    plt.close(fig)
