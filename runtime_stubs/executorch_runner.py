"""Running a bundle's ExecuTorch program (``.pte``, optional ``.ptd``): the runtime side of the ``executorch``
target (its emitter is :mod:`hm_export.targets.executorch`). Needs the executorch wheel, not the exporter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hm_export.runtime_stubs.decoders import LastOfWholeCall


def load_program(program: Path, data: Path | None, custom_ops: list[str] | None = None) -> Any:
    """The ExecuTorch program; ``custom_ops`` (the manifest's list) makes the hm_export kernel library load first.
    Its methods share memory arenas (the Python runtime's rule for host methods), so a decode program's
    ``prefill`` and ``forward`` see one KV cache."""
    from executorch.runtime import Runtime

    if any(op.startswith("hm_export::") for op in custom_ops or ()):
        from hm_export.kernels import load_kernel_library

        load_kernel_library()
    if any(op.startswith("quantized_decomposed::") for op in custom_ops or ()):
        import executorch.kernels.quantized  # noqa: F401  (registers ExecuTorch's quantized kernels)

    runtime = Runtime.get()
    return runtime.load_program(str(program), data_path=str(data)) if data else runtime.load_program(str(program))


def method_io_bounds(method: Any) -> tuple[int, int]:
    """(most token positions per call, vocabulary of the logits) from the method's metadata: what the program
    was really built for, whatever a manifest says."""
    meta = method.metadata
    return int(meta.input_tensor_meta(0).sizes()[-1]), int(meta.output_tensor_meta(0).sizes()[-1])


class ExecuTorchRunner:
    """Runs a bundle's ``.pte`` with the slot tensors bound as inputs."""

    def __init__(self, program: Path, data: Path | None = None, custom_ops: list[str] | None = None) -> None:
        self.method = load_program(program, data, custom_ops).load_method("forward")

    def io_bounds(self) -> tuple[int, int]:
        return method_io_bounds(self.method)

    def __call__(self, tokens: torch.Tensor, slot: list[torch.Tensor]) -> torch.Tensor:
        return self.method.execute([tokens, *slot])[0]


class ExecuTorchDecoder(LastOfWholeCall):
    """Runs ``decode.pte``: the KV cache is the method's mutable buffers, kept across calls.

    A call feeds ``tokens [1, n]`` at positions ``input_pos ..``; positions after the last one written are
    masked, so starting a new sequence is just prefilling from position 0 (:meth:`reset` has nothing to do).
    ``prefill_method`` (the manifest's, when the program has one) serves :meth:`last`.
    """

    def __init__(
        self,
        program: Path,
        data: Path | None = None,
        custom_ops: list[str] | None = None,
        prefill_method: str | None = None,
    ) -> None:
        loaded = load_program(program, data, custom_ops)
        self.method = loaded.load_method("forward")
        self.prefill_method = loaded.load_method(prefill_method) if prefill_method else None

    def reset(self) -> None:
        """Nothing to clear: see the class docstring."""

    def io_bounds(self) -> tuple[int, int]:
        return method_io_bounds(self.method)

    def __call__(self, tokens: torch.Tensor, input_pos: int, slot: list[torch.Tensor]) -> torch.Tensor:
        return self.method.execute([tokens, torch.tensor([input_pos]), *slot])[0][0]

    def last(self, tokens: torch.Tensor, input_pos: int, slot: list[torch.Tensor]) -> torch.Tensor:
        """The last position's logits ``[vocab]``: the prefill method skips the output head for the others."""
        if self.prefill_method is None:
            return super().last(tokens, input_pos, slot)
        return self.prefill_method.execute([tokens, torch.tensor([input_pos]), *slot])[0][0, -1]
