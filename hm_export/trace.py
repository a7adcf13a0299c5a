"""Trace a checkpoint's model into a ``torch.export`` program whose memory is a slot: the full-window program
(:func:`trace_slot_program`) and the KV-cache decode program (:func:`trace_decode_program`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch.export import ExportedProgram

from hm_export.architectures import decode_module, slot_module
from hm_export.config import MemoryConfig
from hm_export.decode import POSITION_INPUT, Attention, CacheForm
from hm_export.model import assemble_path
from hm_export.passes.base import SlotPassContext
from hm_export.passes.pipeline import PassPipeline, PassRecord
from hm_export.slot import LOGITS_OUTPUT, TOKENS_INPUT, SlotContract, SlotParameters

if TYPE_CHECKING:
    from hm_export.architectures import MemoryModel
    from hm_export.kernels.strategies import SlotLayout

WINDOW_STEM = "model"  # file name stem of the full-window program (model.pte, model.onnx, ...)


@dataclass(frozen=True)
class TensorIO:
    """One program input, output or state.  A ``str`` in ``shape`` names a dynamic axis of the program."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class SlotProgram:
    """A program whose user inputs are ``inputs`` (ending with the slot) plus what the passes recorded.

    ``example_inputs`` are the flat values of ``inputs``; ``dynamic_shapes`` (flat, one entry per input) and
    ``axes`` (axis name -> inclusive bounds) describe its dynamic axes; ``states`` are buffers the program
    updates in place across calls; ``stem`` names its files in a bundle.
    """

    program: ExportedProgram
    contract: SlotContract
    example_inputs: tuple[torch.Tensor, ...]
    pass_records: list[PassRecord]
    notes: dict[str, object]
    stem: str
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]
    states: tuple[TensorIO, ...] = ()
    dynamic_shapes: tuple[Any, ...] | None = None
    axes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # A decode program's prefill method: the same module, inputs and weights, returning the last position's
    # logits only (``[1, 1, vocab]``); emitted into the same file by targets that hold several methods.
    prefill: SlotProgram | None = None

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def io_dict(self) -> dict[str, Any]:
        """The manifest's description of this program's interface."""
        body: dict[str, Any] = {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }
        if self.states:
            body["states"] = [t.to_dict() for t in self.states]
        if self.axes:
            body["axes"] = {name: list(bounds) for name, bounds in self.axes.items()}
        return body


def example_path(memory: MemoryConfig) -> list[int]:
    """The first root-to-leaf path (node 0, its first child, ...): example values for tracing."""
    path = [0] * memory.num_levels
    for level in range(1, len(path)):
        path[level] = path[level - 1] * memory.branching[level]
    return path


def slot_io(contract: SlotContract) -> tuple[TensorIO, ...]:
    return tuple(TensorIO(t.name, t.shape, t.dtype) for t in contract.tensors)


def export_slot_module(
    module: SlotParameters,
    args: tuple[Any, ...],
    contract: SlotContract,
    pipeline: PassPipeline,
    **description: Any,
) -> SlotProgram:
    """``torch.export`` a slot module (:class:`SlotParameters`) with ``args`` and run ``pipeline`` on it.

    ``description`` holds the :class:`SlotProgram` fields that describe the interface (``stem``, ``inputs``,
    ``outputs``, ...); ``dynamic_shapes`` there is the flat per-input form, and ``export_dynamic_shapes``
    (popped) the form matching ``module.forward``'s signature, when it differs.
    """
    export_dynamic = description.pop("export_dynamic_shapes", description.get("dynamic_shapes"))
    ctx = SlotPassContext(
        module.memory_parameter_names(), module.anchor_parameter_names(), contract.input_names, module.slot_reader
    )
    with torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=export_dynamic, strict=False)
    program, records = pipeline.run(program, ctx)
    slot = [module.get_parameter(name).detach() for name in module.memory_parameter_names()]
    return SlotProgram(program, contract, (*args, *slot), records, ctx.notes, **description)


