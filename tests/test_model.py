"""The reference model against explicit re-computations: memory as a sum of per-level SwiGLUs, as a
widened anchor FFN, grouped KV heads, memory layer placement, path validation and batching."""

from __future__ import annotations

import copy
import math
from itertools import product

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bank_down, tiny_config, tiny_model
from torch import Tensor

from hm_export.config import ConfigError, MemoryConfig
from hm_export.model import MemoryLM, SwiGLU, assemble_path, memory_ffn

ATOL, RTOL = 1e-5, 1e-5


def random_tokens(cfg, batch: int, seq: int, seed: int = 0) -> Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def all_paths(memory: MemoryConfig) -> list[tuple[int, ...]]:
    """Every root-to-leaf chain, built from the children rule ``child = parent * k + c``."""
    paths = [(node,) for node in range(memory.branching[0])]
    for k in memory.branching[1:]:
        paths = [(*p, p[-1] * k + c) for p in paths for c in range(k)]
    return paths


def swiglu_ref(h: Tensor, G: Tensor, U: Tensor, D: Tensor) -> Tensor:
    """``D (silu(G h) * U h)`` with ``G, U: [r, d]`` and ``D: [d, r]`` (math orientation)."""
    return (F.silu(h @ G.T) * (h @ U.T)) @ D.T


