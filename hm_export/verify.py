"""``verify``: a bundle against the eager checkpoint on held-out contexts.

For each context: route it with the bundle's router, fill the slot, run the bundle's program and
the eager model on the same tokens and path, and compare logits (max |diff|, top-1 agreement) and
perplexity.  Fails when any context exceeds the tolerance.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hm_export.checkpoint import load_checkpoint
from hm_export.console import progress_bar
from hm_export.errors import HostUnsupported, InputError
from hm_export.formats import read_json_lines
from hm_export.runtime_stubs.loader import BundleLoader, target_files
from hm_export.targets import TARGETS


@dataclass
class ContextResult:
    index: int
    path: tuple[int, ...]
    tokens: int
    max_abs_diff: float
    top1_agreement: float
    perplexity_bundle: float
    perplexity_eager: float


@dataclass
class VerifyReport:
    bundle: str
    target: str
    contexts: int
    max_abs_diff: float
    top1_agreement: float
    tolerance: float
    min_top1: float
    passed: bool
    numerics: str  # "checked" or "skipped: <why>"; skipped numerics never count as passed numerics
    distinct_paths: int
    latency_ratio_bundle_over_eager: float | None
    structure: dict[str, Any] | None = None
    results: list[ContextResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_contexts(path: Path) -> list[dict[str, Any]]:
    """JSON lines with ``text`` (or ``tokens``) and optionally ``context`` (the routing text, default: text)."""
    return read_json_lines(path, _is_context, "each line needs a 'text' string or a 'tokens' list of ids", "contexts")


def _is_context(item: Any) -> bool:
    """A contexts line: an object with a ``text`` string or a ``tokens`` list of non-negative ints (and an
    optional ``context`` string)."""
    if not isinstance(item, dict) or not ("text" in item or "tokens" in item):
        return False
    tokens = item.get("tokens", [])
    return (
        isinstance(item.get("text", ""), str)
        and isinstance(item.get("context", ""), str)
        and isinstance(tokens, list)
        and all(type(t) is int and t >= 0 for t in tokens)
    )


def _perplexity(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    return math.exp(F.cross_entropy(logits[:-1], tokens[1:]).item())


@torch.no_grad()
def verify_bundle(
    bundle_dir: Path,
    checkpoint_dir: Path,
    contexts_file: Path,
    limit: int = 64,
    tolerance: float = 1e-4,
    min_top1: float = 1.0,
    target: str = "executorch",
    progress: bool = False,
) -> VerifyReport:
    loader = BundleLoader(bundle_dir, target=None)
    ckpt = load_checkpoint(checkpoint_dir)
    if ckpt.config != loader.config:
        raise InputError(f"{checkpoint_dir}: model config differs from the bundle's manifest")
    items = read_contexts(contexts_file)[:limit]
    structure = None
    if target in TARGETS and TARGETS[target].check_structure is not None and target in loader.manifest["targets"]:
        entry = loader.manifest["targets"][target]
        structure = TARGETS[target].check_structure(
            target_files(loader.root, loader.manifest, target), loader.contract, entry
        )
    try:
        loader.use_target(target)
    except HostUnsupported as exc:
        return VerifyReport(
            bundle=str(bundle_dir),
            target=target,
            contexts=0,
            max_abs_diff=float("nan"),
            top1_agreement=float("nan"),
            tolerance=tolerance,
            min_top1=min_top1,
            passed=bool(structure and structure["passed"]),
            numerics=f"skipped: {exc}",
            distinct_paths=0,
            latency_ratio_bundle_over_eager=None,
            structure=structure,
        )
    results, bundle_seconds, eager_seconds = [], 0.0, 0.0
    for index, item in enumerate(progress_bar(items, enabled=progress, desc="verify")):
        ids = item.get("tokens") or loader.tokenizer.encode(item["text"]).ids
        ids = ids[: loader.contract.seq_len]
        if len(ids) < 2:
            raise InputError(f"{contexts_file}: context {index} has fewer than 2 tokens")
        path = loader.route(item.get("context") or item.get("text") or loader.tokenizer.decode(ids))
        loader.set_path(path)
        start = time.perf_counter()
        got = loader.logits(ids)
        bundle_seconds += time.perf_counter() - start
        tokens = torch.tensor(ids)
        padded = torch.zeros(1, loader.contract.seq_len, dtype=torch.long)  # same input as the program
        padded[0, : len(ids)] = tokens
        start = time.perf_counter()
        # The eager model on the memory the slot really holds (a quantized bank, a float16 slot): the
        # quantization error itself is measured by scripts/bank_accuracy.py, not here.
        want = ckpt.model(padded, loader.filler.float_memory())[0, : len(ids)]
        eager_seconds += time.perf_counter() - start
        results.append(
            ContextResult(
                index=index,
                path=path,
                tokens=len(ids),
                max_abs_diff=float((got - want).abs().max()),
                top1_agreement=float((got.argmax(-1) == want.argmax(-1)).float().mean()),
                perplexity_bundle=round(_perplexity(got, tokens), 4),
                perplexity_eager=round(_perplexity(want, tokens), 4),
            )
        )
    max_diff = max(r.max_abs_diff for r in results)
    top1 = sum(r.top1_agreement * r.tokens for r in results) / sum(r.tokens for r in results)
    return VerifyReport(
        bundle=str(bundle_dir),
        target=target,
        contexts=len(results),
        max_abs_diff=max_diff,
        top1_agreement=top1,
        tolerance=tolerance,
        min_top1=min_top1,
        passed=max_diff <= tolerance and top1 >= min_top1 and (structure is None or structure["passed"]),
        numerics="checked",
        structure=structure,
        distinct_paths=len({r.path for r in results}),
        latency_ratio_bundle_over_eager=round(bundle_seconds / eager_seconds, 3),
        results=results,
    )