def trace_slot_program(
    model: MemoryModel, contract: SlotContract, pipeline: PassPipeline, layout: SlotLayout | None = None
) -> SlotProgram:
    """Export the full-window anchor with the memory of :func:`example_path` as parameters, then run ``pipeline``.

    The path only provides example values: after the lift, the slot is an input and any path can be fed.
    """
    module = slot_module(model, assemble_path(model, example_path(model.cfg.memory)), layout).eval()
    tokens = torch.zeros(1, contract.seq_len, dtype=torch.long)
    return export_slot_module(
        module,
        (tokens,),
        contract,
        pipeline,
        stem=WINDOW_STEM,
        inputs=(TensorIO(TOKENS_INPUT, (1, contract.seq_len), "int64"), *slot_io(contract)),
        outputs=(TensorIO(LOGITS_OUTPUT, (1, contract.seq_len, model.cfg.vocab_size), "float32"),),
    )


DECODE_STEM = "decode"
TOKENS_AXIS = "n"  # the dynamic number of tokens per call


def trace_decode_program(
    model: MemoryModel,
    contract: SlotContract,
    pipeline: PassPipeline,
    cache: CacheForm,
    memory: bool = True,
    layout: SlotLayout | None = None,
    attention: Attention = "masked",
    prefill: bool = False,
    cache_dtype: str = "float32",
) -> SlotProgram:
    """Export the :class:`DecodeModule` of ``model`` (cache form ``cache``) and run the slot ``pipeline`` on it.

    The program's inputs are ``tokens [1, n]`` (``1 <= n <= max_seq_len``), ``input_pos [1]``, the past
    cache (``io`` form) and the slot; the slot passes hold exactly as for the full-window program.
    ``memory=False`` exports the same program without the memory FFN and without slot inputs (the baseline
    of ``scripts/bench_decode.py``). ``prefill`` also exports the module with ``last_logits`` as the program's
    :attr:`SlotProgram.prefill` (same inputs, logits ``[1, 1, vocab]``). ``cache_dtype``: the state cache's
    (float16 with ``attention="kernel"`` only).
    """
    cfg = model.cfg
    layers = assemble_path(model, example_path(cfg.memory)) if memory else ()
    module = decode_module(model, layers, cache, layout, attention, cache_dtype).eval()
    contract = contract if memory else replace(contract, tensors=())
    spec = module.cache_spec
    n = torch.export.Dim(TOKENS_AXIS, min=1, max=cfg.max_seq_len)
    past = spec.empty() if cache == "io" else []
    args = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long), *past)
    cache_io = [TensorIO(name, spec.shape, spec.dtype) for name in spec.names("past")] if cache == "io" else []
    present = [TensorIO(name, spec.shape, spec.dtype) for name in spec.names("present")] if cache == "io" else []
    states = [TensorIO(name, spec.shape, spec.dtype) for name in spec.names("state")] if cache == "state" else []
    rest = (None,) * (len(past) + len(contract.tensors))

    def export(positions: int | str) -> SlotProgram:
        return export_slot_module(
            module,
            args,
            contract,
            pipeline,
            stem=DECODE_STEM,
            inputs=(
                TensorIO(TOKENS_INPUT, (1, TOKENS_AXIS), "int64"),
                TensorIO(POSITION_INPUT, (1,), "int64"),
                *cache_io,
                *slot_io(contract),
            ),
            outputs=(TensorIO(LOGITS_OUTPUT, (1, positions, cfg.vocab_size), "float32"), *present),
            states=tuple(states),
            dynamic_shapes=({1: n}, None, *rest),
            export_dynamic_shapes=({1: n}, None, (None,) * len(past)) if past else ({1: n}, None),
            axes={TOKENS_AXIS: (1, cfg.max_seq_len)},
        )

    program = export(TOKENS_AXIS)
    if prefill:
        module.last_logits = True
        program.prefill = export(1)
    return program
