"""``verify``: a bundle against the float checkpoint it was exported from, on held-out contexts.

The reference is built from the checkpoint's own weights, tree and memory (:mod:`hm_export.reference`), never
from the bundle's files.  Per context: the checkpoint's tokenizer and tree tokenize and route the context, and
the bundle's must agree; the bundle's loader fills the slot (its bank, dequantized) and its program runs; the
eager model runs on the slot's memory (*as exported*) and on the checkpoint's own memory of the path (*float
checkpoint*).
Reported per context and in total:

* **memory error** per level: the slot's memory against the checkpoint's blocks (relative RMSE);
* **export error**: bundle vs as exported;
* **quantization error**: as exported vs float checkpoint;
* **end to end**: bundle vs float checkpoint;

each as max |logit diff|, that over the logit scale, top-1 agreement, plus perplexity of every side.  Judged
by :class:`~hm_export.reference.Tolerances` (defaults per program precision and bank scheme, each
overridable).  A target whose runtime does not run on this host (Core ML off macOS) still gets its routes,
memory and quantization checked; its export and end-to-end errors are *skipped*, and skipped is not passed.

A context may carry ``context_tokens`` (as ``examples/stdlib_docs/heldout.jsonl`` does): perplexity and top-1
are then scored on the positions after it, as ``scripts/bank_accuracy.py`` scores them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hm_export.anchor_quant import exported_model, get_preset
from hm_export.checkpoint import load_checkpoint
from hm_export.console import progress_bar
from hm_export.errors import BundleError, HostUnsupported, InputError
from hm_export.formats import read_json_lines
from hm_export.model import assemble_path
from hm_export.reference import (
    Distance,
    Tolerances,
    as_exported,
    checkpoint_logits,
    default_tolerances,
    distance,
    level_memory_error,
    logit_scale,
    perplexity_increase_pct,
    program_precision,
    summed_nll,
)
from hm_export.router import Embedder
from hm_export.runtime_stubs.loader import BundleLoader, target_files
from hm_export.targets import TARGETS

SIDES = ("checkpoint", "as_exported", "bundle")


@dataclass
class ContextResult:
    """One context.  ``path``: the bundle's route; ``checkpoint_path``: the checkpoint tree's.  ``export`` and
    ``end_to_end`` are None when the target's numerics were skipped; ``nll`` is summed over ``scored_tokens``."""

    index: int
    tokens: int
    scored_tokens: int
    path: tuple[int, ...]
    checkpoint_path: tuple[int, ...]
    logit_scale: float
    memory_error: list[float]
    quantization: Distance
    export: Distance | None
    end_to_end: Distance | None
    perplexity: dict[str, float]
    nll: dict[str, float] = field(repr=False)


