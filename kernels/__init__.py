"""Custom operators for a quantized memory slot, and the loader of their ExecuTorch kernels.

``hm_export::memory_swiglu(x, gate_up, gate_up_scales, down, down_scales) -> Tensor`` computes one memory
layer's SwiGLU ``(silu(x @ Wg) * (x @ Wu)) @ Wd`` from quantized slot tensors, dequantizing inside the
matmul.  The weights are graph inputs (the slot), so no backend's constant-weight quantized kernel applies;
this op reads the codes directly instead of having the program or the host hold a float copy.

Layouts (``R`` = memory width, ``d`` = model width, rows are the reduction axis of each matrix):

* int8: ``gate_up`` int8 ``[1, d, 2R]``, ``down`` int8 ``[1, R, d]``;
* int4: ``gate_up`` uint8 ``[1, d, R]``, ``down`` uint8 ``[1, R, d / 2]``: each byte holds two adjacent
  columns, column ``2c`` in the low nibble and ``2c + 1`` in the high nibble, as ``code + 8`` (``0..15``);
  this is the bank's int4 byte order (docs/bank-format.md), so a block's bytes are copied, not repacked;
* scales float16 ``[1, rows / g, cols]``: one scale per ``g`` consecutive rows of a column (int8 per output
  channel: ``g = rows`` for ``gate_up``; ``down``'s rows span the levels, each with its own scale, so there
  ``g`` divides every level's width).

The reference implementation dequantizes then multiplies in float32; the C++ kernel
(``kernels/memory_swiglu.cpp``, out variant ``memory_swiglu.out``) computes the same sums in a different
order: agreement is to float32 rounding (``rtol=1e-5, atol=1e-5`` relative to the output scale in tests).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from hm_export.errors import ExportError, UsageError

NAMESPACE = "hm_export"
LIBRARY_NAME = "libhm_export_kernels.so"
SOURCE_DIR = Path(__file__).resolve().parent  # the C++ sources ship with the package (kernels/ in the repo)

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define("memory_swiglu(Tensor x, Tensor gate_up, Tensor gate_up_scales, Tensor down, Tensor down_scales) -> Tensor")
_lib.define(
    "memory_swiglu.out(Tensor x, Tensor gate_up, Tensor gate_up_scales, Tensor down, Tensor down_scales, *, "
    "Tensor(a!) out) -> Tensor(a!)"
)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 ``[..., n]`` (two codes + 8 per byte, low nibble first) -> float32 codes ``[..., 2n]`` in -8..7.

    Arithmetic (floor-divide / remainder), not bit ops: bit ops on uint8 do not lower on every backend.
    """
    wide = packed.to(torch.int32)
    pairs = torch.stack([torch.remainder(wide, 16), torch.div(wide, 16, rounding_mode="floor")], dim=-1)
    return pairs.flatten(-2).to(torch.float32) - 8.0


def dequantize(codes: Tensor, scales: Tensor) -> Tensor:
    """Float32 ``[1, rows, cols]`` of a quantized slot matrix (int8 codes, or uint8 packed int4 codes)."""
    values = unpack_int4(codes) if codes.dtype == torch.uint8 else codes.to(torch.float32)
    group = values.shape[1] // scales.shape[1]
    return values * scales.to(torch.float32).repeat_interleave(group, dim=1)


def memory_swiglu_reference(
    x: Tensor, gate_up: Tensor, gate_up_scales: Tensor, down: Tensor, down_scales: Tensor
) -> Tensor:
    """What the op computes: dequantize both matrices, then the float memory SwiGLU."""
    check_operands(x, gate_up, gate_up_scales, down, down_scales)
    weights = dequantize(gate_up, gate_up_scales)
    width = weights.shape[-1] // 2
    hidden = torch.matmul(x, weights)
    return torch.matmul(F.silu(hidden[..., :width]) * hidden[..., width:], dequantize(down, down_scales))


