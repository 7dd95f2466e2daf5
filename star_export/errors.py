"""Errors a user can cause (exit 2) or an environment can lack (exit 3).

The CLI turns these into one line on stderr and the exit code; anything else is a bug and
keeps its traceback.
"""


class UsageError(Exception):
    """Bad input from the user: flags, paths, prompts. Exit code 2."""

    exit_code = 2


class MissingComponent(Exception):
    """A dependency or device this step needs is absent (TensorRT, a CUDA GPU). Exit code 3."""

    exit_code = 3


class DiskFull(UsageError):
    """A write ran out of space (ENOSPC / EDQUOT): one line naming the path, exit code 2
    (``star_export.atomic.disk_guard`` raises it; nothing half-written is left behind)."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that staging directories are cleaned up. A BaseException,
    like KeyboardInterrupt: libraries that catch Exception (the ONNX exporter wraps what its tracing
    raises) let it through."""
