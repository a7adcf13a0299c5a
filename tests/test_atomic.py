"""Writes you can trust (hm_export.atomic): a writer killed at any step leaves the old or the new directory
after the next run's recovery, never nothing and never a partial folder; ``--overwrite`` replaces only a
bundle.  The kills are real (``os._exit`` in a child process at each step: no cleanup code runs); the
random-SIGKILL run of a real ``export --overwrite`` is scripts/sigkill_export.py."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hm_export.atomic import atomic_directory, recover
from hm_export.cli import main
from hm_export.errors import UsageError

# The child writes a directory with a marker and dies (os._exit: like SIGKILL, no cleanup) right after the
# N-th os.replace / at the first shutil.rmtree of the retired copy; N = 0: while building; N = 99: not at all.
CHILD = """
import os, shutil, sys
from pathlib import Path
import hm_export.atomic as atomic
kill, calls, real_replace, real_rmtree = sys.argv[2], [0], os.replace, shutil.rmtree
def replace(a, b):
    real_replace(a, b)
    calls[0] += 1
    if kill == f"replace{calls[0]}":
        os._exit(9)
def rmtree(path, *args, **kwargs):
    if kill == "rmtree" and ".old-" in str(path):
        os.remove(next(Path(path).iterdir()))  # half removed
        os._exit(9)
    real_rmtree(path, *args, **kwargs)
atomic.os.replace, atomic.shutil.rmtree = replace, rmtree
with atomic.atomic_directory(Path(sys.argv[1]), True, lambda p: (p / "manifest.json").is_file()) as tmp:
    (tmp / "manifest.json").write_text("new")
    (tmp / "payload").write_text("new" * 1000)
    if kill == "build":
        os._exit(9)
"""


def make(directory: Path, content: str) -> None:
    directory.mkdir()
    (directory / "manifest.json").write_text(content)
    (directory / "payload").write_text(content * 1000)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    ("kill", "expect"),
    [("build", "old"), ("replace1", "old"), ("replace2", "new"), ("rmtree", "new"), ("none", "new")],
)
def test_a_kill_at_any_step_leaves_a_complete_directory_after_recovery(tmp_path, kill, expect):
    destination = tmp_path / "bundle"
    make(destination, "old")
    done = subprocess.run([sys.executable, "-c", CHILD, str(destination), kill], capture_output=True, text=True)
    assert done.returncode == (0 if kill == "none" else 9), done.stderr
    if kill == "replace1":
        assert not destination.exists()  # between the two renames: only the retired copy holds the bundle
    recover(destination)
    assert (destination / "manifest.json").read_text() == expect
    assert (destination / "payload").read_text() == expect * 1000
    assert leftovers(tmp_path) == []


def test_the_next_write_cleans_up_what_a_killed_one_left(tmp_path):
    destination = tmp_path / "bundle"
    make(destination, "old")
    subprocess.run([sys.executable, "-c", CHILD, str(destination), "build"], check=False)
    assert [name.split("-")[0] for name in leftovers(tmp_path)] == [".bundle.partial"]
    with atomic_directory(destination, True, lambda p: (p / "manifest.json").is_file()) as tmp:
        make(tmp / "inner", "x")
        assert leftovers(tmp_path) == [tmp.name]  # the dead writer's folder is gone before work starts
    assert leftovers(tmp_path) == []


def test_a_live_writer_s_folder_is_left_alone(tmp_path):
    destination = tmp_path / "bundle"
    partial = tmp_path / ".bundle.partial-live"
    partial.mkdir()
    fd = os.open(partial, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a writer in progress holds it
    try:
        assert recover(destination) == []
        assert partial.is_dir()
    finally:
        os.close(fd)
    assert recover(destination) == [f"removed {partial} (left by an interrupted write)"]


@pytest.mark.parametrize("kind", ["folder of user files", "plain file", "symlink to a bundle"])
def test_overwrite_replaces_only_a_bundle(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "folder of user files":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif kind == "plain file":
        out.write_text("notes")
    else:
        make(tmp_path / "real", "old")
        out.symlink_to(tmp_path / "real")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(UsageError, match="is not an hm-export bundle; refusing to replace it"):
        with atomic_directory(out, True, lambda p: (p / "manifest.json").is_file(), "bundle"):
            pytest.fail("must refuse before yielding")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    result = CliRunner().invoke(main, ["export", str(checkpoint), str(out), "--overwrite"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert f"error: {out}: exists and is not an hm-export bundle" in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted([*before, "ckpt"])
