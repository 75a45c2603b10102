"""Crash-safe file placement shared by the S3 artifact cache and the collection store: work happens in a staging
entry named after its process, is moved into place with one rename, and the staging entries of a process that was
killed are removed by the next writer."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def staging_prefix(kind: str, pid: int | None = None) -> str:
    """The name prefix of a staging entry: `.<kind>-<pid>-`."""
    return f".{kind}-{os.getpid() if pid is None else pid}-"


def remove_abandoned(folder: Path, kind: str) -> list[Path]:
    """Remove the `kind` staging entries in `folder` whose process is gone; those of a live process (a writer now)
    are left alone. Returns what was removed."""
    removed = []
    for entry in folder.glob(f".{kind}-*"):
        pid = entry.name.removeprefix(f".{kind}-").split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (the directory entry itself is data on disk)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on lock_file (created if missing) while the block runs: processes that make the same
    entry take turns, and the later ones find it made. The kernel drops the lock of a killed process."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
