"""The slot passes on a real ``torch.export`` program of a tiny SlotModule.

Every test exports afresh (about a second): the passes rewrite the program's graph in place.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
from conftest import XNNPACK_PASS_NAMES, tiny_config, tiny_model
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from hm_export.model import MemoryLM, assemble_path
from hm_export.passes.base import SlotPassContext, SlotPassError
from hm_export.passes.check_slot_access import check_slot_access
from hm_export.passes.fold_constant_subgraphs import fold_constant_subgraphs
from hm_export.passes.lift_memory_to_slot import lift_memory_to_slot
from hm_export.passes.pipeline import PIPELINES, SLOT_SPLIT, XNNPACK_SLOT
from hm_export.passes.reduce_norm_means_to_4d import reduce_norm_means_to_4d
from hm_export.passes.verify_slot_split import verify_slot_split
from hm_export.slot import SlotContract, SlotModule, slot_tensors

aten = torch.ops.aten
SEQ = 16
EXAMPLE_PATH = (0, 0)
OTHER_PATH = (1, 4)  # shares no block with EXAMPLE_PATH
CONSTANT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


@pytest.fixture(scope="module")
def model() -> MemoryLM:
    return tiny_model(tiny_config(max_seq_len=SEQ), seed=3)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (1, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def exported(model: MemoryLM, tokens: torch.Tensor) -> tuple[ExportedProgram, SlotPassContext]:
    """A fresh export of the SlotModule holding EXAMPLE_PATH, and the model's slot declaration."""
    module = SlotModule(model, assemble_path(model, EXAMPLE_PATH)).eval()
    contract = SlotContract.for_model(model.cfg, SEQ)
    ctx = SlotPassContext(module.memory_parameter_names(), module.anchor_parameter_names(), contract.input_names)
    with torch.no_grad():
        ep = torch.export.export(module, (tokens,), strict=False)
    return ep, ctx


def slot_of(model: MemoryLM, path: tuple[int, ...]) -> list[torch.Tensor]:
    return slot_tensors(assemble_path(model, path))


@torch.no_grad()
def run(ep: ExportedProgram, tokens: torch.Tensor, slot: list[torch.Tensor]) -> torch.Tensor:
    return ep.module()(tokens, *slot)


@torch.no_grad()
def eager(model: MemoryLM, tokens: torch.Tensor, path: tuple[int, ...]) -> torch.Tensor:
    return model.forward_path(tokens, torch.tensor(path))


def user_input_names(ep: ExportedProgram) -> list[str]:
    return [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]


def constant_placeholders(ep: ExportedProgram) -> set[str]:
    return {s.arg.name for s in ep.graph_signature.input_specs if s.kind in CONSTANT_KINDS}


def constant_only_nodes(ep: ExportedProgram) -> list[str]:
    """call_function nodes computed from parameters/buffers/constants alone (transitively)."""
    constant = set(constant_placeholders(ep))
    found = []
    for node in ep.graph.nodes:
        if node.op == "get_attr":
            constant.add(node.name)
        if node.op != "call_function":
            continue
        if all(arg.name in constant for arg in node.all_input_nodes):
            constant.add(node.name)
            found.append(node.name)
    return found


def rank3_last_axis_means(ep: ExportedProgram) -> list[torch.fx.Node]:
    return [
        n
        for n in ep.graph.nodes
        if n.op == "call_function"
        and n.target == aten.mean.dim
        and n.args[0].meta["val"].dim() == 3
        and list(n.args[1]) in ([-1], [2])
    ]


# --- lift_memory_to_slot ------------------------------------------------------------------------------


def test_lift_makes_the_slot_user_inputs_after_tokens(model, tokens, exported):
    ep, ctx = exported
    assert user_input_names(ep) == ["tokens"]
    assert set(ctx.memory_parameters) <= set(ep.state_dict)
    lifted = lift_memory_to_slot(ep, ctx)

    assert user_input_names(lifted) == ["tokens", "mem0_gate_up", "mem0_down", "mem1_gate_up", "mem1_down"]
    placeholders = [n.name for n in lifted.graph.nodes if n.op == "placeholder"]
    assert placeholders[-5:] == user_input_names(lifted)  # placeholder order follows the signature
    assert not set(ctx.memory_parameters) & set(lifted.state_dict)
    assert not set(ctx.memory_parameters) & set(lifted.constants)
    params = {s.target for s in lifted.graph_signature.input_specs if s.kind == InputKind.PARAMETER}
    assert params == set(ctx.anchor_parameters)
    # The slot placeholders carry the contract's shapes.
    by_name = {n.name: n for n in lifted.graph.nodes if n.op == "placeholder"}
    contract = SlotContract.for_model(model.cfg, SEQ)
    for tensor in contract.tensors:
        assert tuple(by_name[tensor.name].meta["val"].shape) == tensor.shape


