"""Atomic file writes (a reader never sees a half-written file, and a killed run never leaves one behind) and
file locks (two processes that would build the same file take turns; a folder one process owns is refused to the
next, naming the owner)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks so a model checkpoint of gigabytes costs no memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(e, path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(e, path) from e
        raise


def _write_error(err: OSError, path: Path) -> OSError:
    """The same error (same class and errno: disk full, permission denied, ...) naming the file the caller asked
    for instead of the temp file (or none, as a failed write() gives), marked so the CLI says `cannot write PATH`."""
    new = OSError(err.errno, err.strerror or str(err), str(path))
    new.action = "write"  # type: ignore[attr-defined]
    return new


# A full disk and an exhausted quota: the user frees space and reruns, so they are said in one line, never as a bug.
DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def disk_full_error(err: BaseException, path: str | Path | None = None) -> OSError | None:
    """The disk-full error behind ``err`` as an OSError marked as a failed write of ``path`` (else of the file it
    names), or None when ``err`` is no such error. Libraries that write themselves report it in their own types
    (safetensors: ``... No space left on device (os error 28)``), so the exception chain and the message are read."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = e.errno if isinstance(e, OSError) and e.errno in DISK_FULL else None
        text = str(e)
        code = code or next((c for c in DISK_FULL if f"os error {c})" in text or os.strerror(c) in text), None)
        if code is not None:
            name = path if path is not None else getattr(e, "filename", None)
            new = OSError(code, os.strerror(code), None if name is None else str(name))
            new.action = "write"  # type: ignore[attr-defined]
            return new
        e = e.__cause__ or e.__context__
    return None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@contextmanager
def file_lock(path: str | Path, on_wait: Callable[[], None] | None = None, *, wait: bool = True) -> Iterator[Any]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the duration; a second process blocks until
    the first is done (``on_wait`` is called first, to say so), or with ``wait=False`` gets ``BlockingIOError`` at
    once. Yields the open lock file. POSIX only; elsewhere no lock is taken and None is yielded."""
    try:
        import fcntl
    except ImportError:  # Windows: one process per run folder or store
        yield None
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # "a+", not "w": truncating before the lock is ours would erase what its holder wrote into it
    with open(path, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            if on_wait is not None:
                on_wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield lock
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class LockHeld(Exception):
    """``path`` is locked by another process; ``holder`` is what that process wrote into it (``pid``, ``host``,
    ``command``, ``since``), or empty when it had not written it yet or the file is unreadable."""

    def __init__(self, path: Path, holder: dict[str, Any]):
        super().__init__(f"{path} is held by {holder.get('pid', 'another process')}")
        self.path, self.holder = path, holder


def lock_holder(path: str | Path) -> dict[str, Any]:
    """What the process holding the lock file ``path`` wrote about itself (see :func:`owned_lock`); {} if nothing
    readable. The holder writes it just after taking the lock, so a reader racing it retries briefly."""
    for _ in range(10):
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8") or "null")
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict):
            return data
        time.sleep(0.05)
    return {}


@contextmanager
def owned_lock(
    path: str | Path, *, wait: bool = False, on_wait: Callable[[dict[str, Any]], None] | None = None
) -> Iterator[None]:
    """:func:`file_lock` with this process's PID, host, command line and start time written into the lock file, so
    that a process finding it held can say who holds it. Held by another process: raise :class:`LockHeld` at once,
    or with ``wait`` call ``on_wait(holder)`` and block until it is free. The OS drops the lock when its holder dies,
    so a killed process never leaves a stale one; the file stays."""
    path = Path(path)
    announce = (lambda: on_wait(lock_holder(path))) if on_wait is not None else None
    acquired = False
    try:
        with file_lock(path, announce, wait=wait) as lock:
            acquired = True
            if lock is not None:
                me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
                me["since"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                lock.seek(0)
                lock.truncate()
                lock.write(json.dumps(me, ensure_ascii=False) + "\n")
                lock.flush()
            yield
    except BlockingIOError:
        if acquired:  # raised by the caller's own work, not by the lock
            raise
        raise LockHeld(path, lock_holder(path)) from None
