"""Directories that appear whole or not at all: build in a temp sibling, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(destination: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temp directory next to ``destination``; on success rename it into place.

    On any exception the temp directory is removed and an existing ``destination`` is left as it was.
    """
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination}: already exists (overwrite it explicitly to replace it)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a shipped directory should be readable as usual
    try:
        yield tmp
        if destination.exists():
            retired = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            os.replace(destination, retired)
            try:
                os.replace(tmp, destination)
            except BaseException:
                os.replace(retired, destination)  # put the old directory back before cleaning up
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
