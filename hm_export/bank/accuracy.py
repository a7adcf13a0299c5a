"""Accuracy of bank schemes: held-out perplexity and top-1 agreement with the unquantized bank.

For each scheme the checkpoint's bank is quantized to a bank directory, every block is read back
(dequantized) into the eager model's bank, and the model is scored on held-out windows exactly like
``examples/stdlib_docs/train.py`` evaluates: the memory path is routed from the window's context (its
first ``context_tokens`` tokens) and the perplexity is measured on the tokens after it.  The reference is
the checkpoint's own bank in float32.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hm_export.architectures import MemoryModel
from hm_export.bank.quantize import quantize_bank
from hm_export.bank.reader import BankReader
from hm_export.checkpoint import load_checkpoint
from hm_export.router import Embedder

MATRICES = ("gate", "up", "down")


@torch.no_grad()
def _compare(
    model: MemoryModel, reference: MemoryModel, tokens: torch.Tensor, paths: torch.Tensor, split: int, batch: int
) -> dict[str, Any]:
    """``model`` against ``reference`` batch by batch (no logits kept): per-window mean NLL of ``model`` on the
    positions after the context, top-1 agreement and max |logit difference| there."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    nll, agree, max_diff = [], 0, 0.0
    for i in range(0, len(inputs), batch):
        got = model.forward_path(inputs[i : i + batch], paths[i : i + batch])[:, split - 1 :]
        want = reference.forward_path(inputs[i : i + batch], paths[i : i + batch])[:, split - 1 :]
        losses = F.cross_entropy(got.transpose(1, 2), targets[i : i + batch, split - 1 :], reduction="none")
        nll.append(losses.mean(1))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        max_diff = max(max_diff, float((got - want).abs().max()))
    scored = inputs[:, split - 1 :].numel()
    return {"perplexity": math.exp(torch.cat(nll).mean().item()), "top1": agree / scored, "max_diff": max_diff}


def _relative_rmse(values: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> float:
    error = sum(((v - r) ** 2).sum().item() for v, r in zip(values, references))
    return math.sqrt(error / sum((r**2).sum().item() for r in references))


def load_dequantized_bank(model: MemoryModel, reader: BankReader) -> None:
    """Overwrite ``model``'s bank with every block of ``reader``'s bank, dequantized to float32."""
    with torch.no_grad():
        for entry in reader.index.blocks:
            block = reader.read_block(entry.level, entry.node)
            for name in MATRICES:
                getattr(model.bank, name)[entry.level][entry.node].copy_(torch.from_numpy(getattr(block, name)))


def scheme_accuracy(
    checkpoint_dir: Path | str,
    heldout: Sequence[dict[str, Any]],
    schemes: Sequence[str],
    embedder: Embedder,
    batch: int = 64,
) -> dict[str, Any]:
    """Perplexity, its change vs the float32 bank, and top-1 agreement per scheme on ``heldout`` windows.

    ``heldout`` items carry ``context`` (routing text), ``tokens`` and ``context_tokens`` (see train.py).
    """
    ckpt = load_checkpoint(checkpoint_dir)
    model, reference = ckpt.model, copy.deepcopy(ckpt.model)  # the reference keeps the checkpoint's bank
    split = int(heldout[0]["context_tokens"])
    tokens = torch.tensor([item["tokens"] for item in heldout])
    paths = torch.from_numpy(ckpt.tree.route(embedder.embed([item["context"] for item in heldout])))
    reference_ppl = _compare(reference, reference, tokens, paths, split, batch)["perplexity"]
    params = sum(p.numel() for p in model.bank.parameters())
    results: dict[str, Any] = {
        "checkpoint": str(checkpoint_dir),
        "checkpoint_metadata": ckpt.metadata,
        "storage_dtype": ckpt.storage_dtype,
        "heldout_windows": len(heldout),
        "scored_tokens": int(tokens[:, split:].numel()),
        "distinct_paths": len({tuple(p) for p in paths.tolist()}),
        "reference": {"scheme": "float32 (checkpoint bank)", "perplexity": round(reference_ppl, 4)},
        "schemes": [],
    }
    with tempfile.TemporaryDirectory(prefix="hm-bank-accuracy-") as tmp:
        for scheme in schemes:
            report = quantize_bank(Path(tmp) / scheme, checkpoint_dir, scheme)
            with BankReader(report.bank) as reader:
                load_dequantized_bank(model, reader)
            errors = {
                name: _relative_rmse(getattr(model.bank, name), getattr(reference.bank, name)) for name in MATRICES
            }
            scored = _compare(model, reference, tokens, paths, split, batch)
            results["schemes"].append(
                {
                    "scheme": scheme,
                    "level_schemes": report.level_schemes,
                    "perplexity": round(scored["perplexity"], 4),
                    "perplexity_change_pct": round(100 * (scored["perplexity"] / reference_ppl - 1), 3),
                    "top1_agreement": round(scored["top1"], 5),
                    "max_abs_logit_diff": round(scored["max_diff"], 5),
                    "weight_relative_rmse": {name: round(err, 5) for name, err in errors.items()},
                    "bank_bytes": report.bank_bytes,
                    "bits_per_param": round(8 * report.bank_bytes / params, 3),
                }
            )
    return results
