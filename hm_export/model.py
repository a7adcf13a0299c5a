"""Reference memory-augmented language model (Pouransari et al., 2025).

Anchor: token embedding (tied with the output head), pre-norm decoder blocks with RMSNorm, RoPE
attention with optional grouped KV heads, SwiGLU FFN.

Memory: a bank of FFN blocks, one per tree node.  The block of node ``i`` at level ``l`` holds,
for every memory layer, ``G, U`` (``r_l x d``) and ``D`` (``d x r_l``).  The blocks on a routed path
are concatenated along the FFN width, which is the same as adding a second SwiGLU::

    FFN(h) = D_a(silu(G_a h) * U_a h) + D_m(silu(G_m h) * U_m h)

Storage is in *slot layout* so assembling a path is a pure copy and the exported graph never
transposes the slot: per level ``gate = G^T`` and ``up = U^T`` as ``[nodes, layers, d, r]``, and
``down = D^T`` as ``[nodes, layers, r, d]``.  The assembled memory of one memory layer is

* ``gate_up``: ``[B, d, 2R]``, columns ``[0, R)`` the gate and ``[R, 2R)`` the up projection,
  level ``l`` at columns ``off_l .. off_l + r_l`` of each half;
* ``down``: ``[B, R, d]``, level ``l`` at rows ``off_l .. off_l + r_l``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hm_export.config import ModelConfig
from hm_export.errors import UsageError

if TYPE_CHECKING:
    pass

# One memory layer's assembled memory: (gate_up [B, d, 2R], down [B, R, d]).
LayerMemory = tuple[Tensor, Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[max_seq_len, head_dim]`` for the rotate-half RoPE convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def heads(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """RoPE'd queries ``[B, heads, T, hd]`` and keys / values ``[B, kv, T, hd]`` of ``x`` ``[B, T, d]``."""
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """RoPE'd queries ``[B*kv, group*T, hd]`` and keys / values ``[B*kv, T, hd]`` of ``x`` ``[B, T, d]``.

        Grouped KV heads without repeating K/V: the query heads sharing a KV head are stacked along the
        sequence axis (group-major), so every attention matmul stays a plain batched matmul.
        """
        batch, seq, _ = x.shape
        q, k, v = self.heads(x, cos, sin)
        kv_batch = batch * self.n_kv_heads
        q = q.reshape(kv_batch, self.group * seq, self.head_dim)
        return q, k.reshape(kv_batch, seq, self.head_dim), v.reshape(kv_batch, seq, self.head_dim)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, grouped_mask: Tensor, batch: int, seq: int) -> Tensor:
        """Attention output ``[B, T, d]`` of grouped queries over keys/values (``project``'s layout).

        ``grouped_mask`` is the additive mask of the stacked query rows, ``[group*T, keys]``.
        3-D bmm rather than 4-D matmul: matmul decomposes into expand copies XNNPACK cannot take.
        """
        scores = torch.bmm(q, k.transpose(1, 2)) * (self.head_dim**-0.5) + grouped_mask
        out = torch.bmm(torch.softmax(scores, dim=-1), v)
        # Unflatten before the head view: a direct view trips torch.export's guard on a dynamic T.
        out = out.unflatten(1, (self.group, seq)).view(batch, self.n_heads, seq, self.head_dim)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        return self.attend(q, k, v, mask.repeat(self.group, 1), batch, seq)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def memory_ffn(
    x: Tensor, memory: LayerMemory | Callable[[Tensor], Tensor], activation: Callable[[Tensor], Tensor] = F.silu
) -> Tensor:
    """``D_m(act(G_m x) * U_m x)`` with the slot as batched-matmul operands (no transposes).

    ``activation`` is the host FFN's (SiLU for the anchor; a Hugging Face host's own, e.g. tanh-GELU for Gemma).
    A callable ``memory`` computes the SiLU form itself (a quantized slot's fused kernel, :mod:`hm_export.kernels`).
    """
    if callable(memory):
        return memory(x)
    gate_up, down = memory
    width = down.shape[-2]
    hidden = torch.bmm(x, gate_up)
    return torch.bmm(activation(hidden[..., :width]) * hidden[..., width:], down)


def check_forward_inputs(cfg: ModelConfig, tokens: Tensor, memory: Sequence[LayerMemory] | None) -> None:
    """The window fits ``max_seq_len`` and ``memory`` has one entry per memory layer."""
    if tokens.shape[1] > cfg.max_seq_len:
        raise UsageError(f"sequence of {tokens.shape[1]} tokens exceeds max_seq_len {cfg.max_seq_len}")
    if memory is not None and len(memory) != len(cfg.memory.layers):
        raise UsageError(f"memory has {len(memory)} layers, the model declares {len(cfg.memory.layers)}")


