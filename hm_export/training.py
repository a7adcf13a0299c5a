"""Training loops shared by the shipped example and the Hugging Face memory recipe (:mod:`hm_export.hf.recipe`).

Memories are trained the paper's way: the anchor (or host) is frozen, every training window uses the blocks
of its document's greedily routed path, and only the bank's parameters move.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from hm_export.architectures import MemoryModel


def document_windows(tokenizer: Tokenizer, docs: list[str], length: int) -> list[list[list[int]]]:
    """Per document, its non-overlapping ``length``-token windows (a tail shorter than that is dropped)."""
    return [
        [enc.ids[i : i + length] for i in range(0, len(enc.ids) - length + 1, length)]
        for enc in tokenizer.encode_batch(docs)
    ]


def train(
    model: MemoryModel,
    params: list[nn.Parameter],
    data: torch.Tensor,
    paths: torch.Tensor | None,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    label: str,
    validate: Callable[[], float] | None = None,
    eval_every: int = 100,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """AdamW with warmup + cosine decay on windows ``data`` ``[N, T+1]``; ``paths`` (``[N, levels]``) given
    means every window uses its memory path.  Returns the loss of every step.

    With ``validate`` (a held-out NLL), it is measured every ``eval_every`` steps and the parameters
    come back as they were at the best measurement (early stopping).
    """
    log = log or (lambda message: print(message, flush=True))
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1 if paths is None else 0.0)
    gen = torch.Generator().manual_seed(seed)
    warmup, losses, start = max(1, steps // 20), [], time.time()
    best = (validate(), 0, [p.detach().clone() for p in params]) if validate else None
    for step in range(steps):
        scale = (
            (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        )
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * scale)
        idx = torch.randint(len(data), (batch,), generator=gen)
        tokens = data[idx]
        logits = model(tokens[:, :-1]) if paths is None else model.forward_path(tokens[:, :-1], paths[idx])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"[{label}] step {step:5d}/{steps} loss {recent:.3f} ({time.time() - start:.0f}s)")
        if best is not None and validate is not None and ((step + 1) % eval_every == 0 or step == steps - 1):
            value = validate()
            log(f"[{label}] step {step + 1:5d} validation nll {value:.4f} (best {best[0]:.4f})")
            if value < best[0]:
                best = (value, step + 1, [p.detach().clone() for p in params])
    if best is not None:
        with torch.no_grad():
            for param, kept in zip(params, best[2]):
                param.copy_(kept)
        log(f"[{label}] kept the parameters of step {best[1]} (validation nll {best[0]:.4f})")
    return losses


@torch.no_grad()
def mean_nll(model: MemoryModel, windows: torch.Tensor, paths: np.ndarray | None, skip: int = 0) -> float:
    """Mean next-token NLL of ``windows`` ``[N, T+1]`` after their first ``skip`` predictions, with each
    window's memory path (``paths`` ``[N, levels]``) or none."""
    per_window = []
    for i in range(0, len(windows), 64):
        inputs, targets = windows[i : i + 64, :-1], windows[i : i + 64, 1:]
        logits = model(inputs) if paths is None else model.forward_path(inputs, torch.from_numpy(paths[i : i + 64]))
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        per_window.append(losses[:, skip:].mean(1))
    return torch.cat(per_window).mean().item()
