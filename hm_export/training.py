"""Training loops shared by the shipped examples and the Hugging Face memory recipe (:mod:`hm_export.hf.recipe`).

Memories are trained the paper's way: the anchor (or host) is frozen, every training window uses the blocks
of its document's greedily routed path, and only the bank's parameters move.

Progress goes to stderr: a ``tqdm`` bar over the steps with the running loss on a terminal, otherwise one log
line every 50 steps; stdout is left to the caller (``--json`` reports).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from hm_export.architectures import MemoryModel
from hm_export.console import progress_bar

LOG_EVERY = 50
LOGIT_BUDGET = 1 << 26  # float32 logits per evaluation chunk (256 MB): bounds memory on large vocabularies


def document_windows(tokenizer: Tokenizer, docs: list[str], length: int) -> list[list[list[int]]]:
    """Per document, its non-overlapping ``length``-token windows (a tail shorter than that is dropped)."""
    return [
        [enc.ids[i : i + length] for i in range(0, len(enc.ids) - length + 1, length)]
        for enc in tokenizer.encode_batch(docs)
    ]


WindowSplit = dict[str, tuple[np.ndarray, np.ndarray]]
VALIDATION_OFFSET, TEST_OFFSET = 2, 5  # which window of every ``stride`` windows of a document is held out


def split_windows(per_doc: list[list[list[int]]], stride: int = 10, held_docs: set[int] | None = None) -> WindowSplit:
    """Split documents' windows into ``train``, ``validation`` (window 2 of every ``stride``: early stopping),
    ``test`` (window 5 of every ``stride``: never used for training or selection) and ``documents`` (every
    window of the ``held_docs``, held out whole).  Each part is ``(windows [N, T], owning document [N])``."""
    parts: dict[str, tuple[list[list[int]], list[int]]] = {
        name: ([], []) for name in ("train", "validation", "test", "documents")
    }
    held_docs = held_docs or set()
    for doc, windows in enumerate(per_doc):
        for index, window in enumerate(windows):
            name = (
                "documents"
                if doc in held_docs
                else {VALIDATION_OFFSET: "validation", TEST_OFFSET: "test"}.get(index % stride, "train")
            )
            parts[name][0].append(window)
            parts[name][1].append(doc)
    width = next((len(windows[0]) for windows in per_doc if windows), 0)
    return {
        name: (np.array(rows, dtype=np.int64).reshape(len(rows), width), np.array(owners, dtype=np.int64))
        for name, (rows, owners) in parts.items()
    }


def spread(count: int, limit: int) -> np.ndarray:
    """At most ``limit`` indices of ``range(count)``, evenly spread (a fixed, cheap subset of a held-out set)."""
    return np.arange(count) if count <= limit else np.linspace(0, count - 1, limit).round().astype(np.int64)


def stderr_log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


@dataclass
class TrainResult:
    """Per-step losses, the validation curve ``(step, value)``, the step whose parameters were kept, why it stopped."""

    losses: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    kept_step: int | None = None
    stopped: str = "steps"  # "steps" or "time budget"
    seconds: float = 0.0


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
    max_seconds: float | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """AdamW with warmup + cosine decay on windows ``data`` ``[N, T+1]``; ``paths`` (``[N, levels]``) given
    means every window uses its memory path.

    ``max_seconds``: a time budget; the schedule runs on whichever of steps and time is further along, so
    the learning rate has decayed when either runs out.  With ``validate`` (a held-out NLL), it is measured
    every ``eval_every`` steps and at the end, and the parameters come back as they were at the best
    measurement (early stopping; step 0 is the parameters as given).  ``progress``: a tqdm bar on stderr
    (:func:`~hm_export.console.progress_bar`; default: when stderr is a terminal).
    """
    log = log or stderr_log
    show_bar = sys.stderr.isatty() if progress is None else progress
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1 if paths is None else 0.0)
    gen = torch.Generator().manual_seed(seed)
    warmup, result, start = max(1, steps // 20), TrainResult(), time.time()
    best: tuple[float, int, list[torch.Tensor]] | None = None
    if validate is not None:
        first = validate()
        result.validation.append((0, first))
        best = (first, 0, [p.detach().clone() for p in params])
    bar = progress_bar(total=steps, enabled=show_bar, desc=label, unit="step", dynamic_ncols=True)

    def measure(step: int) -> None:
        nonlocal best
        assert validate is not None and best is not None
        value = validate()
        result.validation.append((step, value))
        log(f"[{label}] step {step:5d} validation nll {value:.4f} (best {min(value, best[0]):.4f})")
        if value < best[0]:
            best = (value, step, [p.detach().clone() for p in params])

    step = 0
    for step in range(steps):
        elapsed = time.time() - start
        if max_seconds is not None and elapsed > max_seconds:
            result.stopped = "time budget"
            log(f"[{label}] time budget of {max_seconds:.0f}s reached after {step} steps")
            break
        done = max(step / steps, elapsed / max_seconds if max_seconds else 0.0)
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * scale)
        idx = torch.randint(len(data), (batch,), generator=gen)
        tokens = data[idx]
        logits = model(tokens[:, :-1]) if paths is None else model.forward_path(tokens[:, :-1], paths[idx])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        del logits
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        result.losses.append(loss.item())
        recent = result.losses[-LOG_EVERY:]
        bar.update(1)
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
        if not show_bar and (step % LOG_EVERY == 0 or step == steps - 1):
            log(f"[{label}] step {step:5d}/{steps} loss {sum(recent) / len(recent):.3f} ({time.time() - start:.0f}s)")
        if validate is not None and (step + 1) % eval_every == 0 and step + 1 < steps:
            measure(step + 1)
    bar.close()
    if validate is not None and result.losses and result.validation[-1][0] != len(result.losses):
        measure(len(result.losses))
    if best is not None:
        with torch.no_grad():
            for param, kept in zip(params, best[2]):
                param.copy_(kept)
        result.kept_step = best[1]
        log(f"[{label}] kept the parameters of step {best[1]} (validation nll {best[0]:.4f})")
    result.seconds = round(time.time() - start, 1)
    return result


@torch.no_grad()
def window_nll(model: MemoryModel, windows: torch.Tensor, paths: np.ndarray | None, skip: int = 0) -> torch.Tensor:
    """Per window ``[N, T+1]``, the mean next-token NLL after its first ``skip`` predictions, with each window's
    memory path (``paths`` ``[N, levels]``) or none.  Evaluated in chunks of bounded logit size."""
    length = windows.shape[1] - 1
    chunk = int(max(1, min(64, LOGIT_BUDGET // (length * model.cfg.vocab_size))))
    per_window = []
    for i in range(0, len(windows), chunk):
        inputs, targets = windows[i : i + chunk, :-1], windows[i : i + chunk, 1:]
        logits = model(inputs) if paths is None else model.forward_path(inputs, torch.from_numpy(paths[i : i + chunk]))
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        per_window.append(losses[:, skip:].mean(1))
    return torch.cat(per_window)


def mean_nll(model: MemoryModel, windows: torch.Tensor, paths: np.ndarray | None, skip: int = 0) -> float:
    """Mean of :func:`window_nll`."""
    return window_nll(model, windows, paths, skip).mean().item()
