"""The one exception hierarchy of hm-export.

Every failure the library reports on purpose is an :class:`HmExportError`; its message names the file (or
directory) and the problem, ``.path`` is that file and ``.field`` the manifest/index/config field at fault
(dotted, e.g. ``model.vocab_size``; ``None`` when the whole file is at fault).  Errors of third-party
libraries (tokenizers, safetensors, json, ONNX Runtime, ExecuTorch, coremltools) are wrapped where their
call sites read a file (:func:`wrapped`), so a caller catches one type.  The command line maps
:class:`HmExportError` to one line on stderr and exit code 2 in one place (``hm_export.cli``).

The subclasses also derive from the builtin type callers caught before this hierarchy existed
(``ValueError`` for bad input, ``RuntimeError`` for a toolchain or runtime failure, ``ImportError`` for a
missing optional dependency), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_LEADING_PATH = re.compile(r"^([^\s:][^:\n]*?)(?::\d+)?: ")


class HmExportError(Exception):
    """A failure hm-export reports on purpose: the message names the file and the problem.

    ``path``: the file or directory at fault (``None`` when the error is about an argument, not a file);
    when not given it is read from the message's ``"<path>: "`` prefix, the convention every message follows.
    ``field``: the dotted field of that file at fault, when one is.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, field: str | None = None) -> None:
        if path is not None and not message.startswith(str(path)):
            message = f"{path}: {message}"
        super().__init__(message)
        self.path = str(path) if path is not None else _leading_path(message)
        self.field = field

    @property
    def message(self) -> str:
        return str(self)


def _leading_path(message: str) -> str | None:
    match = _LEADING_PATH.match(message)
    if match is None or not ("/" in match.group(1) or "." in match.group(1)):
        return None
    return match.group(1)


class UsageError(HmExportError, ValueError):
    """An argument or option value is invalid (no file at fault, or a file the caller named)."""


class InputError(HmExportError, ValueError):
    """A file the user passed in (contexts JSON lines, a key file) is missing or malformed."""


class ConfigError(HmExportError, ValueError):
    """A model configuration is inconsistent, out of range, or does not describe this model family."""


class CheckpointError(HmExportError, ValueError):
    """A checkpoint directory is missing files, has the wrong tensors, or an unknown version."""


class BundleError(HmExportError, ValueError):
    """A bundle is missing files, was tampered with, or does not match what a loader expects."""


class IntegrityError(BundleError):
    """The integrity root refused a bundle: the manifest's digest or signature does not match."""


class BankError(HmExportError, ValueError):
    """A bank directory, block file or scheme is missing, corrupt, unknown, or does not match its index."""


class ExportError(HmExportError, RuntimeError):
    """An export step failed: a graph pass, an emitter or a toolchain refused the program."""


class HostUnsupported(HmExportError, RuntimeError):
    """The target's runtime does not run on this host (e.g. Core ML prediction off macOS)."""


class NativeError(HmExportError, RuntimeError):
    """The native build failed, or ``hm_runner`` refused its input (the message is its error)."""


class MissingExtraError(HmExportError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def missing_extra(module: str, extra: str, purpose: str) -> MissingExtraError:
    """The error for an absent optional dependency: one line naming the pip extra."""
    return MissingExtraError(f"{purpose} needs {module}: pip install 'hm-export[{extra}]'")


@contextmanager
def wrapped(
    path: str | Path, what: str, error: type[HmExportError] = BundleError, field: str | None = None
) -> Iterator[None]:
    """Turn any exception a third-party reader raises inside the block into ``error`` naming ``path``.

    Project errors pass through unchanged; ``MemoryError`` too (a bound read should have prevented it, and
    it is not the file's fault on a machine short of memory).
    """
    try:
        yield
    except (HmExportError, MemoryError):
        raise
    except Exception as exc:  # the boundary: tokenizers, safetensors, ONNX Runtime, ExecuTorch raise anything
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{what}: {type(exc).__name__}: {detail[:300]}", path=path, field=field) from exc
