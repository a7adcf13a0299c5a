"""Running a bundle's ONNX programs with ONNX Runtime (IOBinding, the decode program's swapped cache buffers):
the runtime side of the ``onnx`` target (its emitter is :mod:`hm_export.targets.onnx`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hm_export.decode import POSITION_INPUT, CacheSpec
from hm_export.errors import BundleError, UsageError
from hm_export.runtime_stubs.decoders import LastOfWholeCall
from hm_export.slot import LOGITS_OUTPUT, TOKENS_INPUT

_NUMPY_DTYPES = {
    torch.int64: np.int64,
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
}


def external_data_files(program: Path) -> set[str]:
    """The files, relative to the program's folder, that ``program``'s initializers keep their data in (ONNX
    Runtime opens them itself: the loader checks first that each is a listed regular file of the bundle)."""
    import onnx

    model = onnx.load(str(program), load_external_data=False)
    return {
        entry.value for tensor in model.graph.initializer for entry in tensor.external_data if entry.key == "location"
    }


class _BoundSession:
    """An ONNX Runtime session with IOBinding; slot inputs are (re)bound only when the caller's buffers change."""

    def __init__(self, program: Path, slot_names: list[str], threads: int | None = None) -> None:
        """``threads``: intra-op threads (default: ``torch.get_num_threads()``)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Default: torch's thread count, which ``hm_export.bench.set_threads`` (``--threads``) sets for every
        # runtime; ONNX Runtime's own default would use every core whatever was asked.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1  # sequential execution: one graph node at a time
        # Idle intra-op threads sleep instead of spinning: the router (torch) shares these cores between calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(program), options, providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.slot_names = slot_names
        self._bound: list[int] = []
        self.vocab = next(o.shape[-1] for o in self.session.get_outputs() if o.name == LOGITS_OUTPUT)

    def _bind_slot(self, slot: list[torch.Tensor]) -> None:
        for name, tensor in zip(self.slot_names, slot):
            if not tensor.is_contiguous() or tensor.dtype not in _NUMPY_DTYPES:
                raise UsageError(f"slot input {name} must be a contiguous tensor of {sorted(map(str, _NUMPY_DTYPES))}")
            self._bind(name, tensor)
        self._bound = [t.data_ptr() for t in slot]

    def _bind(self, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        """Bind a contiguous CPU tensor's memory (it must stay alive until the run)."""
        dtype = _NUMPY_DTYPES[tensor.dtype]
        bind = self.binding.bind_output if output else self.binding.bind_input
        bind(name, "cpu", 0, dtype, list(tensor.shape), tensor.data_ptr())

    def _run(self, tokens: torch.Tensor, slot: list[torch.Tensor]) -> torch.Tensor:
        """Run with ``tokens`` and the slot (other inputs/outputs bound by the caller); return the logits,
        written by ONNX Runtime straight into a tensor allocated here."""
        if [t.data_ptr() for t in slot] != self._bound:  # first call, or the caller swapped buffers
            self._bind_slot(slot)
        tokens = tokens.contiguous()
        logits = torch.empty(1, tokens.shape[1], self.vocab)
        self._bind(TOKENS_INPUT, tokens)
        self._bind(LOGITS_OUTPUT, logits, output=True)
        self.session.run_with_iobinding(self.binding)
        return logits


class OnnxRunner(_BoundSession):
    """The full-window program; slot inputs bound once to the caller's buffers."""

    def __call__(self, tokens: torch.Tensor, slot: list[torch.Tensor]) -> torch.Tensor:
        return self._run(tokens, slot)


class OnnxDecoder(LastOfWholeCall, _BoundSession):
    """The decode program: ``past_*`` inputs read one cache buffer set, ``present_*`` outputs write the other,
    and the two sets swap after every call, so the cache is never allocated or copied by the caller."""

    def __init__(self, program: Path, slot_names: list[str], cache: CacheSpec, threads: int | None = None) -> None:
        super().__init__(program, slot_names, threads)
        declared = {i.name: i.shape for i in self.session.get_inputs()}
        for name in cache.names("past"):  # the program's own cache shapes, before allocating the recorded ones
            if declared.get(name) != list(cache.shape):
                got, want = declared.get(name), list(cache.shape)
                raise BundleError(f"{program}: input {name} is {got}, the manifest says {want}")
        self.cache = cache
        self._past, self._present = cache.empty(), cache.empty()

    def reset(self) -> None:
        """Zero the cache (positions past the last one written are masked anyway)."""
        for tensor in self._past:
            tensor.zero_()

    def __call__(self, tokens: torch.Tensor, input_pos: int, slot: list[torch.Tensor]) -> torch.Tensor:
        position = torch.tensor([input_pos])
        self._bind(POSITION_INPUT, position)
        for name, tensor in zip(self.cache.names("past"), self._past):
            self._bind(name, tensor)
        for name, tensor in zip(self.cache.names("present"), self._present):
            self._bind(name, tensor, output=True)
        logits = self._run(tokens, slot)
        self._past, self._present = self._present, self._past
        return logits[0]
