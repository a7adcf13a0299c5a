"""Directories that appear whole or not at all, even when the writer is killed at any instant.

:func:`atomic_directory` builds the new directory in a temp sibling ``.NAME.partial-*`` and renames it into
place.  Replacing an existing ``NAME`` takes two renames -- ``NAME`` aside to ``.NAME.old-*``, then the new one
in -- and removes the old one last, so at every instant either ``NAME`` or ``.NAME.old-*`` holds a complete
directory.  The writer holds an ``flock`` on each of its temp and retired directories while it works; a
lock that can be taken belongs to a writer that died (``SIGKILL``, power loss).  :func:`recover`, run at the
start of every write, removes such dead partial directories and retired ones, and puts a retired directory
back when a kill between the two renames left ``NAME`` missing.

Replacing is refused unless the caller says so (``overwrite``) and ``replaceable(NAME)`` holds (for a
bundle: a directory holding a bundle manifest), so an export never deletes a folder of the user's files or
a plain file.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hm_export.errors import UsageError

PARTIAL, RETIRED = "partial", "old"
_held: set[int] = set()  # descriptors holding this process's directory locks


def _forget_locks_in_child() -> None:
    """A forked child (e.g. a quantizer worker) must not keep its parent's locks alive: when the parent is
    killed its directories are stale even if the child lingers.  Closing the child's copies leaves the
    parent's lock in place (an flock lasts while any descriptor of it is open)."""
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _lock(directory: Path, wait: bool) -> int | None:
    """An open descriptor of ``directory`` holding an exclusive flock, or None if another process holds it
    (or the directory vanished meanwhile)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    _held.add(fd)
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        _held.discard(fd)
        os.close(fd)


def _siblings(destination: Path, kind: str) -> list[Path]:
    prefix = f".{destination.name}.{kind}-"
    parent = destination.parent
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def recover(destination: Path) -> list[str]:
    """Clean up after writers of ``destination`` that died: remove their partial directories, and put a
    retired directory back when ``destination`` is missing (else remove it).  Directories whose writer is
    still alive are left alone.  Returns what was done, one line per directory."""
    destination = Path(destination)
    done = []
    for kind in (RETIRED, PARTIAL):
        for stale in _siblings(destination, kind):
            fd = _lock(stale, wait=False)
            if fd is None:
                continue  # a live writer holds it
            try:
                if kind == RETIRED and not os.path.lexists(destination):
                    os.replace(stale, destination)
                    done.append(f"restored {destination} from {stale.name} (a replace was interrupted)")
                else:
                    shutil.rmtree(stale, ignore_errors=True)
                    done.append(f"removed {stale} (left by an interrupted write)")
            finally:
                _unlock(fd)
    return done


@contextmanager
def atomic_directory(
    destination: Path, overwrite: bool, replaceable: Callable[[Path], bool] | None = None, what: str = "directory"
) -> Iterator[Path]:
    """Yield a temp directory next to ``destination``; on success rename it into place.

    On any exception the temp directory is removed and an existing ``destination`` is left as it was; a
    kill leaves either the old or the new directory (after :func:`recover`, which this runs first).
    ``destination`` is replaced only with ``overwrite`` and when ``replaceable(destination)`` holds (a
    :class:`~hm_export.errors.UsageError` naming it otherwise, raised before any work is done).
    """
    destination = Path(destination)
    recover(destination)
    check_replaceable(destination, overwrite, replaceable, what)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.{PARTIAL}-", dir=destination.parent))
    lock = _lock(tmp, wait=True)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a shipped directory should be readable as usual
        yield tmp
        if os.path.lexists(destination):
            check_replaceable(destination, overwrite, replaceable, what)  # it may have appeared meanwhile
            _swap(tmp, destination)
        else:
            os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _unlock(lock)


def check_replaceable(
    destination: Path, overwrite: bool, replaceable: Callable[[Path], bool] | None, what: str = "directory"
) -> None:
    """Refuse (UsageError naming it) an existing ``destination`` unless ``overwrite`` and ``replaceable``."""
    if not os.path.lexists(destination):
        return
    if not overwrite:
        raise UsageError(f"{destination}: already exists (overwrite it explicitly to replace it)", path=destination)
    if destination.is_symlink() or not destination.is_dir() or (replaceable and not replaceable(destination)):
        raise UsageError(
            f"{destination}: exists and is not an hm-export {what}; refusing to replace it (choose another path)",
            path=destination,
        )


def _swap(new: Path, destination: Path) -> None:
    """``destination`` aside, ``new`` in, the old one removed: never a moment without a complete directory."""
    retired = destination.with_name(f".{destination.name}.{RETIRED}-{secrets.token_hex(4)}")
    lock = _lock(destination, wait=True)  # held across the renames: recover() leaves it to us
    try:
        os.replace(destination, retired)
        try:
            os.replace(new, destination)
        except BaseException:
            os.replace(retired, destination)  # put the old directory back before cleaning up
            raise
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        _unlock(lock)


def write_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to a temp file next to ``path`` (umask permissions), then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.writelines(chunks)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
