"""Post-hoc memories for Hugging Face ``transformers`` decoders (Llama, Qwen2, Gemma 3, Phi-3)."""

from hm_export.hf.families import FAMILIES, HostFamily, family_for_model_type, family_of, host_model_config
from hm_export.hf.model import HostMemoryLM, HostSlotModule

__all__ = [
    "FAMILIES",
    "HostFamily",
    "HostMemoryLM",
    "HostSlotModule",
    "family_for_model_type",
    "family_of",
    "host_model_config",
]
