"""What the runtimes' decoders (:class:`hm_export.targets.Decoder`) share."""

from __future__ import annotations

from typing import Any


class LastOfWholeCall:
    """``Decoder.last`` for a decoder whose program has no prefill method: the whole call, its last row."""

    def last(self, tokens: Any, input_pos: int, slot: list[Any]) -> Any:
        return self(tokens, input_pos, slot)[-1]  # type: ignore[operator]
