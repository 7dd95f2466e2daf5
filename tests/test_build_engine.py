"""star_export.build.engine against FAKES of the polygraphy entry points it calls
(``NetworkFromOnnxPath``, ``CreateConfig``, ``EngineFromNetwork``, ``SaveEngine``) and of the few
TensorRT names it reads.

TensorRT cannot be installed on the development machines, so these fakes are the only way to
check here what TensorRT would be asked for, per TensorRT version. They check ARGUMENTS only: no
engine is built, and nothing here says that a real build succeeds.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from star_export.build import BuildSettings, build_engine, precision_plan, status, strongly_typed_flag
from star_export.contract import DynamicDim, GraphContract, TensorSpec


def _contract(float_dtype: str) -> GraphContract:
    return GraphContract(
        graph="prefill",
        inputs=(
            TensorSpec("pixel_values", float_dtype, ("batch", 3, 8, 8)),
            TensorSpec("input_ids", "int64", ("batch", "text_len")),
        ),
        outputs=(TensorSpec("logits", float_dtype, ("batch", 10)),),
        dims=(DynamicDim("batch", 1, 2, 4), DynamicDim("text_len", 2, 4, 8)),
    )


class FakeEngine:
    """The ``ICudaEngine`` I/O queries build_engine makes."""

    def __init__(self, contract: GraphContract):
        self.names = [*contract.input_names, *contract.output_names]
        self.inputs = set(contract.input_names)

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> str:
        return "DataType.FLOAT"


class FakeTensorRT:
    """Records the calls; ``cache_accepted``: what ``IBuilderConfig.set_timing_cache`` returns."""

    def __init__(self, version: str, contract: GraphContract, cache_accepted: bool = True):
        self.trt = SimpleNamespace(
            __version__=version,
            NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),  # 11.x keeps it, deprecated
            MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
            TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        )
        self.contract, self.cache_accepted = contract, cache_accepted
        self.network_args: dict[str, Any] = {}
        self.config_args: dict[str, Any] = {}
        self.engine_args: dict[str, Any] = {}
        self.timing_probe: list[tuple[bytes, bool | None]] = []

    # --- polygraphy.backend.trt entry points (constructed, then called) ---------------------------
    def NetworkFromOnnxPath(self, path: str, **kwargs: Any):  # polygraphy's names
        self.network_args = {"path": path, **kwargs}
        builder = SimpleNamespace(create_builder_config=self._probe_config)
        return lambda: (builder, SimpleNamespace(num_layers=3), object())

    def CreateConfig(self, **kwargs: Any):
        self.config_args = kwargs
        return object()

    def EngineFromNetwork(self, network: Any, **kwargs: Any):
        self.engine_args = kwargs
        return lambda: FakeEngine(self.contract)

    def SaveEngine(self, engine: Any, path: str):
        return lambda: Path(path).write_bytes(b"not an engine: fake for an argument test\n")

    # --- IBuilderConfig, for the timing-cache probe -------------------------------------------------
    def _probe_config(self):
        probe = self

        class Config:
            def create_timing_cache(self, data: bytes) -> object:
                probe.timing_probe.append((data, None))  # ignore_mismatch: filled by the next call
                return object()

            def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
                probe.timing_probe[-1] = (probe.timing_probe[-1][0], ignore_mismatch)
                return probe.cache_accepted

        return Config()


@pytest.fixture
def fake_trt(monkeypatch):
    """Install a FakeTensorRT for one TensorRT version; returns it."""
    import polygraphy.backend.trt as poly_trt

    def install(version: str, contract: GraphContract, cache_accepted: bool = True) -> FakeTensorRT:
        fake = FakeTensorRT(version, contract, cache_accepted)
        monkeypatch.setattr(status, "trt_status", lambda: (True, f"TensorRT {version}, fake GPU"))
        monkeypatch.setattr(status, "import_tensorrt", lambda: fake.trt)
        for name in ("NetworkFromOnnxPath", "CreateConfig", "EngineFromNetwork", "SaveEngine"):
            monkeypatch.setattr(poly_trt, name, getattr(fake, name))
        return fake

    return install


def _build(tmp_path: Path, contract: GraphContract, settings: BuildSettings) -> tuple[dict, list[str]]:
    onnx_path = tmp_path / "prefill.onnx"
    onnx_path.write_bytes(b"stand-in: the fake parser never reads it")
    lines: list[str] = []
    entry = build_engine(onnx_path, tmp_path / "out.plan", contract, settings, log=lines.append)
    return entry, lines


# ------------------------------------------------------------------------------ STRONGLY_TYPED (7)


@pytest.mark.parametrize(
    "version, onnx_dtype, dtype, typed, flag, fp16",
    [
        ("10.15.1", "float16", "fp16", True, True, False),  # 10.x strong typing: the flag selects it
        ("10.8.0", "float32", "fp16", False, False, True),  # 10.x weak typing: FP16 builder flag
        ("10.15.1", "float32", "fp32", False, False, False),
        ("11.1.0", "float16", "fp16", True, False, False),  # 11.x: strongly typed, flag not passed
        ("11.5.0", "float32", "fp32", True, False, False),
    ],
)
def test_strongly_typed_is_passed_only_on_tensorrt_10(
    fake_trt, tmp_path, version, onnx_dtype, dtype, typed, flag, fp16
):
    contract = _contract(onnx_dtype)
    fake = fake_trt(version, contract)
    entry, _ = _build(tmp_path, contract, BuildSettings(dtype=dtype))
    assert fake.network_args == {"path": str(tmp_path / "prefill.onnx"), "strongly_typed": flag}
    assert fake.config_args["fp16"] is fp16 and fake.config_args["bf16"] is False
    assert fake.config_args["tf32"] is False
    assert entry["precision"]["strongly_typed"] is typed and entry["tensorrt"] == version
    assert (tmp_path / "out.plan").is_file()


def test_strongly_typed_flag():
    assert strongly_typed_flag(precision_plan("fp16", "10.15.1", "fp16"), "10.15.1") is True
    assert strongly_typed_flag(precision_plan("fp32", "10.15.1", "fp32", True), "10.15.1") is True
    assert strongly_typed_flag(precision_plan("fp16", "10.15.1", "fp32"), "10.15.1") is False
    for version in ("11.0", "11.1.0", "11.5.0"):
        plan = precision_plan("fp16", version, "fp16")
        assert plan.strongly_typed and strongly_typed_flag(plan, version) is False


# --------------------------------------------------------------------------- timing cache (5)


@pytest.mark.parametrize("accepted", [True, False])
def test_a_timing_cache_tensorrt_refuses_is_reported(fake_trt, tmp_path, accepted):
    contract = _contract("float32")
    fake = fake_trt("10.15.1", contract, cache_accepted=accepted)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"timings from another GPU")
    _, lines = _build(tmp_path, contract, BuildSettings(timing_cache=cache))
    assert fake.timing_probe == [(b"timings from another GPU", False)]  # the check polygraphy makes
    assert fake.config_args["load_timing_cache"] == str(cache)
    assert fake.engine_args["save_timing_cache"] == str(cache)
    warnings = [line for line in lines if "WARNING" in line]
    if accepted:
        assert warnings == []
    else:
        (line,) = warnings
        assert line.startswith("[build prefill] WARNING: timing cache") and str(cache) in line
        assert "another GPU model or by another TensorRT version" in line and "not used" in line


def test_no_timing_cache_file_no_probe(fake_trt, tmp_path):
    contract = _contract("float32")
    fake = fake_trt("11.1.0", contract, cache_accepted=False)
    _, lines = _build(tmp_path, contract, BuildSettings(timing_cache=tmp_path / "new.cache"))
    assert fake.timing_probe == [] and not [line for line in lines if "WARNING" in line]
    _, lines = _build(tmp_path, contract, BuildSettings())
    assert fake.timing_probe == [] and fake.engine_args["save_timing_cache"] is None


def test_unreadable_timing_cache_is_reported(tmp_path):
    from star_export.build import timing_cache_rejected

    def broken(data: bytes):
        raise RuntimeError("Deserialization failed\nmore")

    builder = SimpleNamespace(create_builder_config=lambda: SimpleNamespace(create_timing_cache=broken))
    path = tmp_path / "tc"
    path.write_bytes(b"x")
    assert (
        timing_cache_rejected(builder, path)
        == "TensorRT cannot read it (RuntimeError: Deserialization failed)"
    )


def test_every_build_and_deploy_module_imports_without_tensorrt():
    """tests/test_imports.py walks the top level only; the subpackages' modules too must not import
    tensorrt (nor need it) at import time."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys, star_export.build as b, star_export.deploy as d\n"
        "names = [m.name for p in (b, d) for m in pkgutil.iter_modules(p.__path__, p.__name__ + '.')]\n"
        "[importlib.import_module(n) for n in names]\n"
        "print(len(names), 'tensorrt' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, imported = out.stdout.split()
    assert int(count) >= 14 and imported == "False"