def level_block(model: MemoryLM, level: int, node: int, layer_slot: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(G_l, U_l, D_l)`` of one tree node for one memory layer, from the bank's slot-layout tensors."""
    bank = model.bank
    return (
        bank.gate[level][node, layer_slot].T,  # stored G^T [d, r]
        bank.up[level][node, layer_slot].T,  # stored U^T [d, r]
        bank.down[level][node, layer_slot].T,  # stored D^T [r, d]
    )


def anchor_ffn_ref(block, h: Tensor) -> Tensor:
    ffn = block.ffn
    return swiglu_ref(h, ffn.gate.weight, ffn.up.weight, ffn.down.weight)


# --------------------------------------------------------------------------------------------- (a)


def test_fresh_model_memory_is_exactly_a_no_op():
    cfg = tiny_config()
    model = tiny_model(cfg, seed=3, nonzero_memory=False)
    assert all(torch.count_nonzero(d) == 0 for d in model.bank.down)  # D starts at zero
    tokens = random_tokens(cfg, 2, 12)
    with torch.no_grad():
        anchor = model(tokens)
        for path in all_paths(cfg.memory):
            assert torch.equal(model.forward_path(tokens, torch.tensor(path)), anchor), path


# --------------------------------------------------------------------------------------------- (b)


def test_memory_ffn_equals_sum_of_level_swiglus():
    cfg = tiny_config()
    model = tiny_model(cfg, seed=1)
    paths = torch.tensor([[0, 2], [1, 3], [1, 5]])
    h = torch.randn(len(paths), 7, cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        memory = model.bank.assemble(paths)
        assert len(memory) == len(cfg.memory.layers)
        for slot, layer in enumerate(cfg.memory.layers):
            gate_up, down = memory[slot]
            R = cfg.memory.total_width
            assert gate_up.shape == (len(paths), cfg.d_model, 2 * R) and down.shape == (len(paths), R, cfg.d_model)
            got = memory_ffn(h, memory[slot])
            for row, path in enumerate(paths.tolist()):
                expected = sum(
                    swiglu_ref(h[row], *level_block(model, level, node, slot)) for level, node in enumerate(path)
                )
                assert expected.abs().max() > 1e-2  # the memory is not trivially zero
                torch.testing.assert_close(got[row], expected, atol=ATOL, rtol=RTOL)

            # Whole FFN sub-layer of the block: anchor SwiGLU + per-level SwiGLUs.
            block = model.blocks[layer]
            x = torch.randn(len(paths), 7, cfg.d_model, generator=torch.Generator().manual_seed(slot + 10))
            seq = x.shape[1]
            mask = model.causal_mask[:seq, :seq]
            cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
            after_attn = x + block.attn(block.attn_norm(x), cos, sin, mask)
            hn = block.ffn_norm(after_attn)
            expected_block = torch.stack(
                [
                    after_attn[row]
                    + anchor_ffn_ref(block, hn[row])
                    + sum(swiglu_ref(hn[row], *level_block(model, lv, node, slot)) for lv, node in enumerate(path))
                    for row, path in enumerate(paths.tolist())
                ]
            )
            got_block = block(x, cos, sin, mask, memory[slot])
            torch.testing.assert_close(got_block, expected_block, atol=ATOL, rtol=RTOL)


def widened_anchor(model: MemoryLM, path: tuple[int, ...]) -> MemoryLM:
    """A copy whose memory layers have a plain SwiGLU of width ffn_hidden + R: [G_a; G_m], [U_a; U_m], [D_a, D_m]."""
    cfg = model.cfg
    wide = copy.deepcopy(model)
    for slot, layer in enumerate(cfg.memory.layers):
        blocks = [level_block(model, level, node, slot) for level, node in enumerate(path)]
        G_m = torch.cat([b[0] for b in blocks], dim=0)  # [R, d]
        U_m = torch.cat([b[1] for b in blocks], dim=0)  # [R, d]
        D_m = torch.cat([b[2] for b in blocks], dim=1)  # [d, R]
        anchor = model.blocks[layer].ffn
        ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden + cfg.memory.total_width)
        with torch.no_grad():
            ffn.gate.weight.copy_(torch.cat([anchor.gate.weight, G_m], dim=0))
            ffn.up.weight.copy_(torch.cat([anchor.up.weight, U_m], dim=0))
            ffn.down.weight.copy_(torch.cat([anchor.down.weight, D_m], dim=1))
        wide.blocks[layer].ffn = ffn
    return wide


@pytest.mark.parametrize("layers", [(0, 1, 2), (0, 2), (1,)])
def test_widened_anchor_ffn_equals_forward_path(layers):
    cfg = tiny_config(n_layers=3, memory=MemoryConfig(branching=(2, 3), widths=(8, 4), layers=layers))
    model = tiny_model(cfg, seed=2, nonzero_memory=False)
    randomize_bank_down(model, torch.Generator().manual_seed(7))
    tokens = random_tokens(cfg, 2, 16, seed=1)
    with torch.no_grad():
        anchor = model(tokens)
        for path in [(0, 1), (1, 5)]:
            wide = widened_anchor(model, path)
            expected = wide(tokens)  # no memory argument: a plain transformer
            got = model.forward_path(tokens, torch.tensor(path))
            assert (expected - anchor).abs().max() > 1e-3  # memory actually matters
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------------------- (c)


def rope_ref(x: Tensor, theta: float) -> Tensor:
    """Rotate-half RoPE, pair ``(i, i + hd/2)`` rotated by ``pos * theta^(-2i/hd)``; ``x: [B, T, hd]``."""
    seq, hd = x.shape[-2], x.shape[-1]
    half = hd // 2
    out = torch.empty_like(x)
    for pos in range(seq):
        for i in range(half):
            angle = pos * theta ** (-2.0 * i / hd)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[..., pos, i], x[..., pos, i + half]
            out[..., pos, i] = a * c - b * s
            out[..., pos, i + half] = b * c + a * s
    return out


def attention_ref(attn, x: Tensor, cfg) -> Tensor:
    """Per query head, an explicit loop: head ``h`` reads KV head ``h // (n_heads / n_kv_heads)``."""
    hd, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    q, k, v = x @ attn.wq.weight.T, x @ attn.wk.weight.T, x @ attn.wv.weight.T
    heads = []
    for head in range(cfg.n_heads):
        kv = head // group
        qh = rope_ref(q[..., head * hd : (head + 1) * hd], cfg.rope_theta)
        kh = rope_ref(k[..., kv * hd : (kv + 1) * hd], cfg.rope_theta)
        vh = v[..., kv * hd : (kv + 1) * hd]
        rows = []
        for t in range(x.shape[1]):  # causal: query t sees keys 0..t
            scores = torch.einsum("bd,bsd->bs", qh[:, t], kh[:, : t + 1]) / math.sqrt(hd)
            rows.append(torch.einsum("bs,bsd->bd", torch.softmax(scores, -1), vh[:, : t + 1]))
        heads.append(torch.stack(rows, dim=1))
    return torch.cat(heads, dim=-1) @ attn.wo.weight.T


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_grouped_kv_attention_matches_explicit_reference(n_kv_heads):
    cfg = tiny_config(n_kv_heads=n_kv_heads)
    model = tiny_model(cfg, seed=4)
    attn = model.blocks[1].attn
    assert attn.wk.weight.shape == (n_kv_heads * cfg.head_dim, cfg.d_model)
    x = torch.randn(2, 9, cfg.d_model, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = attn(x, model.rope_cos[:9], model.rope_sin[:9], model.causal_mask[:9, :9])
        torch.testing.assert_close(got, attention_ref(attn, x, cfg), atol=ATOL, rtol=RTOL)


def test_grouped_kv_equals_full_heads_with_repeated_kv_weights():
    cfg = tiny_config(n_kv_heads=2)
    full_cfg = tiny_config(n_kv_heads=cfg.n_heads)
    gqa = tiny_model(cfg, seed=5)
    group, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    state = gqa.state_dict()
    for name in list(state):
        if name.endswith(("attn.wk.weight", "attn.wv.weight")):
            w = state[name].view(cfg.n_kv_heads, hd, cfg.d_model)
            state[name] = w.repeat_interleave(group, dim=0).reshape(cfg.n_heads * hd, cfg.d_model)
    full = MemoryLM(full_cfg).eval()
    full.load_state_dict(state)
    tokens = random_tokens(cfg, 2, 20, seed=2)
    with torch.no_grad():
        for path in [(0, 0), (1, 4)]:
            torch.testing.assert_close(
                gqa.forward_path(tokens, torch.tensor(path)),
                full.forward_path(tokens, torch.tensor(path)),
                atol=ATOL,
                rtol=RTOL,
            )


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_attention_is_causal(n_kv_heads):
    cfg = tiny_config(n_kv_heads=n_kv_heads)
    model = tiny_model(cfg, seed=6)
    tokens = random_tokens(cfg, 1, 24, seed=3)
    changed = tokens.clone()
    t0 = 15
    changed[0, t0] = (tokens[0, t0] + 1) % cfg.vocab_size
    path = torch.tensor([1, 4])
    with torch.no_grad():
        before, after = model.forward_path(tokens, path), model.forward_path(changed, path)
    torch.testing.assert_close(after[:, :t0], before[:, :t0], atol=1e-6, rtol=0)
    assert all((after[0, t] - before[0, t]).abs().max() > 1e-5 for t in range(t0, 24))


# --------------------------------------------------------------------------------------------- (d)


def block_outputs(model: MemoryLM, tokens: Tensor, path: Tensor | None) -> tuple[Tensor, list[Tensor]]:
    outputs: list[Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out.clone())) for b in model.blocks]
    try:
        with torch.no_grad():
            logits = model(tokens) if path is None else model.forward_path(tokens, path)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, outputs


