"""Writing a run's files so that a crash, a kill -9 or a full disk never leaves a half-written one,
and so that two trainers never write into one workdir.

- `write_atomic`: a file written beside its destination, then renamed over it (a reader sees the old
  file or the new one, never a mixture). Object stores (gs://) write an object whole already.
- `staged_dir`: an output directory built under a temporary name and renamed into place only when
  complete; on failure the partial one is removed and an existing destination is left as it was
  (local disks; on object stores the folder is written in place).
- `WorkdirLock`: an exclusive lock on WORKDIR/lock, held for a run's life. On local disks it is an
  OS lock (`fcntl.flock`), released by the kernel when its holder dies however it dies, so a killed
  trainer's lock cannot block the next one: it is taken over (and said so: a cleanly released lock
  file is empty, a killed holder's still names it). The file records who holds it (host, pid, since
  when) for the message that refuses a second trainer. Object stores have no such
  lock; there the lock file is written and left unchecked (one trainer per gs:// workdir is the
  user's to keep).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

from etils import epath


def _local(path: epath.Path) -> bool:
    return "://" not in str(path)


def write_atomic(path: str | epath.PathLike, data: str | bytes) -> None:
    """Replace `path`'s contents with `data` in one step."""
    path = epath.Path(path)
    if not _local(path):
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


@contextlib.contextmanager
def staged_dir(path: str | epath.PathLike, overwrite: bool = True) -> Iterator[epath.Path]:
    """Yields a temporary directory beside `path`; when the block succeeds it becomes `path` (replacing
    an existing one when `overwrite`), when it fails it is removed and `path` is untouched."""
    path = epath.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists.")
    if not _local(path):  # object stores cannot rename a folder in one step: written in place
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    if staging.exists():
        staging.rmtree()
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        staging.rmtree()
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        staging.rename(path)
        old.rmtree() if old.is_dir() else old.unlink()
    else:
        staging.rename(path)


class WorkdirLocked(RuntimeError):
    pass


class WorkdirLock:
    """`acquire()` takes WORKDIR/lock or raises WorkdirLocked naming its holder; `release()` lets it go
    (also usable as `with WorkdirLock(workdir):`)."""

    def __init__(self, workdir: str | epath.PathLike):
        self.path = epath.Path(workdir) / "lock"
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if not _local(self.path):
            self.path.write_text(json.dumps(holder))
            return self
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirLocked(f"{self.path.parent} is in use by another trainer ({_describe(self.path)}); "
                                "wait for it to finish, stop it, or use another --workdir.") from None
        if os.fstat(fd).st_size:  # its holder died without releasing it: the OS has let go of it already
            print(f"Took over the lock of a trainer that stopped without releasing it ({_describe(self.path)}).",
                  flush=True)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file: released cleanly
            os.close(self._fd)  # releases the lock
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _describe(path: epath.Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"