def expand_paths(tokens: Tensor, paths: Tensor) -> Tensor:
    """``paths`` as ``[B, levels]``: a single ``[levels]`` path is shared by the batch."""
    return paths.unsqueeze(0).expand(tokens.shape[0], -1) if paths.dim() == 1 else paths


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def feed_forward(self, x: Tensor, memory: LayerMemory | None) -> Tensor:
        """The residual FFN half of the block: ``x + FFN(norm(x))``, plus the memory FFN when given."""
        h = self.ffn_norm(x)
        out = self.ffn(h)
        if memory is not None:
            out = out + memory_ffn(h, memory)
        return x + out

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, memory: LayerMemory | None) -> Tensor:
        return self.feed_forward(x + self.attn(self.attn_norm(x), cos, sin, mask), memory)


class TiedHead(nn.Module):
    """The output head tied to the token embedding: ``h @ E^T``.  It reads the embedding's parameter without
    registering it, so the weight has one name in checkpoints and one placeholder in exported programs; an
    export may replace the module (:mod:`hm_export.anchor_quant`: a quantized head, or a kernel reading the table).
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = [embedding]  # a list: not a registered submodule

    @property
    def weight(self) -> Tensor:
        return self.embedding[0].weight

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight)


class MemoryBank(nn.Module):
    """All blocks of the tree, level by level, in slot layout (see the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        mem, d, n_mem = cfg.memory, cfg.d_model, len(cfg.memory.layers)
        self.cfg = cfg
        self.gate = nn.ParameterList()
        self.up = nn.ParameterList()
        self.down = nn.ParameterList()
        for level, r in enumerate(mem.widths):
            nodes = mem.nodes_at(level)
            self.gate.append(nn.Parameter(torch.randn(nodes, n_mem, d, r) * d**-0.5))
            self.up.append(nn.Parameter(torch.randn(nodes, n_mem, d, r) * d**-0.5))
            self.down.append(nn.Parameter(torch.zeros(nodes, n_mem, r, d)))  # D starts at zero

    def assemble(self, paths: Tensor) -> list[LayerMemory]:
        """Concatenate the blocks of ``paths`` (``[B, levels]`` node ids) per memory layer."""
        levels = range(self.cfg.memory.num_levels)
        gates = [self.gate[lv][paths[:, lv]] for lv in levels]  # each [B, n_mem, d, r_l]
        ups = [self.up[lv][paths[:, lv]] for lv in levels]
        downs = [self.down[lv][paths[:, lv]] for lv in levels]
        gate_up = torch.cat(gates + ups, dim=-1)  # [B, n_mem, d, 2R]
        down = torch.cat(downs, dim=-2)  # [B, n_mem, R, d]
        # unbind, not gate_up[:, j] per layer: one backward node for all layers instead of one full-size
        # gradient per layer (that cost grew with the square of the number of memory layers)
        return list(zip(gate_up.unbind(1), down.unbind(1)))


class MemoryLM(nn.Module):
    """Anchor transformer plus hierarchical FFN memory."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.head = TiedHead(self.embed)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.bank = MemoryBank(cfg)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        causal = torch.full((cfg.max_seq_len, cfg.max_seq_len), float("-inf")).triu(1)
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, tokens: Tensor, memory: Sequence[LayerMemory] | None = None) -> Tensor:
        """Logits ``[B, T, vocab]`` given an already assembled memory (one entry per memory layer)."""
        check_forward_inputs(self.cfg, tokens, memory)
        seq = tokens.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        mask = self.causal_mask[:seq, :seq]
        layer_memory = dict(zip(self.cfg.memory.layers, memory)) if memory is not None else {}
        x = self.embed(tokens)
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, layer_memory.get(index))
        return self.output_logits(self.norm(x))

    def output_logits(self, h: Tensor) -> Tensor:
        """Logits of the final normalised hidden states (the tied head)."""
        return self.head(h)

    def forward_path(self, tokens: Tensor, paths: Tensor) -> Tensor:
        """Logits with the memory of ``paths`` (``[B, levels]`` or ``[levels]`` node ids)."""
        return self(tokens, self.bank.assemble(expand_paths(tokens, paths)))

    def anchor_parameters(self) -> list[nn.Parameter]:
        bank_ids = {id(p) for p in self.bank.parameters()}
        return [p for p in self.parameters() if id(p) not in bank_ids]

    kernel_attention = True  # plain scaled-dot-product attention: the attention kernel's


def assemble_path(model: nn.Module, path: Sequence[int]) -> list[LayerMemory]:
    """The assembled memory of one path, batch 1, detached: what the exported slot receives."""
    path = model.cfg.memory.validate_path(path)
    with torch.no_grad():
        return [(g.clone(), d.clone()) for g, d in model.bank.assemble(torch.tensor([path]))]