def test_memory_on_a_subset_of_layers_only_touches_those_layers():
    cfg = tiny_config(n_layers=4, memory=MemoryConfig(branching=(2, 3), widths=(8, 4), layers=(2, 3)))
    model = tiny_model(cfg, seed=8)
    assert model.bank.gate[0].shape == (2, 2, cfg.d_model, 8)  # [nodes, memory layers, d, r]
    tokens = random_tokens(cfg, 2, 10, seed=4)
    path = torch.tensor([0, 2])
    anchor_logits, anchor_out = block_outputs(model, tokens, None)
    logits, out = block_outputs(model, tokens, path)
    assert torch.equal(out[0], anchor_out[0]) and torch.equal(out[1], anchor_out[1])
    assert (out[2] - anchor_out[2]).abs().max() > 1e-3 and (out[3] - anchor_out[3]).abs().max() > 1e-3
    assert (logits - anchor_logits).abs().max() > 1e-3

    # Memory slot 0 belongs to layer 2: with it zeroed, layers 0..2 are the anchor's and layer 3 is not.
    with torch.no_grad():
        for down in model.bank.down:
            down[:, 0] = 0
    _, out = block_outputs(model, tokens, path)
    assert all(torch.equal(out[i], anchor_out[i]) for i in range(3))
    assert (out[3] - anchor_out[3]).abs().max() > 1e-3

    # The whole bank zeroed: exactly the anchor.
    with torch.no_grad():
        for down in model.bank.down:
            down.zero_()
    logits, _ = block_outputs(model, tokens, path)
    assert torch.equal(logits, anchor_logits)