def test_lifted_program_runs_whatever_path_is_fed(model, tokens, exported):
    lifted = lift_memory_to_slot(*exported)
    example, other = eager(model, tokens, EXAMPLE_PATH), eager(model, tokens, OTHER_PATH)
    assert (example - other).abs().max() > 1e-2  # the two paths really differ
    torch.testing.assert_close(run(lifted, tokens, slot_of(model, EXAMPLE_PATH)), example, rtol=0, atol=1e-6)
    # Feeding another path's slot gives that path's logits: nothing of the example path was baked in.
    torch.testing.assert_close(run(lifted, tokens, slot_of(model, OTHER_PATH)), other, rtol=0, atol=1e-6)


def test_lift_rejects_a_declared_parameter_the_program_lacks(exported):
    ep, ctx = exported
    ctx.memory_parameters = [*ctx.memory_parameters[:-1], "slot.mem7_down"]
    with pytest.raises(SlotPassError, match=r"slot\.mem7_down"):
        lift_memory_to_slot(ep, ctx)


# --- verify_slot_split --------------------------------------------------------------------------------


def test_verify_slot_split_passes_after_the_lift(exported):
    ep, ctx = exported
    lifted = lift_memory_to_slot(ep, ctx)
    assert verify_slot_split(lifted, ctx) is lifted
    assert ctx.notes["slot_inputs"] == 4
    assert ctx.notes["anchor_parameters"] == len(ctx.anchor_parameters) == 20


def test_verify_slot_split_rejects_an_unlifted_program(exported):
    ep, ctx = exported
    with pytest.raises(SlotPassError, match=r"bank weight 'slot\.mem0_gate_up' is still a constant"):
        verify_slot_split(ep, ctx)


def test_verify_slot_split_rejects_an_anchor_weight_turned_into_an_input(exported):
    ep, ctx = exported
    # Lift one anchor weight as if it were memory, then check against the model's real declaration.
    wrong = SlotPassContext(
        [*ctx.memory_parameters, "blocks.1.ffn.up.weight"],
        [n for n in ctx.anchor_parameters if n != "blocks.1.ffn.up.weight"],
        [*ctx.slot_input_names, "ffn_up"],
    )
    lifted = lift_memory_to_slot(ep, wrong)
    with pytest.raises(SlotPassError, match=r"anchor weight 'blocks\.1\.ffn\.up\.weight' is not a static parameter"):
        verify_slot_split(lifted, ctx)


def test_verify_slot_split_rejects_a_missing_anchor_parameter(exported):
    ep, ctx = exported
    lifted = lift_memory_to_slot(ep, ctx)
    ctx.anchor_parameters = [*ctx.anchor_parameters, "blocks.2.ffn.gate.weight"]
    with pytest.raises(SlotPassError, match=r"blocks\.2\.ffn\.gate\.weight"):
        verify_slot_split(lifted, ctx)


def test_verify_slot_split_rejects_slot_names_out_of_order(exported):
    ep, ctx = exported
    lifted = lift_memory_to_slot(ep, ctx)
    ctx.slot_input_names = [ctx.slot_input_names[1], ctx.slot_input_names[0], *ctx.slot_input_names[2:]]
    with pytest.raises(SlotPassError, match="slot inputs are"):
        verify_slot_split(lifted, ctx)


# --- fold_constant_subgraphs --------------------------------------------------------------------------


@pytest.mark.slow
def test_fold_removes_every_constant_only_op(model, tokens, exported):
    ep, ctx = exported
    lifted = lift_memory_to_slot(ep, ctx)
    nodes = {n.name: n for n in lifted.graph.nodes}
    targets = [nodes[name].target for name in constant_only_nodes(lifted)]
    # RoPE table slices (cos, sin), the causal-mask slice and its per-layer tiles use buffers alone.
    assert targets.count(aten.slice.Tensor) >= 2 and targets.count(aten.repeat.default) == 2
    slot = slot_of(model, OTHER_PATH)
    before = run(lifted, tokens, slot)
    nodes_before = len(lifted.graph.nodes)

    folded = fold_constant_subgraphs(lifted, ctx)
    assert constant_only_nodes(folded) == []
    assert ctx.notes["folded_nodes"] == nodes_before - len(folded.graph.nodes) > 0
    # The slot is still made of inputs, and nothing reading it was folded.
    assert user_input_names(folded) == ["tokens", *ctx.slot_input_names]
    torch.testing.assert_close(run(folded, tokens, slot), before, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(folded, tokens, slot), eager(model, tokens, OTHER_PATH), rtol=0, atol=1e-5)


# --- reduce_norm_means_to_4d --------------------------------------------------------------------------


def test_norm_means_become_4d(model, tokens, exported):
    ep, ctx = exported
    lifted = lift_memory_to_slot(ep, ctx)
    n_norms = 2 * model.cfg.n_layers + 1
    assert len(rank3_last_axis_means(lifted)) == n_norms
    slot = slot_of(model, OTHER_PATH)
    before = run(lifted, tokens, slot)

    reduced = reduce_norm_means_to_4d(lifted, ctx)
    assert rank3_last_axis_means(reduced) == []
    means = [n for n in reduced.graph.nodes if n.op == "call_function" and n.target == aten.mean.dim]
    assert len(means) == n_norms
    for mean in means:
        assert mean.args[0].meta["val"].dim() == 4
        assert list(mean.args[1]) == [2, 3] and mean.args[2] is True
        assert tuple(mean.meta["val"].shape) == (1, SEQ, 1, 1)
    assert ctx.notes["norm_means_rewritten"] == n_norms
    torch.testing.assert_close(run(reduced, tokens, slot), before, rtol=0, atol=1e-6)


