"""Reading the files of a bundle or bank without ever leaving it, blocking, or reading without bound.

A path taken from a bundle file (manifest, bank index, checks) is untrusted.  It is accepted only as a
``/``-separated relative path of plain names (no absolute path, no empty, ``.`` or ``..`` component, no
backslash or NUL), and it must name, under its root, a **regular file** (or, where a directory is asked for,
a directory) reached through **no symbolic link**: a symlinked block, level folder or manifest could point
anywhere, and a FIFO, device or socket in place of a file would block a reader or feed it without end.

* :func:`resolve_inside` checks a path with ``lstat`` on every component (for libraries that take a path:
  ONNX Runtime, ExecuTorch, coremltools);
* :func:`open_regular` / :func:`read_capped` open a file with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO cannot
  block the open) and check it is regular on the open descriptor, then read at most a declared number of
  bytes (a file that grew past what the manifest declares is refused, never read to the end);
* :class:`ContainedTree` opens files by relative path from a root descriptor, one ``openat`` per component
  with ``O_NOFOLLOW`` (directories kept open): the bank reader's per-block opens, with no window between the
  check and the open.

The root directory itself is the caller's choice (it may be a symlink the user made); only what lies under
it is constrained.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

from hm_export.errors import BundleError, HmExportError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
DIR_FLAGS = os.O_RDONLY | _NOFOLLOW | _DIRECTORY | _CLOEXEC
CHUNK = 1 << 20


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def relative_parts(
    relative: object, what: str, where: str | Path, error: type[HmExportError] = BundleError, field: str | None = None
) -> tuple[str, ...]:
    """The components of a bundle-relative path, refusing anything that could leave the root."""
    if not isinstance(relative, str) or not relative:
        raise error(f"{what}: path {relative!r} is not a non-empty string", path=where, field=field)
    if relative.startswith("/") or "\\" in relative or "\0" in relative:
        raise error(
            f"{what}: path {relative!r} is absolute or not '/'-separated (must stay inside the bundle)",
            path=where,
            field=field,
        )
    parts = tuple(relative.split("/"))
    if any(part in ("", ".", "..") for part in parts):
        raise error(
            f"{what}: unsafe path {relative!r} (must stay inside the bundle: no empty, '.' or '..' component)",
            path=where,
            field=field,
        )
    return parts


def resolve_inside(
    root: Path,
    relative: object,
    what: str,
    where: str | Path,
    kind: str = "file",
    error: type[HmExportError] = BundleError,
    field: str | None = None,
) -> Path:
    """``root/relative`` after checking every component with ``lstat``: no symlink, directories on the way,
    and a regular file (``kind="file"``) or a directory (``kind="dir"``) at the end.

    ``where`` is the file the path was read from (named by errors about the path itself); errors about what
    is on disk name the offending path.
    """
    parts = relative_parts(relative, what, where, error, field)
    path = Path(root)
    for index, part in enumerate(parts):
        path = path / part
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise error(f"{path}: missing ({what})", path=path, field=field) from None
        except OSError as exc:
            raise error(f"{path}: cannot read ({what}): {exc.strerror}", path=path, field=field) from None
        last = index == len(parts) - 1
        if stat.S_ISLNK(info.st_mode):
            raise error(
                f"{path}: is a symbolic link ({what}); bundle contents must be regular files inside the bundle",
                path=path,
                field=field,
            )
        wanted = stat.S_ISREG if last and kind == "file" else stat.S_ISDIR
        if not wanted(info.st_mode):
            expected = "a regular file" if last and kind == "file" else "a directory"
            raise error(f"{path}: is {_kind(info.st_mode)}, expected {expected} ({what})", path=path, field=field)
    return path


def check_tree(root: Path, what: str, error: type[HmExportError] = BundleError) -> None:
    """Every entry under the directory ``root`` is a regular file or a directory, none a symlink (for
    directory-shaped programs such as ``.mlpackage`` handed whole to a toolchain)."""
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(directory) / name
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise error(f"{path}: is {_kind(mode)} inside {what}; only regular files and directories are read")


def open_regular(path: Path | str, what: str, error: type[HmExportError] = BundleError) -> int:
    """A read-only descriptor of a regular file: ``O_NOFOLLOW`` (a symlink is refused), ``O_NONBLOCK`` (a
    FIFO cannot block the open), then ``fstat`` on the descriptor."""
    try:
        fd = os.open(path, FILE_FLAGS)
    except FileNotFoundError:
        raise error(f"{path}: missing ({what})", path=path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{path}: is a symbolic link ({what}); only regular files are read", path=path) from None
        raise error(f"{path}: cannot open ({what}): {exc.strerror}", path=path) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path}: is {_kind(mode)}, expected a regular file ({what})", path=path)
    return fd


def read_capped(
    path: Path | str,
    what: str,
    limit: int,
    error: type[HmExportError] = BundleError,
    exact: int | None = None,
    field: str | None = None,
) -> bytes:
    """The bytes of the regular file ``path``: at most ``limit`` bytes, exactly ``exact`` when given (the
    size a manifest declares).  Refused, without reading it, when it is larger."""
    fd = open_regular(path, what, error)
    try:
        size = os.fstat(fd).st_size
        if exact is not None and size != exact:
            raise error(f"{path}: {size} bytes, the manifest records {exact} ({what})", path=path, field=field)
        if size > limit:
            raise error(f"{path}: {size} bytes, more than the {limit} a {what} may have", path=path, field=field)
        chunks, total = [], 0
        while total <= size:  # read one byte past the size: a file that grows meanwhile is caught
            chunk = os.read(fd, min(CHUNK, size + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total != size:
            raise error(f"{path}: changed size while being read ({what})", path=path, field=field)
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{path}: cannot read ({what}): {exc.strerror}", path=path, field=field) from None
    finally:
        os.close(fd)


class ContainedTree:
    """Opens regular files below ``root`` by relative path: directories one ``openat`` at a time with
    ``O_NOFOLLOW | O_DIRECTORY`` (kept open for the next file), the file with ``O_NOFOLLOW | O_NONBLOCK``.

    Thread-safe; :meth:`close` releases the directory descriptors.
    """

    def __init__(self, root: Path, what: str, error: type[HmExportError] = BundleError) -> None:
        self.root, self.what, self.error = Path(root), what, error
        try:
            self._root_fd = os.open(self.root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        except OSError as exc:
            raise error(f"{self.root}: cannot open the {what} directory: {exc.strerror}", path=self.root) from None
        self._dirs: dict[tuple[str, ...], int] = {(): self._root_fd}
        self._lock = threading.Lock()

    def _directory(self, parts: tuple[str, ...]) -> int:
        with self._lock:
            if parts in self._dirs:
                return self._dirs[parts]
        fd = self._openat(
            self._directory(parts[:-1]), parts, DIR_FLAGS, self.what, f"a directory inside the {self.what}"
        )
        with self._lock:
            if parts in self._dirs:  # another thread opened it meanwhile
                os.close(fd)
            else:
                self._dirs[parts] = fd
            return self._dirs[parts]

    def open(self, relative: str, what: str) -> int:
        """A descriptor of the regular file ``relative`` (errors name ``root/relative``)."""
        parts = relative_parts(relative, what, self.root, self.error)
        fd = self._openat(self._directory(parts[:-1]), parts, FILE_FLAGS, what, "a regular file")
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            path = self.root.joinpath(*parts)
            raise self.error(f"{path}: is {_kind(mode)}, expected a regular file ({what})", path=path)
        return fd

    def _openat(self, parent: int, parts: tuple[str, ...], flags: int, what: str, expected: str) -> int:
        """``openat(parent, parts[-1], flags)``; a failure names ``root/parts`` and what is there instead."""
        path = self.root.joinpath(*parts)
        try:
            return os.open(parts[-1], flags, dir_fd=parent)
        except FileNotFoundError:
            raise self.error(f"{path}: missing ({what})", path=path) from None
        except OSError:
            kind = _kind(os.lstat(path).st_mode) if os.path.lexists(path) else "unreadable"
            raise self.error(f"{path}: is {kind}, expected {expected} ({what})", path=path) from None

    def close(self) -> None:
        with self._lock:
            for fd in self._dirs.values():
                os.close(fd)
            self._dirs.clear()