def test_forward_rejects_wrong_memory_count_and_long_sequences():
    cfg = tiny_config()
    model = tiny_model(cfg)
    tokens = random_tokens(cfg, 1, 8)
    memory = model.bank.assemble(torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="memory has 1 layers"):
        model(tokens, memory[:1])
    with pytest.raises(ValueError, match="exceeds max_seq_len 32"):
        model(random_tokens(cfg, 1, 33))


# --------------------------------------------------------------------------------------------- (e)


def test_validate_path_accepts_exactly_the_root_to_leaf_chains():
    memory = MemoryConfig(branching=(2, 3, 2), widths=(4, 4, 4), layers=(0,))
    valid = set(all_paths(memory))
    assert len(valid) == 2 * 3 * 2
    for path in product(range(2), range(6), range(12)):
        if path in valid:
            assert memory.validate_path(list(path)) == path
        else:
            with pytest.raises(ConfigError, match="is not a child of"):
                memory.validate_path(path)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ((0,), r"has 1 levels, the memory has 2"),
        ((0, 1, 0), r"has 3 levels, the memory has 2"),
        ((), r"has 0 levels"),
        ((2, 6), r"node 2 out of range at level 0"),
        ((-1, 0), r"node -1 out of range at level 0"),
        ((1, 6), r"node 6 out of range at level 1"),
        ((0, -1), r"node -1 out of range at level 1"),
        ((0, 3), r"node 3 at level 1 is not a child of 0"),
        ((1, 2), r"node 2 at level 1 is not a child of 1"),
    ],
)
def test_validate_path_rejects(path, message):
    memory = tiny_config().memory
    with pytest.raises(ConfigError, match=message):
        memory.validate_path(path)


def test_assemble_path_validates_and_matches_bank_assemble():
    model = tiny_model()
    memory = assemble_path(model, (1, 4))
    reference = model.bank.assemble(torch.tensor([[1, 4]]))
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(memory, reference, strict=True))
    with pytest.raises(ConfigError):
        assemble_path(model, (0, 4))


# --------------------------------------------------------------------------------------------- (f)


def test_batch_with_per_row_paths_equals_row_by_row():
    cfg = tiny_config()
    model = tiny_model(cfg, seed=9)
    paths = torch.tensor(all_paths(cfg.memory))  # 6 distinct paths
    tokens = random_tokens(cfg, len(paths), 14, seed=5)
    same = tokens[:1].expand(len(paths), -1)
    with torch.no_grad():
        batched = model.forward_path(tokens, paths)
        batched_same = model.forward_path(same, paths)
        for row, path in enumerate(paths):
            torch.testing.assert_close(
                batched[row], model.forward_path(tokens[row : row + 1], path)[0], atol=1e-6, rtol=0
            )
            torch.testing.assert_close(batched_same[row], model.forward_path(same[:1], path)[0], atol=1e-6, rtol=0)
    # The same tokens under different paths give different logits: rows really carry their own memory.
    for a, b in zip(range(len(paths)), range(1, len(paths)), strict=False):
        assert (batched_same[a] - batched_same[b]).abs().max() > 1e-3
