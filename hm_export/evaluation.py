"""Does the memory help? Perplexity without memory, with the routed memory and with a deliberately wrong path.

The protocol of both shipped examples: a window's memory path is routed from its routing context (the head
of its document), and perplexity is scored on the window's tokens after its first ``skip`` predictions.
The wrong path starts at the level-0 node farthest from the context and descends greedily below it:
if the memory is specific to its cluster, it should hurt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hm_export.architectures import MemoryModel
from hm_export.router import CentroidTree, Embedder
from hm_export.training import window_nll

CONDITIONS = ("no_memory", "routed_memory", "wrong_path_memory")


def farthest_path(tree: CentroidTree, embedding: np.ndarray) -> list[int]:
    """A deliberately wrong path: the level-0 node farthest from the context, then greedy below it."""
    first = int(((tree.centroids[0] - embedding) ** 2).sum(-1).argmax())
    path = [first]
    for level in range(1, tree.memory.num_levels):
        k = tree.memory.branching[level]
        children = path[-1] * k + np.arange(k)
        path.append(int(children[((tree.centroids[level][children] - embedding) ** 2).sum(-1).argmin()]))
    return path


def evaluate_memory(
    model: MemoryModel,
    tree: CentroidTree,
    embedder: Embedder,
    windows: np.ndarray,
    contexts: Sequence[str],
    skip: int = 0,
) -> dict[str, Any]:
    """Perplexity of ``windows`` ``[N, T+1]`` under the three :data:`CONDITIONS`; ``contexts[i]`` routes window ``i``.

    Contexts are embedded once per distinct text (windows of one document share its head).
    """
    distinct = sorted(set(contexts))
    embedded = embedder.embed(distinct)
    lookup = {text: row for row, text in enumerate(distinct)}
    embeddings = embedded[[lookup[c] for c in contexts]]
    routed = tree.route(embeddings)
    wrong = np.array([farthest_path(tree, e) for e in embedded])[[lookup[c] for c in contexts]]
    tokens = torch.as_tensor(np.asarray(windows, dtype=np.int64))
    results: dict[str, Any] = {"windows": len(tokens), "scored_tokens_per_window": tokens.shape[1] - 1 - skip}
    for name, paths in zip(CONDITIONS, (None, routed, wrong)):
        nll = window_nll(model, tokens, paths, skip).mean().item()
        results[name] = {"perplexity": round(math.exp(nll), 4), "nll": round(nll, 5)}
    change = results["routed_memory"]["perplexity"] / results["no_memory"]["perplexity"] - 1
    results["routed_vs_no_memory_perplexity_change"] = round(change, 4)
    results["distinct_routed_paths"] = len({tuple(p) for p in routed})
    return results
