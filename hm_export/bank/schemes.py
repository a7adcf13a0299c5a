"""Block payload encodings (schemes) and named presets that choose one scheme per tree level.

A block holds, per memory layer, three matrices in slot layout: ``gate``, ``up`` ``[d, r]`` (used as
``x @ W``) and ``down`` ``[r, d]`` (used as ``h @ W``).  In all three the *rows* are the reduction axis and
the *columns* the output channels, so every quantized scheme groups along rows, per column: one scale per
output channel (int8) or one per ``g`` consecutive rows of a column (int4).  A kernel that multiplies
by a dequantized matrix can then factor each scale out of a partial dot product.

Payload of a block = for each layer ``j``, for ``gate``, ``up``, ``down``: one *section*; every section
starts 16-byte aligned within the payload (zero padding).  The byte layout of each section is documented
in ``docs/bank-format.md`` and implemented by :meth:`Scheme.encode` / :meth:`Scheme.decode_into`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from hm_export.bank.errors import BankError

SECTION_ALIGNMENT = 16
MATRICES = ("gate", "up", "down")


def pad(length: int, alignment: int) -> int:
    return -(-length // alignment) * alignment


class Section(NamedTuple):
    """One matrix of one layer inside a block payload."""

    layer: int
    matrix: str  # gate / up / down
    rows: int  # reduction axis
    cols: int  # output channels
    offset: int  # from the start of the payload
    length: int  # bytes, including the padding up to the next 16-byte boundary


class BlockArrays(NamedTuple):
    """One block, float32, slot layout: gate, up ``[layers, d, r]`` and down ``[layers, r, d]``."""

    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray


# Where a decoded matrix goes: (layer, matrix name) -> a float32 array (or view) of shape [rows, cols].
Destination = Callable[[int, str], np.ndarray]


class Scheme(ABC):
    """A per-matrix encoding.  ``id`` and ``group_size`` are what the block header stores."""

    name: str
    id: int
    group_size: int = 0

    @abstractmethod
    def section_length(self, rows: int, cols: int) -> int:
        """Bytes of one encoded ``[rows, cols]`` matrix, a multiple of :data:`SECTION_ALIGNMENT`."""

    @abstractmethod
    def encode(self, matrix: np.ndarray) -> bytes:
        """Encode a float32 ``[rows, cols]`` matrix into exactly ``section_length(rows, cols)`` bytes."""

    @abstractmethod
    def decode_into(self, section: memoryview, out: np.ndarray) -> None:
        """Decode one section into ``out`` (float32 ``[rows, cols]``, any strides: e.g. a slot view)."""

    def sections(self, layers: int, d_model: int, width: int) -> Iterator[Section]:
        """The sections of a block in payload order."""
        offset = 0
        for layer in range(layers):
            for matrix in MATRICES:
                rows, cols = (d_model, width) if matrix != "down" else (width, d_model)
                length = self.section_length(rows, cols)
                yield Section(layer, matrix, rows, cols, offset, length)
                offset += length

    def payload_length(self, layers: int, d_model: int, width: int) -> int:
        return sum(s.length for s in self.sections(layers, d_model, width))

    def encode_block(self, block: BlockArrays) -> bytes:
        layers, d_model, width = block.gate.shape
        return b"".join(self.encode(getattr(block, s.matrix)[s.layer]) for s in self.sections(layers, d_model, width))

    def decode_block_into(
        self, payload: memoryview, layers: int, d_model: int, width: int, destination: Destination
    ) -> None:
        """Decode every section of ``payload`` straight into ``destination(layer, matrix)``."""
        if len(payload) != self.payload_length(layers, d_model, width):
            raise BankError(
                f"{self.name} payload of {len(payload)} bytes does not fit a ({layers}, {d_model}, {width}) block"
            )
        for s in self.sections(layers, d_model, width):
            self.decode_into(payload[s.offset : s.offset + s.length], destination(s.layer, s.matrix))

    def decode_block(self, payload: memoryview, layers: int, d_model: int, width: int) -> BlockArrays:
        block = BlockArrays(
            np.empty((layers, d_model, width), np.float32),
            np.empty((layers, d_model, width), np.float32),
            np.empty((layers, width, d_model), np.float32),
        )
        self.decode_block_into(payload, layers, d_model, width, lambda layer, matrix: getattr(block, matrix)[layer])
        return block


def _padded(*parts: np.ndarray) -> bytes:
    """Concatenate arrays' little-endian bytes, each padded to the section alignment."""
    out = bytearray()
    for part in parts:
        raw = part.tobytes()
        out += raw + bytes(pad(len(raw), SECTION_ALIGNMENT) - len(raw))
    return bytes(out)


