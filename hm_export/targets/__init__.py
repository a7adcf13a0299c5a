"""Emitters: one module per runtime, each turning a slot-split program into files in a bundle.

A :class:`Target` names the pass pipeline its program needs, the bundle sub-directory it writes,
and how to emit and run it; its :class:`DecodeSupport` (when it has one) says how it holds the decode
program's KV cache and how to run that program.  Heavy toolchains are imported only when a target is used.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from hm_export.errors import missing_extra

if TYPE_CHECKING:  # the registry is what the runtime imports: the exporter's modules stay out of it
    from hm_export.slot import SlotContract
    from hm_export.trace import SlotProgram

Runner = Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]


class Decoder(Protocol):
    """Runs a decode program: ``decoder(tokens [1, n], input_pos, slot)`` -> logits ``[n, vocab]`` of
    positions ``input_pos .. input_pos+n-1``, given the cache holds positions ``0 .. input_pos-1`` of the
    same sequence; ``reset()`` forgets the cache (a prefill from position 0 starts a new sequence anyway)."""

    def __call__(self, tokens: torch.Tensor, input_pos: int, slot: list[torch.Tensor]) -> torch.Tensor: ...

    def last(self, tokens: torch.Tensor, input_pos: int, slot: list[torch.Tensor]) -> torch.Tensor:
        """The same call's last position's logits ``[vocab]`` (what a prompt's prefill needs): a program with a
        prefill method computes the output head for that position only."""
        ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class EmitOptions:
    separate_weights: bool = False  # ExecuTorch: anchor weights in a .ptd file
    coreml_precision: str = "float16"
    coreml_target: str = "iOS18"
    coreml_anchor_compression: str = "none"
    slot_strategy: str = "auto"  # hm_export.kernels.strategies: the form of the slot (docs/kernels.md)
    anchor_quant: str = "none"  # hm_export.anchor_quant: how the anchor's weights are stored, per target


@dataclass(frozen=True)
class DecodeSupport:
    """How a target holds the KV cache (``state``: in the program; ``io``: past/present tensors), emits the
    decode program (the target's own emitter: files are named after the program's stem) and runs it;
    ``attention`` is the decode module's (:data:`hm_export.decode.ATTENTION`); ``prefill``, whether the program
    gets a second method for prompts that returns only the last position's logits."""

    cache: str
    emit: Callable[[SlotProgram, Path, EmitOptions], dict[str, Any]]
    open_decoder: Callable[[dict[str, Path], list[str], dict[str, Any]], Decoder] | None  # None: never runs here
    attention: str = "masked"
    prefill: bool = False  # the program also holds a prefill method (last position's logits; trace.SlotProgram)


@dataclass(frozen=True)
class Target:
    name: str
    pipeline: str
    directory: str
    emit: Callable[[SlotProgram, Path, EmitOptions], dict[str, Any]]
    open_runner: Callable[[dict[str, Path], list[str], dict[str, Any]], Runner] | None  # None: never runs here
    check_structure: Callable[[dict[str, Path], SlotContract, dict[str, Any]], dict[str, Any]] | None = None
    decode: DecodeSupport | None = None  # None: no decode program for this target
    requires: tuple[tuple[str, str], ...] = ()  # (module, pip extra) the target's toolchain needs
    # Files a program makes its runtime open besides itself, relative to the program's folder (ONNX external
    # data): the loader checks each is a listed regular file before the runtime sees the program.
    side_files: Callable[[Path], set[str]] | None = None

    def check_installed(self) -> None:
        """Raise MissingExtraError naming the extra when a module this target needs is not installed (the
        modules are imported only when the target is used: an ONNX-only install never imports ExecuTorch)."""
        for module, extra in self.requires:
            if importlib.util.find_spec(module) is None:
                raise missing_extra(module, extra, f"the {self.name} target")


def _emit_executorch(program: SlotProgram, out_dir: Path, options: EmitOptions) -> dict[str, Any]:
    from hm_export.targets.executorch import emit_executorch

    return emit_executorch(program, out_dir, separate_weights=options.separate_weights)


def _run_executorch(files: dict[str, Path], slot_names: list[str], entry: dict[str, Any]) -> Runner:
    from hm_export.runtime_stubs.executorch_runner import ExecuTorchRunner

    return ExecuTorchRunner(files["program"], files.get("data"), entry.get("custom_ops"))


def _decode_executorch(files: dict[str, Path], slot_names: list[str], entry: dict[str, Any]) -> Decoder:
    from hm_export.runtime_stubs.executorch_runner import ExecuTorchDecoder

    return ExecuTorchDecoder(files["program"], files.get("data"), entry.get("custom_ops"), entry.get("prefill_method"))


def _emit_onnx(program: SlotProgram, out_dir: Path, options: EmitOptions) -> dict[str, Any]:
    from hm_export.targets.onnx import emit_onnx

    return emit_onnx(program, out_dir, options.anchor_quant)


def _run_onnx(files: dict[str, Path], slot_names: list[str], entry: dict[str, Any]) -> Runner:
    from hm_export.runtime_stubs.onnx_runner import OnnxRunner

    return OnnxRunner(files["program"], slot_names)


def _decode_onnx(files: dict[str, Path], slot_names: list[str], entry: dict[str, Any]) -> Decoder:
    from hm_export.decode import CacheSpec
    from hm_export.runtime_stubs.onnx_runner import OnnxDecoder

    return OnnxDecoder(files["program"], slot_names, CacheSpec.from_dict(entry["cache"]))


def _onnx_side_files(program: Path) -> set[str]:
    from hm_export.runtime_stubs.onnx_runner import external_data_files

    return external_data_files(program)


def _emit_coreml(program: SlotProgram, out_dir: Path, options: EmitOptions) -> dict[str, Any]:
    from hm_export.targets.coreml import emit_coreml

    return emit_coreml(
        program,
        out_dir,
        options.coreml_precision,
        options.coreml_target,
        options.coreml_anchor_compression,
        options.anchor_quant,
    )


def _run_coreml(files: dict[str, Path], slot_names: list[str], entry: dict[str, Any]) -> Runner:
    from hm_export.runtime_stubs.coreml_runner import CoreMLRunner

    return CoreMLRunner(files["package"], slot_names, entry["precision"])


def _decode_coreml(files: dict[str, Path], slot_names: list[str], entry: dict[str, Any]) -> Decoder:
    from hm_export.runtime_stubs.coreml_runner import CoreMLDecoder

    return CoreMLDecoder(files["package"], slot_names, entry["precision"])


def _check_coreml(files: dict[str, Path], contract: SlotContract, entry: dict[str, Any]) -> dict[str, Any]:
    from hm_export.targets.coreml import check_coreml_package

    return check_coreml_package(files["package"], contract, entry["io"], entry["precision"], entry["anchor_params"])


def _emit_executorch_coreml(program: SlotProgram, out_dir: Path, options: EmitOptions) -> dict[str, Any]:
    from hm_export.targets.executorch import emit_executorch_coreml

    return emit_executorch_coreml(program, out_dir)


TARGETS: dict[str, Target] = {
    "executorch": Target(
        "executorch",
        "xnnpack_slot",
        "executorch",
        _emit_executorch,
        _run_executorch,
        decode=DecodeSupport("state", _emit_executorch, _decode_executorch, attention="kernel", prefill=True),
        requires=(("executorch", "executorch"),),
    ),
    "onnx": Target(
        "onnx",
        "folded_slot",
        "onnx",
        _emit_onnx,
        _run_onnx,
        decode=DecodeSupport("io", _emit_onnx, _decode_onnx),
        requires=(("onnx", "onnx"), ("onnxruntime", "onnx"), ("onnxscript", "onnx")),
        side_files=_onnx_side_files,
    ),
    "coreml": Target(
        "coreml",
        "folded_slot",
        "coreml",
        _emit_coreml,
        _run_coreml,
        _check_coreml,
        decode=DecodeSupport("state", _emit_coreml, _decode_coreml),
        requires=(("coremltools", "coreml"),),
    ),
    # ExecuTorch with the Core ML delegate: lowers on Linux, runs only on Apple devices.
    "executorch-coreml": Target(
        "executorch-coreml",
        "folded_slot",
        "executorch_coreml",
        _emit_executorch_coreml,
        None,
        requires=(("executorch", "executorch"), ("coremltools", "coreml")),
    ),
}
