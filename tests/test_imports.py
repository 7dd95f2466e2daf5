"""Every module imports without optional extras (TensorRT, tritonclient): heavy or optional
dependencies are imported lazily, where they are used."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import star_export


def test_every_module_imports():
    names = [m.name for m in pkgutil.iter_modules(star_export.__path__, "star_export.")]
    assert "star_export.star" in names and "star_export.engines" in names
    for name in names:
        if name == "star_export.__main__":
            continue
        importlib.import_module(name)


def test_build_module_does_not_import_tensorrt():
    code = "import sys, star_export.engines, star_export.cli; print('tensorrt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
