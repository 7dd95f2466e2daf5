"""Atomic output: everything is written into a staging directory next to ``--out`` and moved in
only when the step succeeded, so a failure never leaves partial files in ``--out``."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from star_export.errors import UsageError


def check_out_dir(out: Path) -> None:
    """Fail early (UsageError) if ``out`` cannot become a writable directory."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: not writable")
    try:  # os.access trusts the mode bits; /proc, read-only mounts and the like only show on a write
        Path(tempfile.mkdtemp(prefix=".star_export-probe-", dir=probe)).rmdir()
    except OSError as e:
        raise UsageError(f"--out {out}: not writable ({e.strerror or type(e).__name__})") from None


@contextlib.contextmanager
def staged(out: Path, owned: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a staging directory; on success move its entries into ``out`` (each by rename).

    ``owned`` names (or glob patterns of) entries this step produces; those left in ``out`` by an
    earlier run but not produced now (say a report.json after ``--skip-validation``, or the
    prefill graph of a keep level the new export lacks) are removed, so ``out`` never mixes two runs.
    """
    check_out_dir(out)
    parent = out.parent if not out.exists() else out
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".star_export-", dir=parent))
    try:
        yield stage
        out.mkdir(parents=True, exist_ok=True)
        produced = {item.name for item in stage.iterdir()}
        for item in list(out.iterdir()):
            if item.name not in produced and any(fnmatch.fnmatchcase(item.name, pat) for pat in owned):
                _remove(item)
        for item in sorted(stage.iterdir()):
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename; the temp file removed on failure)."""
    from star_export.atomic import atomic_write

    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")
