"""Writing files so that a failure (a full disk, Ctrl-C, a crash) leaves nothing half-written.

* :func:`atomic_write` / :func:`atomic_path`: write into a temporary file beside the target, then
  rename it into place; the temporary file is removed on any failure.
* :func:`disk_guard`: turn "no space left on device" (ENOSPC, EDQUOT), wherever it is raised below
  (also wrapped by a library as another exception's cause), into a one-line :class:`DiskFull`
  (exit 2) naming the path, the free space and, where the caller knows it, the space needed.
* :func:`check_target`: a file or directory about to be written whose parent is a file (or not
  writable) is a one-line UsageError before any work starts.

Typical use (eval's outputs)::

    with disk_guard(out, "--out", needed=estimate):
        atomic_write(out / "eval.json", text)
        with atomic_path(out / "eval.png") as tmp:
            figure.savefig(tmp, format="png")
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from star_export.errors import DiskFull, UsageError

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def size_text(n: int) -> str:
    """Bytes as ``12.3 MiB`` (B, KiB, MiB, GiB, TiB)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem that holds ``path`` (or its nearest existing parent)."""
    probe = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path("."))
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def no_space_error(exc: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT ``OSError`` behind ``exc`` (itself, or its cause/context chain)."""
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def no_space_message(
    path: Path, flag: str = "", needed: int | None = None, exc: OSError | None = None
) -> str:
    """``--out star_out: no space left on device writing star_out/.stage/x (3.0 MiB free, up to
    12.0 MiB needed)``."""
    where = f"{flag} {path}" if flag else str(path)
    failed = getattr(exc, "filename", None)
    writing = f" writing {failed}" if failed and str(failed) != str(path) else ""
    free = free_bytes(Path(path))
    parts = [f"{size_text(free)} free" if free is not None else None]
    if needed:
        parts.append(f"up to {size_text(needed)} needed")
    detail = ", ".join(p for p in parts if p)
    return f"{where}: no space left on device{writing}{f' ({detail})' if detail else ''}"


@contextlib.contextmanager
def disk_guard(
    path: Path, flag: str = "", needed: int | Callable[[], int | None] | None = None
) -> Iterator[None]:
    """Raise :class:`DiskFull` (one line, exit 2) for a full disk anywhere in the block. ``needed``:
    the bytes the block writes (or a callable giving them, asked only on failure), for the message.
    The block is responsible for removing what it wrote (a staging directory, :func:`atomic_write`)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        cause = no_space_error(e)
        if cause is None:
            raise
        try:
            size = needed() if callable(needed) else needed
        except Exception:  # the estimate is a courtesy; never mask the real error with its own
            size = None
        raise DiskFull(no_space_message(Path(path), flag, size, cause)) from None


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block succeeds,
    removed when it fails (a library that takes a file name: ``savefig(tmp)``)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` by temporary file + rename: ``path`` holds the old
    content or the new one, never a part; nothing is left behind on failure."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def check_target(path: Path, flag: str) -> None:
    """``path`` can be written: no file stands where a parent directory must be, and the nearest
    existing parent is a writable directory. One-line UsageError otherwise (before any work)."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} {path}: {parent} is not writable")
            return