def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (inputs are finite)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


class FloatScheme(Scheme):
    """Unquantized: the matrix row-major in one little-endian float type (``float32``/``float16``/``bfloat16``)."""

    def __init__(self, name: str, scheme_id: int) -> None:
        self.name, self.id = name, scheme_id
        self.itemsize = 4 if name == "float32" else 2

    def section_length(self, rows: int, cols: int) -> int:
        return pad(rows * cols * self.itemsize, SECTION_ALIGNMENT)

    def encode(self, matrix: np.ndarray) -> bytes:
        if self.name == "bfloat16":
            return _padded(_bfloat16_bits(matrix))
        return _padded(np.ascontiguousarray(matrix, dtype="<f4" if self.name == "float32" else "<f2"))

    def decode_into(self, section: memoryview, out: np.ndarray) -> None:
        count = out.size
        if self.name == "bfloat16":
            bits = np.frombuffer(section, "<u2", count).reshape(out.shape)
            np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
        else:
            out[...] = np.frombuffer(section, "<f4" if self.name == "float32" else "<f2", count).reshape(out.shape)


def _grouped(out: np.ndarray, groups: int) -> np.ndarray:
    """``out [rows, cols]`` seen as ``[groups, rows / groups, cols]``: always a view, whatever its strides."""
    rows, cols = out.shape
    step, stride = out.strides
    return np.lib.stride_tricks.as_strided(out, (groups, rows // groups, cols), (step * (rows // groups), step, stride))


def _int4_lut(offset: int) -> np.ndarray:
    """Byte -> (low nibble, high nibble) - offset, as float32 pairs: unpacks int4 in one gather."""
    codes = np.arange(256)
    return (np.stack([codes & 15, codes >> 4], axis=1) - offset).astype(np.float32)


class IntScheme(Scheme):
    """Integer codes with float16 scales per (group of ``group_size`` rows, column).

    * ``bits=8``, ``group_size=0`` (one group = all rows: per output channel), symmetric:
      ``q = round(w / s)`` in ``[-127, 127]``, ``s = max|w| / 127``; codes are int8.
    * ``bits=4``, symmetric: ``s = m / -8`` with ``m`` the group's element of largest magnitude (sign kept),
      ``q = clamp(round(w / s), -8, 7)``, stored as the nibble ``q + 8``.
    * ``bits=4``, asymmetric: ``s = (max - min) / 15``, ``q = clamp(round((w - min) / s), 0, 15)``, stored as is,
      with a float16 ``min`` per group after the scales: ``w = s * q + min``.

    A group never spans more rows than the matrix has: the effective group is ``min(group_size, rows)``,
    which must divide ``rows``.  Scales are rounded to float16 *before* quantizing, so the codes are
    optimal for the scales actually stored.
    """

    def __init__(self, name: str, scheme_id: int, bits: int, group_size: int, symmetric: bool) -> None:
        self.name, self.id, self.bits, self.group_size, self.symmetric = name, scheme_id, bits, group_size, symmetric
        if bits == 4:
            self._lut = _int4_lut(8 if symmetric else 0)

    def group(self, rows: int) -> int:
        group = rows if self.group_size == 0 else min(self.group_size, rows)
        if rows % group:
            raise BankError(f"scheme {self.name}: {rows} rows are not a multiple of the group size {group}")
        return group

    def _code_bytes(self, count: int) -> int:
        return count if self.bits == 8 else -(-count // 2)

    def section_length(self, rows: int, cols: int) -> int:
        scales = pad(rows // self.group(rows) * cols * 2, SECTION_ALIGNMENT)
        return pad(self._code_bytes(rows * cols), SECTION_ALIGNMENT) + scales * (1 if self.symmetric else 2)

    def encode(self, matrix: np.ndarray) -> bytes:
        rows, cols = matrix.shape
        grouped = np.asarray(matrix, dtype=np.float32).reshape(rows // self.group(rows), -1, cols)
        high, low = grouped.max(axis=1, keepdims=True), grouped.min(axis=1, keepdims=True)
        if self.bits == 8:
            scale, qmin, qmax, base = np.maximum(high, -low) / 127, -127, 127, None
        elif self.symmetric:
            scale, qmin, qmax, base = np.where(-low > high, low, high) / -8, -8, 7, None
        else:
            base = low.astype(np.float16)
            scale, qmin, qmax = (high - base.astype(np.float32)) / 15, 0, 15
        scale = scale.astype(np.float16)
        if not np.isfinite(scale).all():
            raise BankError(f"scheme {self.name}: a group's range overflows its float16 scale (|w| > 1e5?)")
        shifted = grouped if base is None else grouped - base.astype(np.float32)
        divisor = np.where(scale == 0, 1, scale).astype(np.float32)  # a zero scale means |w - base| < 1e-7: codes 0
        codes = np.clip(np.rint(shifted / divisor), qmin, qmax).reshape(-1)
        if self.bits == 8:
            packed = codes.astype(np.int8)
        else:
            nibbles = (codes - qmin).astype(np.uint8)
            if nibbles.size % 2:
                nibbles = np.append(nibbles, np.uint8(0))
            packed = nibbles[0::2] | (nibbles[1::2] << 4)
        extra = () if base is None else (base.reshape(-1, cols).astype("<f2"),)
        return _padded(packed, scale.reshape(-1, cols).astype("<f2"), *extra)

    def decode_into(self, section: memoryview, out: np.ndarray) -> None:
        rows, cols = out.shape
        groups, count = rows // self.group(rows), rows * cols
        code_bytes = pad(self._code_bytes(count), SECTION_ALIGNMENT)
        scale_bytes = pad(groups * cols * 2, SECTION_ALIGNMENT)
        scale = np.frombuffer(section, "<f2", groups * cols, code_bytes).astype(np.float32).reshape(groups, 1, cols)
        target = _grouped(out, groups)
        if self.bits == 8:
            np.multiply(np.frombuffer(section, np.int8, count).reshape(target.shape), scale, out=target)
            return
        pairs = np.take(self._lut, np.frombuffer(section, np.uint8, self._code_bytes(count)), axis=0)
        np.multiply(pairs.reshape(-1)[:count].reshape(target.shape), scale, out=target)
        if not self.symmetric:
            base = np.frombuffer(section, "<f2", groups * cols, code_bytes + scale_bytes)
            np.add(target, base.astype(np.float32).reshape(groups, 1, cols), out=target)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        FloatScheme("float32", 1),
        FloatScheme("float16", 2),
        FloatScheme("bfloat16", 3),
        IntScheme("int8", 4, bits=8, group_size=0, symmetric=True),
        *(IntScheme(f"int4-g{g}", 5, bits=4, group_size=g, symmetric=True) for g in (32, 64, 128)),
        *(IntScheme(f"int4a-g{g}", 6, bits=4, group_size=g, symmetric=False) for g in (32, 64, 128)),
    )
}


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise BankError(f"unknown scheme {name!r}, expected one of {sorted(SCHEMES)}")
    return SCHEMES[name]


# Named presets beyond the single-scheme ones: level 0 (wide, shared by many contexts) in int8, every
# deeper level (most of the bytes) in int4.
MIXED_PRESETS: dict[str, tuple[str, str]] = {
    "mixed-int8-int4": ("int8", "int4-g32"),
    "mixed-int8-int4-g64": ("int8", "int4-g64"),
}
PRESET_HELP = (
    f"one of {sorted(SCHEMES)} for every level, a mixed preset {sorted(MIXED_PRESETS)} "
    "(level 0 int8, deeper levels int4), or a comma-separated scheme per level (e.g. 'int8,int8,int4-g32')"
)
_NAME = re.compile(r"^[a-z0-9-]+(,[a-z0-9-]+)*$")


def check_preset(spec: str) -> None:
    """Check that ``spec`` names schemes or a preset (without knowing the number of levels)."""
    if not isinstance(spec, str) or not _NAME.match(spec):
        raise BankError(f"unknown scheme {spec!r}: expected {PRESET_HELP}")
    if spec not in MIXED_PRESETS:
        for name in spec.split(","):
            get_scheme(name)


def resolve_preset(spec: str, num_levels: int) -> tuple[str, ...]:
    """The scheme name of every level for the preset (or per-level list) ``spec``."""
    check_preset(spec)
    if spec in MIXED_PRESETS:
        shallow, deep = MIXED_PRESETS[spec]
        return (shallow, *[deep] * (num_levels - 1))
    names = tuple(spec.split(","))
    if len(names) == 1:
        return names * num_levels
    if len(names) != num_levels:
        raise BankError(f"scheme {spec!r} lists {len(names)} levels, the memory has {num_levels}")
    return names


def bits_per_parameter(scheme: Scheme, layers: int, d_model: int, width: int) -> float:
    return 8 * scheme.payload_length(layers, d_model, width) / (3 * layers * d_model * width)
