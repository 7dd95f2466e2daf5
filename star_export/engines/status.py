"""Where an engine can be built: the installed TensorRT's version and a visible CUDA GPU.

TensorRT is imported here lazily (``importlib`` at call time, never at module import), so every
module of :mod:`star_export.engines` and ``--help`` work on machines without TensorRT or a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

MIN_TENSORRT_MAJOR = 10


def major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "10.15.1.29"; missing parts are 0."""
    parts = [p for p in version.split(".") if p.isdigit()]
    major = int(parts[0]) if parts else 0
    minor = int(parts[1]) if len(parts) > 1 else 0
    return major, minor


def first_line(e: BaseException) -> str:
    """``TypeName: first line of the message``, for one-line reports."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, imported now (never at module import time)."""
    return importlib.import_module("tensorrt")


def tensorrt_version() -> str | None:
    """The importable TensorRT's version, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        return str(import_tensorrt().__version__)
    except Exception:
        return None


def _cuda_device(trt: Any) -> str | None:
    """Name of a visible CUDA GPU: through torch if it has CUDA, else by creating a TensorRT
    builder (which needs a CUDA device; a CPU-only torch on a GPU host is not a reason to fail)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        if builder is not None:
            return "CUDA device (found by TensorRT)"
    except Exception:
        pass
    return None


def trt_status() -> tuple[bool, str]:
    """(True, "TensorRT x.y, GPU name") where an engine can be built here, else (False, why)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "TensorRT is not installed (no Python module 'tensorrt')"
    try:
        trt = import_tensorrt()
    except Exception as e:  # e.g. the PyPI stub wheels without their libraries
        return False, f"TensorRT does not import ({first_line(e)})"
    version = str(getattr(trt, "__version__", "0"))
    if major_minor(version)[0] < MIN_TENSORRT_MAJOR:
        return False, f"TensorRT {version} is older than {MIN_TENSORRT_MAJOR}.0, which this build needs"
    gpu = _cuda_device(trt)
    if gpu is None:
        return False, f"TensorRT {version} is installed but no CUDA GPU is visible"
    return True, f"TensorRT {version}, {gpu}"


def check_target(trt_version: str | None) -> str:
    """Readiness-check target for the installed TensorRT (the 10.0 table for 10.0..10.14)."""
    if trt_version is None:
        return "10"
    major, minor = major_minor(trt_version)
    if major >= 11:
        return "11"
    return "10" if minor >= 15 else "10.0"
