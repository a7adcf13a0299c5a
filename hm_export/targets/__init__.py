"""Emitters: one module per runtime, each turning a slot-split program into files in a bundle.

A :class:`Target` names the pass pipeline its program needs, the bundle sub-directory it writes,
and how to emit and run it.  Heavy toolchains are imported only when a target is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hm_export.trace import SlotProgram

Runner = Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class EmitOptions:
    separate_weights: bool = False


@dataclass(frozen=True)
class Target:
    name: str
    pipeline: str
    directory: str
    emit: Callable[[SlotProgram, Path, EmitOptions], dict[str, Any]]
    open_runner: Callable[[dict[str, Path], list[str]], Runner] | None  # None: cannot run on this host


def _emit_executorch(program: SlotProgram, out_dir: Path, options: EmitOptions) -> dict[str, Any]:
    from hm_export.targets.executorch import emit_executorch

    return emit_executorch(program, out_dir, separate_weights=options.separate_weights)


def _run_executorch(files: dict[str, Path], slot_names: list[str]) -> Runner:
    from hm_export.targets.executorch import ExecuTorchRunner

    return ExecuTorchRunner(files["program"], files.get("data"))


def _emit_onnx(program: SlotProgram, out_dir: Path, options: EmitOptions) -> dict[str, Any]:
    from hm_export.targets.onnx import emit_onnx

    return emit_onnx(program, out_dir)


def _run_onnx(files: dict[str, Path], slot_names: list[str]) -> Runner:
    from hm_export.targets.onnx import OnnxRunner

    return OnnxRunner(files["program"], slot_names)


TARGETS: dict[str, Target] = {
    "executorch": Target("executorch", "xnnpack_slot", "executorch", _emit_executorch, _run_executorch),
    "onnx": Target("onnx", "slot_split", "onnx", _emit_onnx, _run_onnx),
}
