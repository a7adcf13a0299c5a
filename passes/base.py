"""What every slot pass receives, and the error it raises."""

from __future__ import annotations

from dataclasses import dataclass, field


class SlotPassError(RuntimeError):
    """A pass found the program in a state that would make the exported bundle wrong or slow."""


@dataclass
class SlotPassContext:
    """The model's own declaration of which parameters are memory (slot) and which are anchor."""

    memory_parameters: list[str]
    anchor_parameters: list[str]
    slot_input_names: list[str]
    slot_reader: str = "bmm"  # how the program reads the slot: "bmm", "convert" or "memory_swiglu"
    notes: dict[str, object] = field(default_factory=dict)
