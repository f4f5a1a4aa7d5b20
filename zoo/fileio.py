"""Writing files so that nothing is ever left half-written, and folders one process at a time.

Every file zoo writes goes through :func:`atomic_path`, which is also the one place where an
operating-system failure (no space, no permission, a read-only or missing folder) becomes a
:class:`WriteError` naming the target file and the cause. :func:`locked_folder` keeps two
processes from writing into one output folder at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".zoo.lock"


class WriteError(OSError):
    """An operating-system failure while writing ``path``; ``str()`` is one line for the user."""

    def __init__(self, path: Path, cause: OSError):
        super().__init__(f"cannot write {path}: {_reason(cause)}")
        self.errno, self.path = cause.errno, path


class FolderInUse(OSError):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    A crash or an exception at any moment leaves either the old file or the new one, never a
    partial file: the rename is atomic on POSIX filesystems. An ``OSError`` while writing (also
    one that a writer wrapped in its own exception, as ``torch.save`` does) becomes a
    :class:`WriteError` that names ``path``, not the temporary file; the temporary file is removed.
    Writers should write through Python file objects so that the cause keeps its errno.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if tmp.is_file():  # some writers create 0600 files; use the usual mode
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except Exception as err:
        cause = _os_error_in(err)
        if cause is None or isinstance(cause, WriteError):
            raise
        raise WriteError(final, cause) from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def locked_folder(path: str | os.PathLike, purpose: str) -> Iterator[Path]:
    """Hold an exclusive lock on the folder ``path`` (created if missing) for the block.

    The lock is an OS file lock (``flock``) on ``path/.zoo.lock``: the OS releases it when the
    process dies, however it dies, so a killed run never leaves a stale lock. A second holder is
    refused at once with :class:`FolderInUse` naming the folder, the holder's process id and its
    ``purpose`` (e.g. "zoo train"). The lock file is removed on release; one left by a killed
    process is harmless.
    """
    folder = Path(path)
    lock = folder / LOCK_NAME
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock)
    except FolderInUse:
        raise
    except OSError as err:
        raise WriteError(lock, err) from None
    try:
        with contextlib.suppress(OSError):  # naming the holder is a courtesy: a full disk must not stop the run
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {purpose}\n".encode())
        yield folder
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # while still holding it, so no one can lock the file being removed
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # a run that failed before writing anything leaves no empty folder


def _acquire(lock: Path) -> int:
    """Open and lock ``lock``; retry if the file was replaced between the open and the lock."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(
                f"{lock.parent} is in use by {_holder(lock)}; wait for it to end or choose another folder"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass  # the previous holder removed it on release: lock a fresh one
        os.close(fd)


def _holder(lock: Path) -> str:
    """'process 1234 (zoo train)', read from the lock file the holder wrote."""
    for _ in range(20):  # the holder writes its id just after locking
        with contextlib.suppress(OSError, ValueError):
            pid, _, purpose = lock.read_text().strip().partition(" ")
            return f"process {int(pid)} ({purpose})" if purpose else f"process {int(pid)}"
        time.sleep(0.01)
    return "another process"


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError that caused ``err``: itself, or one in its chain of causes."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _reason(err: OSError) -> str:
    if err.errno is not None and err.strerror:
        return err.strerror
    return str(err) or errno.errorcode.get(err.errno or 0, type(err).__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