def check_operands(x: Tensor, gate_up: Tensor, gate_up_scales: Tensor, down: Tensor, down_scales: Tensor) -> None:
    """Raise ValueError naming the operand whose dtype or shape breaks the layout in the module docstring."""
    if x.dtype != torch.float32 or x.dim() != 3:
        raise UsageError(f"memory_swiglu: x must be float32 [B, T, d], got {x.dtype} {list(x.shape)}")
    if gate_up.dtype != down.dtype or gate_up.dtype not in (torch.int8, torch.uint8):
        raise UsageError(
            f"memory_swiglu: codes must both be int8 or both uint8 (int4), got {gate_up.dtype}, {down.dtype}"
        )
    d, width = x.shape[-1], down.shape[1]
    pack = 2 if gate_up.dtype == torch.uint8 else 1
    for name, codes, scales, rows, cols in (
        ("gate_up", gate_up, gate_up_scales, d, 2 * width),
        ("down", down, down_scales, width, d),
    ):
        if tuple(codes.shape) != (1, rows, cols // pack) or cols % pack:
            raise UsageError(f"memory_swiglu: {name} codes {list(codes.shape)}, expected [1, {rows}, {cols // pack}]")
        if scales.dtype != torch.float16 or scales.dim() != 3 or scales.shape[2] != cols or rows % scales.shape[1]:
            raise UsageError(
                f"memory_swiglu: {name} scales {scales.dtype} {list(scales.shape)}, "
                f"expected float16 [1, {rows} / g, {cols}]"
            )


@torch.library.impl(_lib, "memory_swiglu", "CompositeExplicitAutograd")
def _memory_swiglu(x: Tensor, gate_up: Tensor, gate_up_scales: Tensor, down: Tensor, down_scales: Tensor) -> Tensor:
    return memory_swiglu_reference(x, gate_up, gate_up_scales, down, down_scales)


@torch.library.impl(_lib, "memory_swiglu.out", "CompositeExplicitAutograd")
def _memory_swiglu_out(
    x: Tensor, gate_up: Tensor, gate_up_scales: Tensor, down: Tensor, down_scales: Tensor, *, out: Tensor
) -> Tensor:
    out.resize_(x.shape).copy_(memory_swiglu_reference(x, gate_up, gate_up_scales, down, down_scales))
    return out


@torch.library.register_fake(f"{NAMESPACE}::memory_swiglu")
def _memory_swiglu_fake(
    x: Tensor, gate_up: Tensor, gate_up_scales: Tensor, down: Tensor, down_scales: Tensor
) -> Tensor:
    return torch.empty_like(x)


def memory_swiglu(x: Tensor, gate_up: Tensor, gate_up_scales: Tensor, down: Tensor, down_scales: Tensor) -> Tensor:
    """The memory SwiGLU of a quantized slot (see the module docstring); traced as one op."""
    return torch.ops.hm_export.memory_swiglu(x, gate_up, gate_up_scales, down, down_scales)


class KernelBuildError(ExportError):
    """The C++ kernel library could not be configured, built or loaded."""


def default_build_dir() -> Path:
    """Where :func:`build_kernel_library` builds by default (``HM_EXPORT_KERNELS_BUILD`` overrides): one build per
    executorch installation, since the library must link the very ``libexecutorch.so`` the process loads."""
    override = os.environ.get("HM_EXPORT_KERNELS_BUILD")
    if override:
        return Path(override)
    installation = hashlib.sha256(str(executorch_cmake_dir()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "hm-export" / f"kernels-build-{installation}"


def executorch_cmake_dir() -> Path:
    """The CMake package config shipped in the executorch wheel."""
    import executorch

    cmake_dir = Path(next(iter(executorch.__path__))) / "share" / "cmake"
    if not (cmake_dir / "executorch-config.cmake").is_file():
        raise KernelBuildError(f"{cmake_dir}: the executorch wheel has no CMake config (executorch-config.cmake)")
    return cmake_dir


def build_kernel_library(build_dir: Path | None = None, jobs: int = 2) -> Path:
    """Configure and build ``libhm_export_kernels.so`` from :data:`SOURCE_DIR` (incremental); return its path.

    Linux (the library is loaded with ``RTLD_GLOBAL`` next to the wheel's shared runtime); needs cmake >= 3.19
    and a C++17 compiler."""
    build_dir = Path(build_dir) if build_dir else default_build_dir()
    cmake = shutil.which("cmake")
    if cmake is None:
        raise KernelBuildError("cmake not found on PATH: it is needed to build the hm-export kernels")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        [
            cmake,
            "-S",
            str(SOURCE_DIR),
            "-B",
            str(build_dir),
            *generator,
            f"-DCMAKE_PREFIX_PATH={executorch_cmake_dir()}",
        ],
        [cmake, "--build", str(build_dir), "-j", str(jobs)],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            raise KernelBuildError(
                f"{' '.join(step)} failed ({done.returncode}):\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
            )
    library = build_dir / LIBRARY_NAME
    if not library.is_file():
        raise KernelBuildError(f"the build finished without producing {library}")
    return library


_loaded: list[tuple[Path, ctypes.CDLL]] = []


def load_kernel_library(library: Path | None = None) -> Path | None:
    """Register the C++ kernels with the ExecuTorch runtime of this process, once; return the library loaded
    (None when the kernels were already registered by a library this module did not load).

    Loads the Python bindings first so that the library binds to their ``libexecutorch.so`` (one operator
    registry; registering an operator twice aborts the process, hence the once).  ``RTLD_GLOBAL`` so the
    runtime resolves the kernels' symbols.  ``library`` defaults to ``HM_EXPORT_KERNELS_LIB`` or a build in
    :func:`default_build_dir` (built on first use).
    """
    if _loaded:
        return _loaded[0][0]
    if registered_in_runtime():
        return None
    if library is None:
        override = os.environ.get("HM_EXPORT_KERNELS_LIB")
        library = Path(override) if override else build_kernel_library()
    library = Path(library).resolve()
    if not library.is_file():
        raise KernelBuildError(f"{library}: kernel library not found")
    try:
        _loaded.append((library, ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)))
    except OSError as exc:
        raise KernelBuildError(f"{library}: cannot load: {exc}") from exc
    if not registered_in_runtime():
        raise KernelBuildError(f"{library}: loaded, but the ExecuTorch runtime has no hm_export::memory_swiglu.out")
    return library


def registered_in_runtime(operator: str = f"{NAMESPACE}::memory_swiglu.out") -> bool:
    """Whether the ExecuTorch runtime of this process has a kernel for ``operator``."""
    from executorch.extension.pybindings import portable_lib  # also loads libexecutorch.so, the registry

    return operator in portable_lib._get_operator_names()


__all__ = [
    "KernelBuildError",
    "build_kernel_library",
    "dequantize",
    "load_kernel_library",
    "memory_swiglu",
    "memory_swiglu_reference",
    "registered_in_runtime",
    "unpack_int4",
]
