"""Post-hoc memories for Hugging Face ``transformers`` causal decoders with a gated MLP (any family, see
:func:`~hm_export.hf.families.inspect_host`), loaded from a model folder or a GGUF file."""

from hm_export.hf.families import (
    TESTED_MODEL_TYPES,
    HostRefused,
    HostStructure,
    host_model_config,
    host_structure,
    inspect_host,
)
from hm_export.hf.model import HostMemoryLM, HostSlotModule

__all__ = [
    "TESTED_MODEL_TYPES",
    "HostMemoryLM",
    "HostRefused",
    "HostSlotModule",
    "HostStructure",
    "host_model_config",
    "host_structure",
    "inspect_host",
]
