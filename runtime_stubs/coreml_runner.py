"""Running a bundle's Core ML package with ``MLModel.predict`` (macOS only): the runtime side of the ``coreml``
target (its emitter and structural check are :mod:`hm_export.targets.coreml`)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from hm_export.decode import POSITION_INPUT
from hm_export.runtime_stubs.decoders import LastOfWholeCall
from hm_export.slot import LOGITS_OUTPUT, TOKENS_INPUT


class CoreMLRunner:
    """Runs the package with ``MLModel.predict`` (macOS only); slot buffers are passed as fp16/fp32 arrays."""

    def __init__(self, package: Path, slot_names: list[str], precision: str) -> None:
        import coremltools as ct

        from hm_export.errors import HostUnsupported

        if platform.system() != "Darwin":
            raise HostUnsupported("Core ML prediction needs macOS; on this host only the structure is checked")
        self.model = ct.models.MLModel(str(package))
        self.slot_names = slot_names
        self.dtype = np.float16 if precision == "float16" else np.float32

    def _predict(self, feeds: dict[str, Any], slot: list[Any], state: Any = None) -> Any:
        import torch

        feeds.update({name: t.numpy().astype(self.dtype) for name, t in zip(self.slot_names, slot)})
        out = self.model.predict(feeds, state=state) if state is not None else self.model.predict(feeds)
        return torch.from_numpy(out[LOGITS_OUTPUT].astype(np.float32))

    def __call__(self, tokens: Any, slot: list[Any]) -> Any:
        return self._predict({TOKENS_INPUT: tokens.numpy().astype(np.int32)}, slot)


class CoreMLDecoder(LastOfWholeCall, CoreMLRunner):
    """The decode package: the KV cache is a Core ML state object (``MLModel.make_state``), kept across calls."""

    def __init__(self, package: Path, slot_names: list[str], precision: str) -> None:
        super().__init__(package, slot_names, precision)
        self.state = self.model.make_state()

    def reset(self) -> None:
        self.state = self.model.make_state()

    def __call__(self, tokens: Any, input_pos: int, slot: list[Any]) -> Any:  # type: ignore[override]
        feeds = {TOKENS_INPUT: tokens.numpy().astype(np.int32), POSITION_INPUT: np.array([input_pos], np.int32)}
        return self._predict(feeds, slot, self.state)[0]