@dataclass
class VerifyReport:
    """``status``: ``pass``, ``fail`` or ``skipped`` (nothing failed, but the target's numerics did not run
    here); ``failures`` says what failed.  Sections ``routes``, ``tokenizer`` (the bundle's against the
    checkpoint's, on the contexts given as text), ``memory``, ``export``, ``quantization``, ``end_to_end``:
    totals over the contexts with their verdicts."""

    bundle: str
    checkpoint: str
    target: str
    status: str
    skipped: str | None
    failures: list[str]
    contexts: int
    distinct_paths: int
    bank_schemes: list[str]
    slot_storage: str
    precision: str
    tolerances: Tolerances
    routes: dict[str, Any]
    tokenizer: dict[str, Any]
    memory: dict[str, Any]
    export: dict[str, Any]
    quantization: dict[str, Any]
    end_to_end: dict[str, Any]
    perplexity: dict[str, float]
    latency_ratio_bundle_over_eager: float | None
    structure: dict[str, Any] | None = None
    results: list[ContextResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for result in out["results"]:
            del result["nll"]
        return {**out, "passed": self.passed}


def read_contexts(path: Path) -> list[dict[str, Any]]:
    """JSON lines with ``text`` (or ``tokens``), optionally ``context`` (the routing text, default: text) and
    ``context_tokens`` (score only the positions after it)."""
    return read_json_lines(path, _is_context, "each line needs a 'text' string or a 'tokens' list of ids", "contexts")


def _is_context(item: Any) -> bool:
    """A contexts line: an object with a ``text`` string or a ``tokens`` list of non-negative ints (and an
    optional ``context`` string and ``context_tokens`` count)."""
    if not isinstance(item, dict) or not ("text" in item or "tokens" in item):
        return False
    tokens, context_tokens = item.get("tokens", []), item.get("context_tokens", 1)
    return (
        isinstance(item.get("text", ""), str)
        and isinstance(item.get("context", ""), str)
        and isinstance(tokens, list)
        and all(type(t) is int and t >= 0 for t in tokens)
        and type(context_tokens) is int
        and context_tokens >= 0
    )


def _within(value: Distance, scale: float, tolerances: Tolerances) -> bool:
    return value.max_abs <= tolerances.atol + tolerances.rtol * scale  # NaN fails


def _total(results: list[ContextResult], side: str) -> dict[str, float]:
    """max |diff|, max relative diff and token-weighted top-1 of one distance over the contexts."""
    values = [(getattr(r, side), r.scored_tokens) for r in results]
    return {
        "max_abs": max(v.max_abs for v, _ in values),
        "max_rel": max(v.max_rel for v, _ in values),
        "top1": sum(v.top1 * n for v, n in values) / sum(n for _, n in values),
    }


def _perplexities(results: list[ContextResult], sides: tuple[str, ...]) -> dict[str, float]:
    count = sum(r.scored_tokens for r in results)
    return {side: math.exp(sum(r.nll[side] for r in results) / count) if count else math.nan for side in sides}


def _judge_distance(
    name: str, results: list[ContextResult], side: str, tolerances: Tolerances, exact: bool, ppl: tuple[str, str] | None
) -> tuple[dict[str, Any], list[str]]:
    """Totals and failures of the ``side`` distance: every context within the logit rule when ``exact``, else
    the perplexity increase of ``ppl[0]`` over ``ppl[1]``; with ``ppl`` (a distance to the checkpoint), also
    the top-1 floor on the totals."""
    total: dict[str, Any] = _total(results, side)
    failures = []
    if exact:
        beyond = [r for r in results if not _within(getattr(r, side), r.logit_scale, tolerances)]
        failures += [
            f"{name}: context {r.index} max |logit diff| {getattr(r, side).max_abs:.3g} beyond "
            f"{tolerances.atol:g} + {tolerances.rtol:g} x logit scale {r.logit_scale:.3g}"
            for r in beyond
        ]
    if ppl is not None:
        perplexities = _perplexities(results, ppl)
        increase = perplexity_increase_pct(math.log(perplexities[ppl[0]]), math.log(perplexities[ppl[1]]))
        total["perplexity_increase_pct"] = increase
        if not exact and not increase <= tolerances.max_ppl_increase_pct:
            failures.append(
                f"{name}: perplexity {perplexities[ppl[0]]:.4f} vs {perplexities[ppl[1]]:.4f} of the float "
                f"checkpoint, +{increase:.3f} % beyond +{tolerances.max_ppl_increase_pct:g} %"
            )
        if not total["top1"] >= tolerances.min_top1:
            failures.append(f"{name}: top-1 agreement {total['top1']:.4f} below {tolerances.min_top1:g}")
    total["rule"] = " and ".join(
        (["logit tolerance per context"] if exact else ["perplexity increase"]) + (["top-1 floor"] if ppl else [])
    )
    total["passed"] = not failures
    return total, failures


@torch.no_grad()
def verify_bundle(
    bundle_dir: Path,
    checkpoint_dir: Path,
    contexts_file: Path,
    limit: int = 64,
    target: str = "executorch",
    overrides: Mapping[str, float | None] | None = None,
    progress: bool = False,
    embedder: Embedder | None = None,
) -> VerifyReport:
    """Verify ``bundle_dir``'s ``target`` against the checkpoint on the first ``limit`` contexts of
    ``contexts_file``.  ``overrides``: :class:`~hm_export.reference.Tolerances` fields to set (None: default);
    ``embedder`` routes the contexts (default: all-MiniLM-L6-v2)."""
    loader = BundleLoader(bundle_dir, target=None, embedder=embedder)
    ckpt = load_checkpoint(checkpoint_dir)
    if ckpt.config != loader.config:
        raise InputError(f"{checkpoint_dir}: model config differs from the bundle's manifest")
    items = read_contexts(contexts_file)[:limit]
    if not items:
        raise InputError(f"{contexts_file}: no contexts")
    entry = loader.manifest.targets.get(target)
    if entry is None:
        raise BundleError(
            f"{bundle_dir / 'manifest.json'}: no target {target!r} (bundle has {sorted(loader.manifest.targets)})",
            field="targets",
        )
    bank_schemes = [s.name for s in loader.bank.schemes]
    anchor_record = entry.get("anchor_quant") or {}
    preset = get_preset(anchor_record.get("preset", "none"))
    program_entry = entry.one_program  # the target's one program
    slot_storage, precision = loader.layout.strategy.storage, program_precision(program_entry.record, anchor_record)
    tolerances = default_tolerances(bank_schemes, slot_storage, precision, preset).with_overrides(overrides or {})
    structure = None
    if target in TARGETS and TARGETS[target].check_structure is not None:
        files = target_files(loader.root, loader.manifest, target, decode=program_entry is not entry)
        structure = TARGETS[target].check_structure(files, loader.contract, program_entry.record)
    skipped = None
    try:
        loader.use_target(target)
    except HostUnsupported as exc:
        skipped = str(exc)
    # The anchor as exported: ExecuTorch's quantization is torchao's, reproduced here; the other targets'
    # quantizers (ONNX Runtime, coremltools) are not, so their quantized anchors' export error is not judged
    # (their golden checks, recorded from their own dequantized weights, are: hm-export check).
    anchor = exported_model(ckpt.model, preset)[0] if target == "executorch" else ckpt.model
    export_unjudged = None
    if preset.quantized and target != "executorch":
        export_unjudged = f"the {target} anchor quantizer ({preset.name}) is not reproduced here: see hm-export check"
    eager = as_exported(ckpt.model, loader.filler, anchor)
    texts = [item.get("context") or item.get("text") or ckpt.tokenizer.decode(item["tokens"]) for item in items]
    embeddings = loader.embedder.embed(texts)
    bundle_paths, checkpoint_paths = loader.tree.route(embeddings), ckpt.tree.route(embeddings)

    results: list[ContextResult] = []
    tokenizer_disagrees: list[int] = []
    bundle_seconds = eager_seconds = 0.0
    seq_len = loader.contract.seq_len
    for index, item in enumerate(progress_bar(items, enabled=progress, desc="verify")):
        if item.get("tokens"):
            ids = list(item["tokens"])[:seq_len]
        else:  # the checkpoint's tokenizer is the reference; the bundle's must agree
            ids = ckpt.tokenizer.encode(item["text"]).ids[:seq_len]
            if loader.tokenizer.encode(item["text"]).ids[:seq_len] != ids:
                tokenizer_disagrees.append(index)
        if len(ids) < 2:
            raise InputError(f"{contexts_file}: context {index} has fewer than 2 tokens")
        first = max(int(item.get("context_tokens", 1)) - 1, 0)  # first scored row
        if first >= len(ids) - 1:
            raise InputError(f"{contexts_file}: context {index} has no token after its {first + 1} context tokens")
        rows = slice(first, len(ids) - 1)  # the scored positions: each predicts the next token
        path = tuple(int(n) for n in bundle_paths[index])
        checkpoint_path = tuple(int(n) for n in checkpoint_paths[index])
        tokens = torch.tensor(ids)
        padded = torch.zeros(1, seq_len, dtype=torch.long)  # the program's fixed window: same input for all
        padded[0, : len(ids)] = tokens
        loader.set_path(path)
        memory_error = level_memory_error(
            loader.filler.float_memory(), assemble_path(ckpt.model, path), ckpt.config.memory.widths
        )
        start = time.perf_counter()
        exported = eager(padded)[0, : len(ids)]
        eager_seconds += time.perf_counter() - start
        floating = checkpoint_logits(ckpt.model, padded, path)[0, : len(ids)]
        reference = (
            floating
            if checkpoint_path == path
            else checkpoint_logits(ckpt.model, padded, checkpoint_path)[0, : len(ids)]
        )
        scale = logit_scale(reference)
        logits = {"checkpoint": reference, "as_exported": exported}
        if skipped is None:
            start = time.perf_counter()
            logits["bundle"] = loader.logits(ids)
            bundle_seconds += time.perf_counter() - start
        nll = {side: summed_nll(value, tokens, rows)[0] for side, value in logits.items()}
        scored = len(ids) - 1 - first
        results.append(
            ContextResult(
                index=index,
                tokens=len(ids),
                scored_tokens=scored,
                path=path,
                checkpoint_path=checkpoint_path,
                logit_scale=scale,
                memory_error=memory_error,
                quantization=distance(exported, floating, scale, rows),
                export=distance(logits["bundle"], exported, scale, rows) if skipped is None else None,
                end_to_end=distance(logits["bundle"], reference, scale, rows) if skipped is None else None,
                perplexity={side: math.exp(value / scored) for side, value in nll.items()},
                nll=nll,
            )
        )

    failures: list[str] = []
    disagree = [r.index for r in results if r.path != r.checkpoint_path]
    failures += [
        f"routes: context {r.index} routes to {list(r.path)} in the bundle, {list(r.checkpoint_path)} in the checkpoint"
        for r in results
        if r.index in disagree
    ]
    routes = {"agree": len(results) - len(disagree), "disagree": disagree, "passed": not disagree}
    failures += [f"tokenizer: the bundle's tokenizer encodes context {i} differently" for i in tokenizer_disagrees]
    tokenizer = {"disagree": tokenizer_disagrees, "passed": not tokenizer_disagrees}
    levels = range(ckpt.config.memory.num_levels)
    worst = [max(r.memory_error[level] for r in results) for level in levels]
    for level in levels:
        bad = [r for r in results if not r.memory_error[level] <= tolerances.memory_rmse[level]]
        failures += [
            f"memory: context {r.index}, level {level} node {r.path[level]}: relative RMSE {r.memory_error[level]:.3g} "
            f"against the checkpoint's block, beyond {tolerances.memory_rmse[level]:g}"
            for r in bad
        ]
    memory = {"max_relative_rmse": worst, "passed": all(w <= t for w, t in zip(worst, tolerances.memory_rmse))}
    quantization, failed = _judge_distance(
        "quantization", results, "quantization", tolerances, tolerances.exact, ("as_exported", "checkpoint")
    )
    failures += failed
    sides: tuple[str, ...] = ("checkpoint", "as_exported")
    if skipped is None:
        sides = SIDES
        if export_unjudged is None:
            export, failed = _judge_distance("export", results, "export", tolerances, True, None)
            failures += failed
        else:
            export = {"skipped": export_unjudged}
        end_to_end, failed = _judge_distance(
            "end to end", results, "end_to_end", tolerances, tolerances.exact, ("bundle", "checkpoint")
        )
        failures += failed
    else:
        export = end_to_end = {"skipped": skipped}
    if structure is not None and not structure["passed"]:
        failures += [f"structure: {problem}" for problem in structure["problems"]]
    status = "fail" if failures else "skipped" if skipped else "pass"
    return VerifyReport(
        bundle=str(bundle_dir),
        checkpoint=str(checkpoint_dir),
        target=target,
        status=status,
        skipped=skipped,
        failures=failures,
        contexts=len(results),
        distinct_paths=len({r.path for r in results}),
        bank_schemes=bank_schemes,
        slot_storage=slot_storage,
        precision=precision,
        tolerances=tolerances,
        routes=routes,
        tokenizer=tokenizer,
        memory=memory,
        export=export,
        quantization=quantization,
        end_to_end=end_to_end,
        perplexity=_perplexities(results, sides),
        latency_ratio_bundle_over_eager=round(bundle_seconds / eager_seconds, 3) if skipped is None else None,
        structure=structure,
        results=results,
    )
