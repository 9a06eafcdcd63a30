"""Writing a run's files so that a crash, a kill -9 or a full disk never leaves a half-written one,
and so that two trainers never write into one workdir.

- `atomic_path`, `write_atomic`: a file written beside its destination, then renamed over it (a reader
  sees the old file or the new one, never a mixture); every file lightjax writes whole (token files,
  examples, safetensors, metadata) goes through them. Object stores (gs://) write an object whole already.
- `staged_dir`, `output_dir`: output folders (exports, conversions, sweeps, audits) that never replace
  what lightjax did not write: each carries a marker naming its kind and entries, and an existing
  folder is replaced only when it is an earlier output of the same kind holding nothing else (or on
  --overwrite); a folder in or above a training run is always refused. `staged_dir` builds the
  output under a temporary name and renames it into place when complete, so a failure leaves the
  destination as it was (local disks; on object stores the folder is written in place).
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
import hashlib
import json
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

from etils import epath


def _local(path: epath.Path) -> bool:
    return "://" not in str(path)


@contextlib.contextmanager
def atomic_path(path: str | epath.PathLike) -> Iterator[epath.Path]:
    """A new path beside `path` to write to, renamed over `path` when the block completes and removed
    when it fails: a reader sees the old file or the new one, never a mixture, and two writers never
    share a partial file. On object stores (gs://), which write an object whole, `path` itself."""
    path = epath.Path(path)
    if not _local(path):
        yield path
        return
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def write_atomic(path: str | epath.PathLike, data: str | bytes) -> None:
    """Replace `path`'s contents with `data` in one step (atomic_path), flushed to disk first."""
    with atomic_path(path) as partial, partial.open("wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
        f.flush()
        if _local(partial):
            os.fsync(f.fileno())


def absolute(path: str | epath.PathLike) -> epath.Path:
    """`path` as an absolute epath: local paths made absolute (Orbax needs them so), URLs as given."""
    path = epath.Path(path)
    return path if not _local(path) else epath.Path(os.path.abspath(path))


OUTPUT_MARKER = "lightjax_output.json"  # in every output folder: what wrote it, and which entries


# The kinds of output folder, as the messages name them.
OUTPUT_KINDS = {"export": "lightjax export", "adapters": "LoRA adapters export", "hf": "Hugging Face model export",
                "tokenizer": "tokenizer", "sweep": "sharding sweep", "audit": "reproducibility audit",
                "fault_injection": "fault-injection run"}


class OutputRefused(ValueError):
    """An output folder that would replace or mix with what lightjax did not write there."""


def is_run_dir(path: epath.Path) -> bool:
    """A training run's workdir (what the trainer writes there first: its lock, metrics, checkpoints)."""
    return (path / "lock").is_file() or (path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir()


def check_output_dir(path: str | epath.PathLike, kind: str, overwrite: bool = False) -> None:
    """OutputRefused unless writing a `kind` output (export, hf, sweep, ...) to folder `path` loses nothing:
    the folder is new or empty, or an earlier output of the same kind holding only what lightjax wrote
    there (its marker lists it), or `overwrite` is asked for. A folder inside a run, or one that holds a
    run, is refused even then."""
    path = absolute(path)
    for folder in (path, *path.parents):
        if is_run_dir(folder):
            where = "is" if folder == path else "is inside"
            raise OutputRefused(f"{path} {where} the training run {folder}: an output there would mix with (or "
                                "replace) the run's files. Choose a folder outside it.")
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputRefused(f"{path} is a file, not a folder. Choose another output folder.")
    entries = sorted(e.name for e in path.iterdir())
    marker = _read_marker(path)
    if not entries or (marker is not None and marker.get("kind") == kind and not _added(entries, marker)):
        return
    if overwrite:
        run = _run_below(path) if marker is None else None
        if run is not None:
            raise OutputRefused(f"{path} holds the training run {run}, which --overwrite would delete. Choose "
                                "another output folder.")
        return
    if marker is None:
        raise OutputRefused(f"{path} already holds files that lightjax did not write ({_names(entries)}). Choose a "
                            "new folder, or pass --overwrite to replace it.")
    if marker.get("kind") != kind:
        held = OUTPUT_KINDS.get(marker.get("kind"), f"{marker.get('kind')} output")
        raise OutputRefused(f"{path} holds a {held}, not a {OUTPUT_KINDS[kind]}. Choose another "
                            "folder, or pass --overwrite to replace it.")
    raise OutputRefused(f"{path} holds files added after lightjax wrote it ({_names(_added(entries, marker))}). "
                        "Move them, choose another folder, or pass --overwrite to replace it.")


def _read_marker(path: epath.Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((path / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _added(entries: list[str], marker: dict[str, Any]) -> list[str]:
    """Entries of an output folder that its marker does not list (None: written in place, list unknown)."""
    listed = marker.get("entries")
    return [] if listed is None else [e for e in entries if e not in listed and e != OUTPUT_MARKER]


def _names(entries: list[str]) -> str:
    return ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")


def _run_below(path: epath.Path) -> epath.Path | None:
    if not _local(path):
        return next((p.parent for p in path.glob("**/metrics.jsonl")), None)
    for root, dirs, _ in os.walk(path):
        if is_run_dir(epath.Path(root)):
            return epath.Path(root)
        dirs[:] = [d for d in dirs if d != "checkpoints"]
    return None


def _write_marker(path: epath.Path, kind: str, entries: list[str] | None) -> None:
    (path / OUTPUT_MARKER).write_text(json.dumps({"kind": kind, "entries": entries}))


def _remove(path: epath.Path) -> None:
    path.rmtree() if path.is_dir() else path.unlink()


@contextlib.contextmanager
def staged_dir(path: str | epath.PathLike, kind: str, overwrite: bool = False) -> Iterator[epath.Path]:
    """Yields a temporary folder beside `path`; when the block succeeds it becomes `path`, marked as a
    `kind` output, when it fails it is removed and `path` is untouched. An existing `path` is replaced
    only where check_output_dir allows it."""
    path = absolute(path)
    check_output_dir(path, kind, overwrite)
    if not _local(path):  # object stores cannot rename a folder in one step: written in place
        path.mkdir(parents=True, exist_ok=True)
        yield path
        _write_marker(path, kind, sorted(e.name for e in path.iterdir()))
        return
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    if staging.exists():
        staging.rmtree()
    staging.mkdir(parents=True)
    try:
        yield staging
        _write_marker(staging, kind, sorted(e.name for e in staging.iterdir()))
    except BaseException:
        staging.rmtree()
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        staging.rename(path)
        _remove(old)
    else:
        staging.rename(path)


@contextlib.contextmanager
def output_dir(path: str | epath.PathLike, kind: str, overwrite: bool = False) -> Iterator[epath.Path]:
    """A `kind` output folder written in place by a long job (sweeps, audits, fault injection), whose
    partial results are worth keeping: checked like staged_dir, an earlier output there removed, then
    marked first (so a crashed job's folder is still known as ours) and its entries listed at the end."""
    path = absolute(path)
    check_output_dir(path, kind, overwrite)
    if path.exists():
        _remove(path)
    path.mkdir(parents=True)
    _write_marker(path, kind, None)
    yield path
    _write_marker(path, kind, sorted(e.name for e in path.iterdir() if e.name != OUTPUT_MARKER))


_FULL_HASH_BYTES = 256 * 2**20  # files totalling less are hashed whole; larger ones by size, mtime and samples
_SAMPLE_BYTES = 2**20


def content_fingerprint(paths: list[epath.Path]) -> str:
    """A sha256 of files' names, sizes and contents: each file whole when they total under 256 MiB, else
    its size, mtime and first and last MiB (an edit elsewhere in a huge file still changes its mtime)."""
    paths = sorted(paths, key=str)
    sizes = [p.stat().length if not _local(p) else os.path.getsize(p) for p in paths]
    whole = sum(sizes) < _FULL_HASH_BYTES
    digest = hashlib.sha256()
    for path, size in zip(paths, sizes, strict=True):
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            if whole:
                for block in iter(lambda f=f: f.read(2**20), b""):
                    digest.update(block)
                continue
            digest.update(f.read(_SAMPLE_BYTES))
            f.seek(max(size - _SAMPLE_BYTES, 0))
            digest.update(f.read(_SAMPLE_BYTES))
        digest.update(str(path.stat().mtime if not _local(path) else os.stat(path).st_mtime_ns).encode())
    return digest.hexdigest()


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

