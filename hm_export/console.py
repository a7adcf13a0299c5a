"""What the command line shows while library code runs: its own output, and nothing of the toolchains'.

Exporting pulls in torch, torchao, ExecuTorch, ONNX and coremltools, which print load failures, deprecation
warnings, C++ log lines (``I 00:00:00.123 executorch:...``, cpuinfo) and progress messages, some of them on
stdout, where they would corrupt a ``--json`` report.  :func:`library_output` runs a command with:

* Python warnings ignored and Python logging below ERROR disabled;
* third-party writes to Python's ``sys.stdout`` and to file descriptors 1 and 2 (C and C++ code) sent to
  ``/dev/null``, or with ``verbose`` to stderr (stdout stays the command's own);
* the command's own output on :attr:`Streams.out` / :attr:`Streams.err`, the real stdout and stderr,
  and hm-export's own progress bars (:func:`progress_bar`) on that stderr.

Progress bars are drawn only when stderr is a terminal (:attr:`Streams.progress`).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")

# Read by torch / transformers / huggingface_hub when they load (the CLI imports them lazily, after this).
QUIET_ENVIRONMENT = {
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
_progress_stream: TextIO | None = None  # where hm-export's own progress bars go while library_output runs


@dataclass(frozen=True)
class Streams:
    """The command's own output streams, and whether progress bars are drawn."""

    out: TextIO
    err: TextIO
    progress: bool


def _fd_of(stream: TextIO, fd: int) -> bool:
    """Whether ``stream`` writes straight to file descriptor ``fd`` (not a test runner's capture)."""
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


@contextmanager
def _detach_fd(fd: int, stream: TextIO, target: int) -> Iterator[TextIO]:
    """Point ``fd`` at ``target`` and yield a new text stream on a duplicate of the original ``fd``."""
    stream.flush()
    saved = os.dup(fd)
    os.dup2(target, fd)
    own = io.TextIOWrapper(
        os.fdopen(os.dup(saved), "wb", buffering=0),
        encoding=stream.encoding or "utf-8",
        errors="backslashreplace",
        line_buffering=True,
        write_through=True,
    )
    try:
        yield own
    finally:
        own.flush()
        own.close()
        os.dup2(saved, fd)
        os.close(saved)


@contextmanager
def library_output(verbose: bool = False, quiet: bool = False) -> Iterator[Streams]:
    """Run library code with third-party output silenced (or, ``verbose``, moved to stderr); see the module
    docstring.  ``quiet`` turns progress bars off."""
    out, err = sys.stdout, sys.stderr
    with ExitStack() as stack:
        if verbose:
            stack.enter_context(redirect_stdout(err))
            yield Streams(out, err, not quiet and err.isatty())
            return
        for key, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        stack.callback(logging.disable, previous)
        devnull = os.open(os.devnull, os.O_WRONLY)
        stack.callback(os.close, devnull)
        if _fd_of(out, 1):
            out = stack.enter_context(_detach_fd(1, sys.stdout, devnull))
        if _fd_of(err, 2):
            err = stack.enter_context(_detach_fd(2, sys.stderr, devnull))
        sink = stack.enter_context(open(os.devnull, "w"))
        stack.enter_context(redirect_stdout(sink))
        stack.enter_context(redirect_stderr(sink))  # third-party progress bars and prints
        stack.enter_context(_progress_to(err))
        yield Streams(out, err, not quiet and err.isatty())


@contextmanager
def _progress_to(stream: TextIO) -> Iterator[None]:
    global _progress_stream
    previous, _progress_stream = _progress_stream, stream
    try:
        yield
    finally:
        _progress_stream = previous


def progress_bar(iterable: Iterable[T] | None = None, *, enabled: bool, **options: Any) -> tqdm:
    """A tqdm bar of hm-export's own (drawn when ``enabled``), on the stream :func:`library_output` keeps for
    the command's own stderr, or on ``sys.stderr`` outside it."""
    return tqdm(iterable, disable=not enabled, file=_progress_stream or sys.stderr, **options)
