"""star_export.engines.engine against FAKES of the polygraphy entry points it calls
(``NetworkFromOnnxPath``, ``CreateConfig``, ``EngineBytesFromNetwork``, ``SaveBytes``) and of the few
TensorRT names it reads; ``EngineFromNetwork``, ``SaveEngine`` and ``EngineFromBytes`` are fakes that
fail the test if called (the build must never deserialize an engine).

TensorRT cannot be installed on the development machines, so these fakes are the only way to
check here what TensorRT would be asked for, per TensorRT version. They check ARGUMENTS only: no
engine is built, and nothing here says that a real build succeeds.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from star_export.contract import DynamicDim, GraphContract, TensorSpec
from star_export.engines import BuildSettings, build_engine, precision_plan, status, strongly_typed_flag


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


class FakeNetwork:
    """The ``INetworkDefinition`` queries build_engine makes (layers, marked inputs and outputs)."""

    num_layers = 3

    def __init__(self, contract: GraphContract, drop_output: bool = False):
        self.inputs = [SimpleNamespace(name=n, dtype="DataType.FLOAT") for n in contract.input_names]
        outputs = contract.output_names[:-1] if drop_output else contract.output_names
        self.outputs = [SimpleNamespace(name=n, dtype="DataType.HALF") for n in outputs]
        self.num_inputs, self.num_outputs = len(self.inputs), len(self.outputs)

    def get_input(self, i: int) -> Any:
        return self.inputs[i]

    def get_output(self, i: int) -> Any:
        return self.outputs[i]


PLAN = b"not an engine: the bytes a fake EngineBytesFromNetwork returns\n"
THIS_DEVICE = b"timings of this device"  # a cache the fake TensorRT accepts; any other content is refused


def _deserializes(*args: Any, **kwargs: Any):
    raise AssertionError(
        "the build deserialized an engine (EngineFromNetwork / SaveEngine / EngineFromBytes)"
    )


class FakeTensorRT:
    """Records the calls; ``cache_accepted``: what ``IBuilderConfig.set_timing_cache`` returns (None:
    accept exactly the caches whose bytes are :data:`THIS_DEVICE`)."""

    def __init__(
        self, version: str, contract: GraphContract, cache_accepted: bool | None = True, drop_output=False
    ):
        self.trt = SimpleNamespace(
            __version__=version,
            NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),  # 11.x keeps it, deprecated
            MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
            HardwareCompatibilityLevel=SimpleNamespace(NONE="HW.NONE", AMPERE_PLUS="HW.AMPERE_PLUS"),
        )
        self.contract, self.cache_accepted, self.drop_output = contract, cache_accepted, drop_output
        self.network_args: dict[str, Any] = {}
        self.config_args: dict[str, Any] = {}
        self.engine_args: dict[str, Any] = {}
        self.saved: list[tuple[bytes, str]] = []
        self.timing_probe: list[tuple[bytes, bool | None]] = []

    # --- polygraphy entry points (constructed, then called) -----------------------------------------
    def NetworkFromOnnxPath(self, path: str, **kwargs: Any):  # polygraphy's names
        self.network_args = {"path": path, **kwargs}
        builder = SimpleNamespace(create_builder_config=self._probe_config)
        return lambda: (builder, FakeNetwork(self.contract, self.drop_output), object())

    def CreateConfig(self, **kwargs: Any):
        self.config_args = kwargs
        return object()

    def EngineBytesFromNetwork(self, network: Any, **kwargs: Any):
        self.engine_args = kwargs

        def build() -> bytes:
            cache = kwargs.get("save_timing_cache")
            if cache:  # what polygraphy does after a build: (combine and) write the cache file
                Path(cache).write_bytes(THIS_DEVICE)
            return PLAN

        return build

    def SaveBytes(self, data: Any, path: str):
        def save() -> bytes:
            self.saved.append((data, path))
            Path(path).write_bytes(data)
            return data

        return save

    # --- IBuilderConfig, for the timing-cache probe -------------------------------------------------
    def _probe_config(self):
        probe = self

        class Config:
            def create_timing_cache(self, data: bytes) -> object:
                probe.timing_probe.append((data, None))  # ignore_mismatch: filled by the next call
                return object()

            def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
                data = probe.timing_probe[-1][0]
                probe.timing_probe[-1] = (data, ignore_mismatch)
                return data == THIS_DEVICE if probe.cache_accepted is None else probe.cache_accepted

        return Config()


@pytest.fixture
def fake_trt(monkeypatch):
    """Install a FakeTensorRT for one TensorRT version; returns it."""
    import polygraphy.backend.common as poly_common
    import polygraphy.backend.trt as poly_trt

    def install(
        version: str, contract: GraphContract, cache_accepted: bool | None = True, drop_output=False
    ) -> FakeTensorRT:
        fake = FakeTensorRT(version, contract, cache_accepted, drop_output)
        monkeypatch.setattr(status, "trt_status", lambda: (True, f"TensorRT {version}, fake GPU"))
        monkeypatch.setattr(status, "import_tensorrt", lambda: fake.trt)
        for name in ("NetworkFromOnnxPath", "CreateConfig", "EngineBytesFromNetwork"):
            monkeypatch.setattr(poly_trt, name, getattr(fake, name))
        monkeypatch.setattr(poly_common, "SaveBytes", fake.SaveBytes)
        for name in ("EngineFromNetwork", "SaveEngine", "EngineFromBytes", "EngineFromPath"):
            monkeypatch.setattr(poly_trt, name, _deserializes)
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


def test_engine_bytes_are_built_and_saved_never_deserialized(fake_trt, tmp_path):
    """EngineBytesFromNetwork's plan goes straight to SaveBytes (a temp file renamed into place);
    EngineFromNetwork / SaveEngine / EngineFromBytes fail the test if called. The I/O recorded
    comes from the parsed network."""
    contract = _contract("float32")
    fake = fake_trt("10.15.1", contract)
    entry, lines = _build(tmp_path, contract, BuildSettings())
    assert fake.engine_args == {"config": fake.engine_args["config"], "save_timing_cache": None}
    [(data, path)] = fake.saved
    assert data == PLAN and Path(path).name.startswith(".out.plan.") and path.endswith(".tmp")
    assert (tmp_path / "out.plan").read_bytes() == PLAN and not Path(path).exists()
    assert entry["bytes"] == len(PLAN) and entry["timing_cache"] is None
    assert [x["name"] for x in entry["io"]] == [*contract.input_names, *contract.output_names]
    assert entry["io"][0] == {"name": "pixel_values", "mode": "input", "dtype": "FLOAT"}
    assert entry["io"][-1] == {"name": "logits", "mode": "output", "dtype": "HALF"}
    assert not [line for line in lines if "timing cache" in line]


def test_network_io_unlike_the_contract_stops_before_the_build(fake_trt, tmp_path):
    contract = _contract("float32")
    fake = fake_trt("10.15.1", contract, drop_output=True)
    with pytest.raises(RuntimeError, match=r"missing \['logits'\], extra \[\]; no engine built"):
        _build(tmp_path, contract, BuildSettings())
    assert fake.engine_args == {} and fake.saved == [] and not (tmp_path / "out.plan").exists()


@pytest.mark.parametrize("accepted", [True, False])
def test_a_timing_cache_tensorrt_refuses_is_left_alone(fake_trt, tmp_path, accepted):
    """An accepted cache is loaded and written back; a refused one (another GPU/TensorRT) is never
    given to polygraphy (which would merge it with ignore_mismatch=True and rewrite it): it is left
    byte for byte, a fresh cache is started beside it, and the log and the entry name that file."""
    contract = _contract("float32")
    fake = fake_trt("10.15.1", contract, cache_accepted=accepted)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"timings from another GPU")
    entry, lines = _build(tmp_path, contract, BuildSettings(timing_cache=cache))
    fresh = tmp_path / "timing.1.cache"
    used = cache if accepted else fresh
    assert fake.timing_probe[0] == (b"timings from another GPU", False)  # the check polygraphy makes
    assert fake.config_args["load_timing_cache"] == str(used)
    assert fake.engine_args["save_timing_cache"] == str(used)
    assert entry["timing_cache"] == str(used)
    assert f"[build prefill] timing cache written: {used} ({len(THIS_DEVICE)} bytes)" in lines
    warnings = [line for line in lines if "WARNING" in line]
    if accepted:
        assert warnings == [] and entry["timing_cache_rejected"] == {} and not fresh.exists()
    else:
        assert cache.read_bytes() == b"timings from another GPU"  # not merged, not rewritten
        (line,) = warnings
        assert line.startswith(f"[build prefill] WARNING: timing cache {cache} is not used")
        assert "another GPU model or by another TensorRT version" in line and "left as it is" in line
        assert f"[build prefill] starting a fresh timing cache beside it: {fresh}" in lines
        assert entry["timing_cache_rejected"] == {
            str(cache): "it was written on another GPU model or by another TensorRT version"
        }


def test_the_cache_this_device_wrote_beside_a_refused_one_is_reused(fake_trt, tmp_path):
    """A directory built on two GPU models: each build finds its own cache among timing.N.cache."""
    contract = _contract("float32")
    fake = fake_trt("10.15.1", contract, cache_accepted=None)  # accepts THIS_DEVICE bytes only
    (tmp_path / "timing.cache").write_bytes(b"timings from another GPU")
    (tmp_path / "timing.1.cache").write_bytes(b"timings from a third GPU")
    (tmp_path / "timing.2.cache").write_bytes(THIS_DEVICE)
    entry, lines = _build(tmp_path, contract, BuildSettings(timing_cache=tmp_path / "timing.cache"))
    assert entry["timing_cache"] == str(tmp_path / "timing.2.cache")
    assert sorted(entry["timing_cache_rejected"]) == [
        str(tmp_path / n) for n in ("timing.1.cache", "timing.cache")
    ]
    assert f"[build prefill] reusing {tmp_path / 'timing.2.cache'}" in lines
    assert [p.name for p in sorted(tmp_path.glob("timing*"))] == [
        "timing.1.cache",
        "timing.2.cache",
        "timing.cache",
    ]
    assert fake.config_args["load_timing_cache"] == str(tmp_path / "timing.2.cache")


def test_timing_cache_candidates_and_all_refused(tmp_path):
    from star_export.engines.engine import MAX_TIMING_CACHES, choose_timing_cache, timing_cache_candidates
    from star_export.errors import UsageError

    names = [p.name for p in timing_cache_candidates(tmp_path / "timing.cache")[:3]]
    assert names == ["timing.cache", "timing.1.cache", "timing.2.cache"]
    assert timing_cache_candidates(Path("tc"))[1] == Path("tc.1")
    refuse = SimpleNamespace(
        create_builder_config=lambda: SimpleNamespace(
            create_timing_cache=lambda data: object(), set_timing_cache=lambda c, ignore_mismatch: False
        )
    )
    assert choose_timing_cache(refuse, None) == (None, {})
    for p in timing_cache_candidates(tmp_path / "timing.cache"):
        p.write_bytes(b"foreign")
    with pytest.raises(UsageError, match=f"the {MAX_TIMING_CACHES - 1} files beside it"):
        choose_timing_cache(refuse, tmp_path / "timing.cache")


def test_no_timing_cache_file_no_probe(fake_trt, tmp_path):
    contract = _contract("float32")
    fake = fake_trt("11.1.0", contract, cache_accepted=False)
    entry, lines = _build(tmp_path, contract, BuildSettings(timing_cache=tmp_path / "new.cache"))
    assert fake.timing_probe == [] and not [line for line in lines if "WARNING" in line]
    assert entry["timing_cache"] == str(tmp_path / "new.cache") and (tmp_path / "new.cache").is_file()
    _, lines = _build(tmp_path, contract, BuildSettings())
    assert fake.timing_probe == [] and fake.engine_args["save_timing_cache"] is None


# ----------------------------------------------------------------- version / hardware compatibility


@pytest.mark.parametrize("version_compatible, level", [(False, None), (True, "ampere-plus"), (True, None)])
def test_compatibility_settings_reach_create_config(fake_trt, tmp_path, version_compatible, level):
    contract = _contract("float32")
    fake = fake_trt("10.15.1", contract)
    settings = BuildSettings(version_compatible=version_compatible, hardware_compatibility_level=level)
    entry, _ = _build(tmp_path, contract, settings)
    assert fake.config_args["version_compatible"] is version_compatible
    assert fake.config_args["hardware_compatibility_level"] == ("HW.AMPERE_PLUS" if level else None)
    assert (
        entry["version_compatible"] is version_compatible and entry["hardware_compatibility_level"] == level
    )


def test_a_hardware_level_this_tensorrt_lacks_is_a_usage_error(fake_trt, tmp_path):
    from star_export.errors import UsageError

    contract = _contract("float32")
    fake = fake_trt("10.15.1", contract)
    with pytest.raises(
        UsageError, match=r"TensorRT 10\.15\.1 has no HardwareCompatibilityLevel\.SAME_COMPUTE"
    ):
        _build(tmp_path, contract, BuildSettings(hardware_compatibility_level="same-compute-capability"))
    assert fake.engine_args == {} and not (tmp_path / "out.plan").exists()
    with pytest.raises(UsageError, match="must be one of none, ampere-plus, same-compute-capability"):
        BuildSettings(hardware_compatibility_level="turing")


def test_unreadable_timing_cache_is_reported(tmp_path):
    from star_export.engines import timing_cache_rejected

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
        "import importlib, pkgutil, sys, star_export.engines as b, star_export.deploy as d\n"
        "names = [m.name for p in (b, d) for m in pkgutil.iter_modules(p.__path__, p.__name__ + '.')]\n"
        "[importlib.import_module(n) for n in names]\n"
        "print(len(names), 'tensorrt' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, imported = out.stdout.split()
    assert int(count) >= 14 and imported == "False"
