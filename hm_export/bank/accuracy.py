"""Accuracy of bank schemes: held-out perplexity and top-1 agreement with the unquantized bank.

For each scheme the checkpoint's bank is quantized to a bank directory, every block is read back
(dequantized) into the eager model's bank, and the model is scored on held-out windows exactly like
``examples/stdlib_docs/train.py`` evaluates: the memory path is routed from the window's context (its
first ``context_tokens`` tokens) and the perplexity is measured on the tokens after it.  The reference is
the checkpoint's own bank in float32.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hm_export.bank.quantize import quantize_bank
from hm_export.bank.reader import BankReader
from hm_export.checkpoint import load_checkpoint
from hm_export.model import MemoryLM
from hm_export.router import Embedder

MATRICES = ("gate", "up", "down")


@torch.no_grad()
def _score(model: MemoryLM, tokens: torch.Tensor, paths: torch.Tensor, split: int, batch: int) -> dict[str, Any]:
    """Per-window mean NLL on positions after the context, and the logits' argmax there."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    nll, top1, logits_out = [], [], []
    for i in range(0, len(inputs), batch):
        logits = model.forward_path(inputs[i : i + batch], paths[i : i + batch])[:, split - 1 :]
        losses = F.cross_entropy(logits.transpose(1, 2), targets[i : i + batch, split - 1 :], reduction="none")
        nll.append(losses.mean(1))
        top1.append(logits.argmax(-1))
        logits_out.append(logits)
    return {"nll": torch.cat(nll), "top1": torch.cat(top1), "logits": torch.cat(logits_out)}


def load_dequantized_bank(model: MemoryLM, reader: BankReader) -> None:
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
    model = ckpt.model
    split = int(heldout[0]["context_tokens"])
    tokens = torch.tensor([item["tokens"] for item in heldout])
    paths = torch.from_numpy(ckpt.tree.route(embedder.embed([item["context"] for item in heldout])))
    reference_bank = {name: [p.detach().clone() for p in getattr(model.bank, name)] for name in MATRICES}
    reference = _score(model, tokens, paths, split, batch)
    reference_ppl = math.exp(reference["nll"].mean().item())
    params = sum(p.numel() for p in model.bank.parameters())
    results: dict[str, Any] = {
        "checkpoint": str(checkpoint_dir),
        "checkpoint_metadata": ckpt.metadata,
        "storage_dtype": ckpt.storage_dtype,
        "heldout_windows": len(heldout),
        "scored_tokens": int(reference["top1"].numel()),
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
                name: float(
                    np.sqrt(
                        sum(((q.detach() - r) ** 2).sum().item() for q, r in zip(getattr(model.bank, name), ref))
                        / sum((r**2).sum().item() for r in ref)
                    )
                )
                for name, ref in reference_bank.items()
            }
            scored = _score(model, tokens, paths, split, batch)
            ppl = math.exp(scored["nll"].mean().item())
            results["schemes"].append(
                {
                    "scheme": scheme,
                    "level_schemes": report.level_schemes,
                    "perplexity": round(ppl, 4),
                    "perplexity_change_pct": round(100 * (ppl / reference_ppl - 1), 3),
                    "top1_agreement": round(float((scored["top1"] == reference["top1"]).float().mean()), 5),
                    "max_abs_logit_diff": round(float((scored["logits"] - reference["logits"]).abs().max()), 5),
                    "weight_relative_rmse": {name: round(err, 5) for name, err in errors.items()},
                    "bank_bytes": report.bank_bytes,
                    "bits_per_param": round(8 * report.bank_bytes / params, 3),
                }
            )
    return results
