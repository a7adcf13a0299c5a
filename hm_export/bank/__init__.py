"""Memory bank files: per-block (or per-level packed) quantized blocks, read with one aligned read each.

* :mod:`~hm_export.bank.format`: block header, ``index.json``, file names, schema hash (docs/bank-format.md);
* :mod:`~hm_export.bank.schemes`: payload encodings (float32/16, bfloat16, int8, int4) and named presets;
* :mod:`~hm_export.bank.quantize`: streaming, parallel, resumable checkpoint -> bank quantizer;
* :mod:`~hm_export.bank.reader`: :class:`BankReader` (read into a buffer, verify, dequantize in place);
* :mod:`~hm_export.bank.tools`: ``inspect`` and ``check`` behind ``hm-export bank``;
* :mod:`~hm_export.bank.accuracy`: held-out perplexity / top-1 agreement per scheme (scripts/bank_accuracy.py).

The runtime side (level-aware cache, prefetch, filling the slot) is ``hm_export.runtime_stubs.block_cache``.
The writer (``quantize_bank``, ``write_bank``, ``QuantizeReport``) is imported when first named: a device-side
process reading banks never loads the quantizer or the checkpoint and model code behind it.
"""

from typing import Any

from hm_export.bank.format import (
    FORMAT_VERSION,
    HEADER,
    INDEX_FILE,
    MAGIC,
    PAYLOAD_ALIGNMENT,
    BankIndex,
    BlockEntry,
    BlockHeader,
    schema_hash,
)
from hm_export.bank.reader import READ_MODES, BankReader, aligned_buffer
from hm_export.bank.schemes import SCHEMES, BlockArrays, Scheme, check_preset, get_scheme, resolve_preset
from hm_export.errors import BankError

__all__ = [
    "FORMAT_VERSION",
    "HEADER",
    "INDEX_FILE",
    "MAGIC",
    "PAYLOAD_ALIGNMENT",
    "READ_MODES",
    "SCHEMES",
    "BankError",
    "BankIndex",
    "BankReader",
    "BlockArrays",
    "BlockEntry",
    "BlockHeader",
    "QuantizeReport",
    "Scheme",
    "aligned_buffer",
    "check_preset",
    "get_scheme",
    "quantize_bank",
    "resolve_preset",
    "schema_hash",
    "write_bank",
]

_WRITER = ("QuantizeReport", "quantize_bank", "write_bank")


def __getattr__(name: str) -> Any:
    if name in _WRITER:
        from hm_export.bank import quantize

        return getattr(quantize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