# --- check_slot_access --------------------------------------------------------------------------------


def test_slot_access_check_passes_on_the_pipeline_output(model, tokens, exported):
    ep, ctx = exported
    out, _ = XNNPACK_SLOT.run(ep, ctx)
    assert check_slot_access(out, ctx) is out
    placeholders = {n.name: n for n in out.graph.nodes if n.op == "placeholder"}
    for name in ctx.slot_input_names:
        users = list(placeholders[name].users)
        assert len(users) == 1 and users[0].target == aten.bmm.default and users[0].args[1] is placeholders[name]


class _TransposedSlot(nn.Module):
    """A slot weight that is transposed before the matmul: the program would copy it on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 3, 4), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.weight.transpose(1, 2))


class _SlotAsFirstOperand(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 3, 4), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.weight, x)


def _lift_toy(module: nn.Module, x: torch.Tensor) -> tuple[ExportedProgram, SlotPassContext]:
    with torch.no_grad():
        ep = torch.export.export(module.eval(), (x,), strict=False)
    ctx = SlotPassContext(["weight"], [], ["toy_slot"])
    lifted = lift_memory_to_slot(ep, ctx)
    # The lift itself works on any module; only the access check objects.
    torch.testing.assert_close(lifted.module()(x, module.weight), module(x))
    return lifted, ctx


def test_slot_access_check_rejects_a_transposed_slot():
    lifted, ctx = _lift_toy(_TransposedSlot(), torch.randn(1, 2, 4))
    with pytest.raises(SlotPassError, match=r"'toy_slot' is read by aten\.transpose"):
        check_slot_access(lifted, ctx)


def test_slot_access_check_rejects_the_slot_as_bmm_input_operand():
    lifted, ctx = _lift_toy(_SlotAsFirstOperand(), torch.randn(1, 4, 2))
    with pytest.raises(SlotPassError, match=r"'toy_slot' is read by aten\.bmm\.default .*not as a bmm weight"):
        check_slot_access(lifted, ctx)


def test_slot_access_check_rejects_missing_slot_inputs(exported):
    ep, ctx = exported
    lifted = lift_memory_to_slot(ep, ctx)
    ctx.slot_input_names = [*ctx.slot_input_names, "mem5_down"]
    with pytest.raises(SlotPassError, match="'mem5_down' is missing"):
        check_slot_access(lifted, ctx)


# --- pipelines ----------------------------------------------------------------------------------------


def test_xnnpack_pipeline_records_every_pass(model, tokens, exported):
    ep, ctx = exported
    out, records = XNNPACK_SLOT.run(ep, ctx)
    assert [r.name for r in records] == XNNPACK_PASS_NAMES
    for previous, current in itertools.pairwise(records):
        assert current.nodes_before == previous.nodes_after
    assert records[-1].nodes_after == len(out.graph.nodes)
    by_name = {r.name: r for r in records}
    assert (
        by_name["fold_constant_subgraphs"].nodes_before - by_name["fold_constant_subgraphs"].nodes_after
        == (ctx.notes["folded_nodes"])
    )
    # Each 3-D mean becomes view -> mean -> view: two more nodes per norm.
    reduce = by_name["reduce_norm_means_to_4d"]
    assert reduce.nodes_after - reduce.nodes_before == 2 * ctx.notes["norm_means_rewritten"] == 10
    assert by_name["verify_slot_split"].nodes_before == by_name["verify_slot_split"].nodes_after
    # And the result still computes the model for any path.
    torch.testing.assert_close(
        run(out, tokens, slot_of(model, OTHER_PATH)), eager(model, tokens, OTHER_PATH), rtol=0, atol=1e-5
    )


def test_pipelines_are_registered_by_name():
    assert PIPELINES["slot_split"] is SLOT_SPLIT and PIPELINES["xnnpack_slot"] is XNNPACK_SLOT
    assert [p.__name__ for p in SLOT_SPLIT.passes] == ["lift_memory_to_slot", "verify_slot_split"]
    # Every pipeline starts with the split and its verification.
    for pipeline in PIPELINES.values():
        assert pipeline.passes[:2] == (lift_memory_to_slot, verify_slot_split)


def test_no_backend_is_imported_until_its_target_is_used():
    """An ONNX-only install must export: the pipelines, the exporter, the loader and the CLI import no toolchain
    (fold_constant_subgraphs is plain torch), and a target's modules load only when it runs."""
    code = (
        "import sys\n"
        "import hm_export.cli, hm_export.export, hm_export.runtime_stubs.loader, hm_export.checks, hm_export.verify\n"
        "from hm_export.passes.pipeline import PIPELINES\n"
        "toolchains = {'executorch', 'onnx', 'onnxruntime', 'coremltools'}\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & toolchains)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
