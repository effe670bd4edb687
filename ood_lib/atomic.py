"""Atomic writes: every file the study writes (checkpoints, caches, results) goes through ``atomic_write``.

A write goes to a temporary file ``.<name>.<random>.tmp`` beside its target, is fsynced, then renamed over the
target. While it is written, the temporary file is held under an exclusive ``fcntl.flock``. A process killed
mid-write (SIGKILL, power loss) cannot remove its temporary file; such leftovers are removed by the next
``atomic_write`` into the same folder (at most once a minute per folder and process) or by ``clean_stale_tmp``:
a leftover is a ``.*.tmp`` file untouched for ``STALE_SECONDS`` whose lock nobody holds, so a write in
progress in another process is never touched.
"""
from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks; age alone decides what is stale
    fcntl = None

STALE_SECONDS = 60.0     # a temporary file untouched this long, and unlocked, is a killed write's leftover
_last_clean: dict[Path, float] = {}


def _unlocked(path: Path) -> bool:
    """True when nobody holds the lock of ``path`` (so its writer is gone)."""
    if fcntl is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases the lock just taken


def clean_stale_tmp(folder: Path, older_than: float = STALE_SECONDS) -> list[Path]:
    """Remove the leftovers of killed ``atomic_write`` calls in ``folder``; returns what was removed."""
    removed = []
    now = time.time()
    try:
        candidates = list(Path(folder).glob(".*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        try:
            if now - tmp.stat().st_mtime < older_than or not _unlocked(tmp):
                continue
            tmp.unlink()
            removed.append(tmp)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def _maybe_clean(folder: Path) -> None:
    now = time.monotonic()
    if now - _last_clean.get(folder, -STALE_SECONDS) >= STALE_SECONDS:
        _last_clean[folder] = now
        clean_stale_tmp(folder)


@contextmanager
def atomic_write(path: Path, mode: str = "wb"):
    """Yield a file open on a temporary name beside ``path``; on success fsync it and rename it over ``path``.

    A crash or an exception inside the block never leaves a partial ``path`` (the old one, if any, stays).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _maybe_clean(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # marks the file as being written (see clean_stale_tmp)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
