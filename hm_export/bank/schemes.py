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
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

import numpy as np

from hm_export.errors import BankError

SECTION_ALIGNMENT = 16
ENCODE_CHUNK = 1 << 17  # float32 elements per vectorized encode call (512 KB: temporaries stay in cache)
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
    def encode_layers(self, matrices: np.ndarray) -> np.ndarray:
        """Encode float32 ``[layers, rows, cols]``: uint8 ``[layers, section_length(rows, cols)]``, one section
        per layer (vectorized over the layers: a deep block has many small matrices)."""

    @abstractmethod
    def decode_into(self, section: memoryview, out: np.ndarray) -> None:
        """Decode one section into ``out`` (float32 ``[rows, cols]``, any strides: e.g. a slot view)."""

    def sections(self, layers: int, d_model: int, width: int) -> tuple[Section, ...]:
        """The sections of a block in payload order (computed once per block shape)."""
        return _sections(self, layers, d_model, width)

    def payload_length(self, layers: int, d_model: int, width: int) -> int:
        last = self.sections(layers, d_model, width)[-1]
        return last.offset + last.length

    def encode_block(self, block: BlockArrays) -> bytes:
        """The payload: per layer the gate, up and down sections, i.e. the three ``[layers, section]`` arrays
        side by side, row-major."""
        encoded = []
        for matrices in block:  # in chunks of layers of ~1 MB of float32: the temporaries stay in cache
            step = max(1, ENCODE_CHUNK // (matrices.shape[1] * matrices.shape[2]))
            chunks = [np.asarray(matrices[i : i + step], np.float32) for i in range(0, len(matrices), step)]
            encoded.append(np.concatenate([self.encode_layers(chunk) for chunk in chunks]))
        return np.concatenate(encoded, axis=1).tobytes()

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


@cache
def _sections(scheme: Scheme, layers: int, d_model: int, width: int) -> tuple[Section, ...]:
    out, offset = [], 0
    for layer in range(layers):
        for matrix in MATRICES:
            rows, cols = (d_model, width) if matrix != "down" else (width, d_model)
            length = scheme.section_length(rows, cols)
            out.append(Section(layer, matrix, rows, cols, offset, length))
            offset += length
    return tuple(out)


def _padded(*parts: np.ndarray) -> np.ndarray:
    """Per layer, the little-endian bytes of each ``[layers, ...]`` part, each padded to the section alignment:
    uint8 ``[layers, section length]``."""
    layers = parts[0].shape[0]
    raws = [np.ascontiguousarray(part).reshape(layers, -1).view(np.uint8) for part in parts]
    out = np.zeros((layers, sum(pad(raw.shape[1], SECTION_ALIGNMENT) for raw in raws)), np.uint8)
    offset = 0
    for raw in raws:
        out[:, offset : offset + raw.shape[1]] = raw
        offset += pad(raw.shape[1], SECTION_ALIGNMENT)
    return out


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

    def encode_layers(self, matrices: np.ndarray) -> np.ndarray:
        if self.name == "bfloat16":
            return _padded(_bfloat16_bits(matrices))
        return _padded(matrices.astype("<f4" if self.name == "float32" else "<f2"))

    def decode_into(self, section: memoryview, out: np.ndarray) -> None:
        count = out.size
        if self.name == "bfloat16":
            bits = np.frombuffer(section, "<u2", count).reshape(out.shape)
            np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
        else:
            out[...] = np.frombuffer(section, "<f4" if self.name == "float32" else "<f2", count).reshape(out.shape)


def _int4_lut() -> np.ndarray:
    """Byte -> (low nibble - 8, high nibble - 8) as float32 pairs: unpacks two int4 codes in one gather."""
    codes = np.arange(256)
    return (np.stack([codes & 15, codes >> 4], axis=1) - 8).astype(np.float32)


class IntScheme(Scheme):
    """Symmetric integer codes with a float16 scale per (group of ``group_size`` rows, column).

    * ``bits=8``, ``group_size=0`` (one group = all rows: per output channel): ``s = max|w| / 127``,
      ``q = clamp(round(w / s), -127, 127)``; codes are int8.
    * ``bits=4``: ``s = m / -8`` with ``m`` the group's element of largest magnitude (sign kept),
      ``q = clamp(round(w / s), -8, 7)`` (``m`` maps to -8 exactly: all 16 codes are used), stored as the
      nibble ``q + 8``, two per byte.

    Groups are ``g = min(group_size, rows)`` consecutive rows; there are ``ceil(rows / g)`` of them, the last
    one shorter when ``g`` does not divide ``rows`` (d = 192 with groups of 128: 128 + 64 rows).  Scales
    are rounded to float16 *before* quantizing, so the codes are optimal for the scales actually stored.
    (An asymmetric int4 variant with a float16 minimum per group was measured and dropped: at the same
    group size it cut the weight error by 10 % for 0.5 more bits per parameter, and at the same size it was
    worse on the shipped example; see docs/bank-benchmarks.md.)
    """

    def __init__(self, name: str, scheme_id: int, bits: int, group_size: int) -> None:
        self.name, self.id, self.bits, self.group_size = name, scheme_id, bits, group_size
        self.qmax = 127 if bits == 8 else 7
        self.qmin = -self.qmax if bits == 8 else -8
        if bits == 4:
            self._lut = _int4_lut()

    def group(self, rows: int) -> int:
        """Rows per group (the last group of a matrix may have fewer)."""
        return rows if self.group_size == 0 else min(self.group_size, rows)

    def _code_bytes(self, count: int) -> int:
        return count if self.bits == 8 else -(-count // 2)

    def section_length(self, rows: int, cols: int) -> int:
        scales = -(-rows // self.group(rows)) * cols * 2
        return pad(self._code_bytes(rows * cols), SECTION_ALIGNMENT) + pad(scales, SECTION_ALIGNMENT)

    def encode_layers(self, matrices: np.ndarray) -> np.ndarray:
        layers, rows, cols = matrices.shape
        group = self.group(rows)
        groups = -(-rows // group)
        values = matrices
        if groups * group != rows:  # repeat the last row into the short group: its min and max do not change
            values = np.concatenate([values, np.repeat(values[:, -1:], groups * group - rows, axis=1)], axis=1)
        grouped = values.reshape(layers, groups, group, cols)
        high, low = grouped.max(axis=2, keepdims=True), grouped.min(axis=2, keepdims=True)
        if self.bits == 8:
            scale = (np.maximum(high, -low) / 127).astype(np.float16)
        else:
            scale = (np.where(-low > high, low, high) / -8).astype(np.float16)
        if not np.isfinite(scale).all():
            raise BankError(f"scheme {self.name}: a group's range overflows its float16 scale (|w| > 1e5?)")
        divisor = np.where(scale == 0, 1, scale).astype(np.float32)  # a zero scale means |w| < 1e-7: codes 0
        codes = np.divide(grouped, divisor)
        np.clip(np.rint(codes, out=codes), self.qmin, self.qmax, out=codes)
        codes = codes.reshape(layers, -1)[:, : rows * cols]
        if self.bits == 8:
            packed = codes.astype(np.int8)
        else:
            nibbles = (codes + 8).astype(np.uint8)
            if nibbles.shape[1] % 2:
                nibbles = np.concatenate([nibbles, np.zeros((layers, 1), np.uint8)], axis=1)
            packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        return _padded(packed, scale.reshape(layers, -1).astype("<f2"))

    def split(self, section: memoryview, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of a section's stored codes and float16 scales ``[groups, cols]`` (no decoding): int8 codes
        ``[rows, cols]``, int4 the packed bytes ``[ceil(rows * cols / 2)]`` (what a quantized slot copies)."""
        count, groups = rows * cols, -(-rows // self.group(rows))
        scales = np.frombuffer(section, "<f2", groups * cols, pad(self._code_bytes(count), SECTION_ALIGNMENT))
        if self.bits == 8:
            return np.frombuffer(section, np.int8, count).reshape(rows, cols), scales.reshape(groups, cols)
        return np.frombuffer(section, np.uint8, self._code_bytes(count)), scales.reshape(groups, cols)

    def decode_into(self, section: memoryview, out: np.ndarray) -> None:
        rows, cols = out.shape
        group, count = self.group(rows), rows * cols
        groups = -(-rows // group)
        codes, scale = self.split(section, rows, cols)
        scale = scale.astype(np.float32)
        if self.bits == 4:
            codes = np.take(self._lut, codes, axis=0).reshape(-1)[:count].reshape(rows, cols)
        full = rows // group  # groups of exactly ``group`` rows; a shorter last one is handled after
        if full:  # splitting the row axis of any strided view is a view: no copy, the slot itself is written
            target = out[: full * group].reshape((full, group, cols), copy=False)
            np.multiply(codes[: full * group].reshape(full, group, cols), scale[:full, None], out=target)
        if full < groups:
            np.multiply(codes[full * group :], scale[full], out=out[full * group :])


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        FloatScheme("float32", 1),
        FloatScheme("float16", 2),
        FloatScheme("bfloat16", 3),
        IntScheme("int8", 4, bits=8, group_size=0),
        *(IntScheme(f"int4-g{g}", 5, bits=4, group_size=g) for g in (32, 64, 128)),
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
