"""The eager references a bundle is measured against, the distances between them, and their tolerances.

Both references are built from the checkpoint's own float weights, never from the bundle's files:

* the **float checkpoint** (:func:`checkpoint_logits`): the checkpoint's model with the memory of a path
  assembled from the checkpoint's own bank: what was trained;
* **as exported** (:func:`as_exported`): the eager model the bundle's programs should compute: the checkpoint's
  float anchor with the memory the slot holds (the bundle's bank as the loader dequantized it).  This is the one
  place that says what an export does to the model; a quantized anchor extends it.

``hm-export verify`` and the golden checks report three distances per context:

* **export error**: bundle vs as exported (the programs, their lowering, their precision);
* **quantization error**: as exported vs the float checkpoint (the bank's scheme and the slot's storage);
* **end to end**: bundle vs the float checkpoint;

plus the **memory error** per level: the relative RMSE of the memory the bundle holds against the checkpoint's
blocks of the same path.  A bank written wrong but consistently (blocks in the wrong order, a scale in the wrong
place) passes every checksum and has no export error; the memory error (and, for exact schemes, the
quantization error) is what catches it.

Tolerances (:func:`default_tolerances`):

* export error, by the precision the program computes in: ``max |diff| <= atol + rtol * scale``, where the
  scale is the window's largest ``|logit|`` under the float checkpoint.  float32 ``rtol`` 1e-4: correct float32
  bundles measured 1e-6 relative (tiny test models, the 2.4M example) to 8.7e-6 (SmolLM2-135M, logits up to 45:
  3.9e-4 absolute on ExecuTorch, 1.3e-4 on ONNX Runtime), i.e. >= 11x margin; a wrong anchor weight or a
  wrong block moves logits by 1e-2 relative or more (docs/verify.md has the measurements).
* quantization error, by the bank scheme of each level (the coarser of it and the slot's storage):
  float32 is exact (same rule as the export error); float16 / bfloat16 / int8 / int4 are judged by the
  memory error bound, the increase of perplexity over the float checkpoint and a top-1 agreement floor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

from hm_export.architectures import MemoryModel
from hm_export.bank import get_scheme
from hm_export.model import LayerMemory, assemble_path
from hm_export.runtime_stubs.block_cache import SlotFiller

EagerReference = Callable[[Tensor], Tensor]  # tokens [1, T] -> logits [1, T, vocab]


def as_exported(model: MemoryModel, filler: SlotFiller) -> EagerReference:
    """The eager model the bundle's programs should equal: ``model`` (the checkpoint's float anchor) with the
    memory ``filler``'s slot holds when called (the bundle's bank, dequantized by the loader, in the slot's
    storage).  Anchor quantization, when a bundle has it, belongs here: this is the only place verify and the
    golden checks learn what an export did to the model."""
    return lambda tokens: model(tokens, filler.float_memory())


def checkpoint_logits(model: MemoryModel, tokens: Tensor, path: Sequence[int]) -> Tensor:
    """The float checkpoint: ``model`` with the memory of ``path`` assembled from its own bank."""
    return model(tokens, assemble_path(model, path))


def level_memory_error(
    memory: Sequence[LayerMemory], reference: Sequence[LayerMemory], widths: Sequence[int]
) -> list[float]:
    """Per level, the relative RMSE of ``memory`` against ``reference`` (assembled memories of one path:
    ``(gate_up [1, d, 2R], down [1, R, d])`` per memory layer), over the level's gate, up and down ranges of
    every layer.  0 when both are zero, inf when only the reference is."""
    total, errors, offset = sum(widths), [], 0
    for width in widths:
        gate, up = slice(offset, offset + width), slice(total + offset, total + offset + width)
        error = norm = 0.0
        for (gate_up, down), (ref_gate_up, ref_down) in zip(memory, reference):
            for got, want in (
                (gate_up[..., gate], ref_gate_up[..., gate]),
                (gate_up[..., up], ref_gate_up[..., up]),
                (down[:, gate], ref_down[:, gate]),
            ):
                error += float((got.float() - want.float()).pow(2).sum())
                norm += float(want.float().pow(2).sum())
        errors.append(relative_rmse(error, norm))
        offset += width
    return errors


def relative_rmse(squared_error: float, squared_norm: float) -> float:
    """``sqrt(squared_error / squared_norm)``; 0 for no error, inf for an error against a zero reference."""
    if squared_error == 0:
        return 0.0
    return math.sqrt(squared_error / squared_norm) if squared_norm > 0 else math.inf


@dataclass(frozen=True)
class Distance:
    """Two logit tensors ``[n, vocab]`` apart: max |diff|, that over the logit scale, top-1 agreement."""

    max_abs: float
    max_rel: float
    top1: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def logit_scale(logits: Tensor) -> float:
    """The scale relative tolerances refer to: the largest ``|logit|``."""
    return float(logits.abs().max())


def distance(got: Tensor, want: Tensor, scale: float, rows: slice = slice(None)) -> Distance:
    """``got`` vs ``want`` (``[n, vocab]``): max |diff| over all rows, top-1 agreement over ``rows``."""
    max_abs = float((got.float() - want.float()).abs().max())
    top1 = float((got[rows].argmax(-1) == want[rows].argmax(-1)).float().mean())
    return Distance(max_abs, max_abs / scale if scale > 0 else math.inf, top1)


@dataclass(frozen=True)
class ProgramTolerance:
    """The export error a program computing in one precision may show: ``max |diff| <= atol + rtol * scale``."""

    rtol: float
    atol: float

    def limit(self, scale: float) -> float:
        return self.atol + self.rtol * scale


# float32: see the module docstring.  float16 (Core ML's default compute precision; predictions need macOS, so
# it is not measured here): ~20 unit roundoffs (2^-11) of the logit scale.
PROGRAM_TOLERANCE = {"float32": ProgramTolerance(1e-4, 1e-5), "float16": ProgramTolerance(1e-2, 1e-3)}


@dataclass(frozen=True)
class SchemeTolerance:
    """What quantizing the memory with one scheme may cost.  ``exact``: none at all (the quantization error
    follows the export error's rule); otherwise ``memory_rmse`` bounds each level's memory error,
    ``max_ppl_increase_pct`` the perplexity increase over the float checkpoint and ``min_top1`` the top-1
    agreement with it."""

    exact: bool
    memory_rmse: float
    max_ppl_increase_pct: float
    min_top1: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# From docs/bank-benchmarks.md (the shipped example, 16,640 scored tokens): weight relative RMSE float16 0
# (fp16 checkpoint; 2.8e-4 expected from a float32 one), bfloat16 0.0017, int8 0.0054-0.0068, int4 0.085-0.101;
# perplexity change +0.001 % (bf16), -0.002 % (int8), +0.17-0.19 % (int4); top-1 0.9995 / 0.9978 / 0.970-0.973.
# The bounds leave 2-4x on the memory error (a wrong block is ~1.4: two unrelated blocks), the bank issue's
# targets on perplexity (int8 +0.5 %, int4 +3 %), and a few points of top-1 for models with flatter logits.
SCHEME_TOLERANCE = {
    "float32": SchemeTolerance(True, 1e-6, 0.0, 0.999),
    "float16": SchemeTolerance(False, 1e-3, 0.1, 0.99),
    "bfloat16": SchemeTolerance(False, 5e-3, 0.5, 0.98),
    "int8": SchemeTolerance(False, 0.02, 0.5, 0.98),
    "int4": SchemeTolerance(False, 0.2, 3.0, 0.90),
}


def scheme_tolerance(scheme: str) -> SchemeTolerance:
    """The default tolerance of a bank scheme (``int4-g32``, ``int4-g128``: the int4 family's)."""
    bits = getattr(get_scheme(scheme), "bits", None)
    return SCHEME_TOLERANCE[f"int{bits}" if bits else scheme]


def effective_schemes(level_schemes: Sequence[str], slot_storage: str) -> list[str]:
    """Per level, what the memory the program reads went through: the bank's scheme, or float16 when a float16
    slot holds a float32 bank."""
    return ["float16" if slot_storage == "float16" and s == "float32" else s for s in level_schemes]


@dataclass(frozen=True)
class Tolerances:
    """Everything verify judges, with its defaults from :func:`default_tolerances`; each field overridable."""

    rtol: float
    atol: float
    memory_rmse: tuple[float, ...]  # per level
    exact: bool  # the quantization error must meet the export rule (float32 memory everywhere)
    max_ppl_increase_pct: float
    min_top1: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, overrides: Mapping[str, float | None]) -> Tolerances:
        """These tolerances with every non-None value of ``overrides`` (``memory_rmse``: one bound for all
        levels)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if "memory_rmse" in given:
            given["memory_rmse"] = (float(given["memory_rmse"]),) * len(self.memory_rmse)
        return replace(self, **given)  # type: ignore[arg-type]


def default_tolerances(level_schemes: Sequence[str], slot_storage: str, precision: str) -> Tolerances:
    """The defaults for a bundle whose bank levels use ``level_schemes``, whose slot stores ``slot_storage`` and
    whose program computes in ``precision``: the loosest level sets perplexity and top-1."""
    program = PROGRAM_TOLERANCE[precision]
    per_level = [scheme_tolerance(s) for s in effective_schemes(level_schemes, slot_storage)]
    return Tolerances(
        rtol=program.rtol,
        atol=program.atol,
        memory_rmse=tuple(t.memory_rmse for t in per_level),
        exact=all(t.exact for t in per_level),
        max_ppl_increase_pct=max(t.max_ppl_increase_pct for t in per_level),
        min_top1=min(t.min_top1 for t in per_level),
    )


def program_precision(entry: Mapping[str, Any]) -> str:
    """The precision a program computes in (its manifest entry): float16 compute or a float16 KV cache count as
    float16."""
    return "float16" if "float16" in (entry.get("precision"), entry.get("state_dtype")) else "float32"


def perplexity_increase_pct(nll: float, reference_nll: float) -> float:
    """How much higher ``exp(nll)`` is than ``exp(reference_nll)``, in percent."""
    return 100 * (math.exp(nll - reference_nll) - 1)


def summed_nll(logits: Tensor, tokens: Tensor, rows: slice) -> tuple[float, int]:
    """(summed NLL, count) of predicting ``tokens[i + 1]`` from logits row ``i`` for the rows in ``rows``
    (clipped to the rows that have a next token)."""
    n = logits.shape[0]
    start, stop, _ = rows.indices(n - 1)
    if stop <= start:
        return 0.0, 0
    loss = torch.nn.functional.cross_entropy(logits[start:stop].float(), tokens[start + 1 : stop + 1], reduction="sum")
    return float(loss), stop - start
