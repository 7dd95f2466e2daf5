"""Stage 4 of the data's way: ``prefill.onnx`` (+ ``decode.onnx``) -> TensorRT engines (``.plan``).

Thin use of polygraphy's TensorRT loaders, which keep the code portable across TensorRT 10.x
and 11.x (polygraphy ``backend/trt/loader.py`` and ``config.py``, 0.53)::

    network = NetworkFromOnnxPath(onnx, strongly_typed=...)           # parse_from_file: external data ok
    config  = CreateConfig(profiles=[Profile...], fp16=..., bf16=...,   # fp16/bf16 only on TensorRT 10
                           load_timing_cache=..., memory_pool_limits={WORKSPACE: bytes},
                           builder_optimization_level=...)
    engine  = EngineFromNetwork(network, config, save_timing_cache=...) # merges + rewrites the cache file
    SaveEngine(engine, tmp)  ->  os.replace(tmp, engine_path)            # atomic

TensorRT is imported lazily (inside the functions that need it; polygraphy's loaders import it
through ``mod.lazy_import`` on first call), so this module, its pure helpers (profiles, precision
decisions, manifest I/O) and ``--help`` work on machines without TensorRT or a GPU. Where either
is missing, :func:`build_engine` / :func:`run_build` raise :class:`MissingComponent` (exit 3) with
the exact command that finishes the build on a GPU host.

Precision, TensorRT 10.x vs 11.x (what was read, and how :func:`precision_plan` follows it):

- TensorRT 11 removed every weak-typing API: ``BuilderFlag.FP16`` / ``BF16`` (replacement:
  "strong typing with ModelOpt AutoCast"), ``OBEY_/PREFER_PRECISION_CONSTRAINTS`` ("strong typing,
  always enforced"), ``DIRECT_IO``, INT8 calibrators. Every network is strongly typed; the
  ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` flag is kept for compatibility and ignored.
  Sources: "Migrating from TensorRT 10.x to 11.x" (Strongly Typed Networks Are Now Required),
  "Removed Python APIs and Replacements" (docs.nvidia.com/deeplearning/tensorrt/latest/api/
  migration/tensorrt-10x-to-11x-python-api-reference.html), "Precision Control" 11.0 ("Since
  11.0, TensorRT supports only Strongly Typed networks").
  => On 11.x the engine's precision IS the ONNX's: ``--dtype fp16`` needs an ONNX exported in
  float16 (softmax / normalisation kept in float32 inside the graph where fp16 would overflow);
  asking for another dtype than the ONNX carries is a usage error, never a silent fp32 engine.
- TensorRT 10.x has both: a strongly typed network (``STRONGLY_TYPED`` creation flag: tensor
  types follow the ONNX and type inference; layer precisions and precision builder flags are
  not used), or weak typing where ``BuilderFlag.FP16`` / ``BF16`` let the builder pick
  reduced-precision kernels for an fp32 ONNX (weak typing is deprecated since 10.12). Sources:
  TensorRT Python API ``NetworkDefinitionCreationFlag`` / ``Builder`` pages, "Precision Control"
  10.16, onnxruntime's TensorRT EP (sets STRONGLY_TYPED only when no fp16/int8 flag is set).
  => On 10.x: strongly typed when the ONNX already carries the requested dtype, else the
  precision flag on an fp32 ONNX. Caveat of the flag route: TensorRT may run STAR's score
  softmax/TopK inputs in fp16, so near-tied scores can pick other tokens; the parity report
  shows it (index outputs are compared exactly). The strongly typed route keeps the scores in
  whatever type the exported graph gives them.
- TF32 stays off (polygraphy's ``CreateConfig(tf32=False)`` clears ``BuilderFlag.TF32``), so fp32
  engines meet the fp32 parity tolerance.

Timing cache (TensorRT "Optimizing Builder Performance", ``ITimingCache``): layer timings are
specific to the device, CUDA and TensorRT versions and to flags such as TF32; polygraphy loads
the file with ``create_timing_cache`` + ``set_timing_cache(cache, ignore_mismatch=False)`` and,
after the build, combines the old file into the new cache (``combine(..., ignore_mismatch=True)``)
under a file lock and rewrites it, so one ``--timing-cache`` file is safely reused across builds.

Optimization profiles (``IOptimizationProfile``): min/opt/max for every dynamic input; kernels
are chosen for ``opt`` and valid across [min, max]; inputs outside the range fail at run time.
They come from the contract's ``DynamicDim`` ranges (the recipe) with CLI overrides, one profile
per engine; derived dims (``past_len + 65``) are evaluated per corner, so all inputs of one
profile agree with each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from star_export.contract import GraphContract, TensorSpec, contract_from_dict
from star_export.errors import MissingComponent, UsageError
from star_export.manifest import read_manifest

DTYPES = ("fp32", "fp16", "bf16")
# contract / manifest element-type names (numpy style) <-> --dtype names
DTYPE_OF_ELEMENT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
ELEMENT_OF_DTYPE = {v: k for k, v in DTYPE_OF_ELEMENT.items()}
MIN_TENSORRT_MAJOR = 10

# Parity of a TensorRT engine against onnxruntime on the same ONNX, per engine precision:
# max|trt - ort| <= tol * max|ort| per output tensor. fp32: TF32 is off, only kernel order
# differs (same bound as onnxruntime vs torch). fp16: unit roundoff 2^-11 ~ 4.9e-4, accumulated
# over the decoder layers -> 1e-2. bf16: unit roundoff 2^-8 ~ 3.9e-3 -> 3e-2. Index outputs exact.
TRT_TOLERANCES: Mapping[str, float] = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}
INDEX_OUTPUTS = ("stage1_keep_idx", "stage2_keep_idx")

# Smallest legal size per dim name: a prompt holds the image placeholder plus at least one token
# after it (STAR_SPEC.md, Inputs). Other dims: 1.
MIN_DIM_SIZE: Mapping[str, int] = {"text_len": 2}

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)
ProfileShapes = dict[str, ShapeRange]  # input name -> (min, opt, max)
DimRange = tuple[int, int, int]

# CLI flags per dynamic dim (min, opt, max); argparse dests are the same with "_" for "-".
DIM_FLAGS: Mapping[str, tuple[str, str, str]] = {
    "batch": ("--min-batch", "--opt-batch", "--max-batch"),
    "text_len": ("--min-text-len", "--opt-text-len", "--max-text-len"),
}


# ------------------------------------------------------------------------------------------ status


def _major_minor(version: str) -> tuple[int, int]:
    parts = [p for p in version.split(".") if p.isdigit()]
    major = int(parts[0]) if parts else 0
    minor = int(parts[1]) if len(parts) > 1 else 0
    return major, minor


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _import_tensorrt() -> Any:
    return importlib.import_module("tensorrt")


def tensorrt_version() -> str | None:
    """The importable TensorRT's version, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        return str(_import_tensorrt().__version__)
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
        trt = _import_tensorrt()
    except Exception as e:  # e.g. the PyPI stub wheels without their libraries
        return False, f"TensorRT does not import ({_first_line(e)})"
    version = str(getattr(trt, "__version__", "0"))
    if _major_minor(version)[0] < MIN_TENSORRT_MAJOR:
        return False, f"TensorRT {version} is older than {MIN_TENSORRT_MAJOR}.0, which this build needs"
    gpu = _cuda_device(trt)
    if gpu is None:
        return False, f"TensorRT {version} is installed but no CUDA GPU is visible"
    return True, f"TensorRT {version}, {gpu}"


# ---------------------------------------------------------------------------------------- contract


def contract_dtype(contract: GraphContract) -> str:
    """The float type the graph was exported in ("fp32"/"fp16"/"bf16"): its first float input."""
    for t in contract.inputs:
        if t.dtype in DTYPE_OF_ELEMENT:
            return DTYPE_OF_ELEMENT[t.dtype]
    return "fp32"


# ---------------------------------------------------------------------------------------- profiles


def _dim_ranges(
    contract: GraphContract, overrides: Mapping[str, Sequence[int]] | None
) -> dict[str, DimRange]:
    ranges: dict[str, DimRange] = {d.name: (d.min, d.opt, d.max) for d in contract.dims}
    for name, value in (overrides or {}).items():
        if name not in ranges:
            raise UsageError(
                f"the {contract.graph} graph has no dynamic dim {name!r} (it has: {', '.join(ranges)})"
            )
        if len(value) != 3:
            raise UsageError(f"{name}: expected (min, opt, max), got {tuple(value)}")
        ranges[name] = (int(value[0]), int(value[1]), int(value[2]))
    for name, (lo, opt, hi) in ranges.items():
        floor = MIN_DIM_SIZE.get(name, 1)
        if not floor <= lo <= opt <= hi:
            raise UsageError(
                f"{contract.graph} profile, {name}: need {floor} <= min <= opt <= max, got "
                f"min={lo} opt={opt} max={hi}"
            )
    return ranges


def _shape_ranges(specs: Iterable[TensorSpec], ranges: Mapping[str, DimRange]) -> dict[str, ShapeRange]:
    out: dict[str, ShapeRange] = {}
    for spec in specs:
        corners = tuple(spec.concrete({n: r[i] for n, r in ranges.items()}) for i in range(3))
        lo, opt, hi = corners
        for axis, (a, b, c) in enumerate(zip(lo, opt, hi, strict=True)):
            if not 1 <= a <= b <= c:
                raise UsageError(
                    f"{spec.name} axis {axis} ({spec.shape[axis]}): min/opt/max {a}/{b}/{c} "
                    "is not a valid range"
                )
        out[spec.name] = (lo, opt, hi)
    return out


def profile_shapes(
    contract: GraphContract, overrides: Mapping[str, Sequence[int]] | None = None
) -> ProfileShapes:
    """{input name: (min shape, opt shape, max shape)} for every input of ``contract``.

    Ranges come from the contract's dynamic dims; ``overrides`` ({"batch": (1, 4, 16)}) replace a
    dim's (min, opt, max). Each corner evaluates every symbol and expression (``past_len + 65``)
    at that corner, so the shapes of one profile are mutually consistent. A range with
    min > opt, opt > max, or below the dim's floor (text_len >= 2) is a ``UsageError``.
    """
    return _shape_ranges(contract.inputs, _dim_ranges(contract, overrides))


def output_shapes(
    contract: GraphContract, overrides: Mapping[str, Sequence[int]] | None = None
) -> dict[str, ShapeRange]:
    """Output shapes at the profile's corners (what a C++ user allocates for ``max``)."""
    return _shape_ranges(contract.outputs, _dim_ranges(contract, overrides))


def check_profile(contract: GraphContract, shapes: Mapping[str, Sequence[Sequence[int]]]) -> None:
    """A profile (e.g. from a caller) must cover exactly the contract's inputs with valid ranges."""
    names = set(contract.input_names)
    if set(shapes) != names:
        missing, extra = sorted(names - set(shapes)), sorted(set(shapes) - names)
        raise UsageError(f"{contract.graph} profile: missing inputs {missing}, unknown inputs {extra}")
    for spec in contract.inputs:
        lo, opt, hi = (tuple(s) for s in shapes[spec.name])
        if not len(lo) == len(opt) == len(hi) == len(spec.shape):
            raise UsageError(f"{spec.name}: profile shapes must have rank {len(spec.shape)}")
        for axis, (a, b, c) in enumerate(zip(lo, opt, hi, strict=True)):
            if not 1 <= a <= b <= c:
                raise UsageError(f"{spec.name} axis {axis}: min/opt/max {a}/{b}/{c} is not a valid range")
            fixed = spec.shape[axis]
            if isinstance(fixed, int) and not a == b == c == fixed:
                raise UsageError(f"{spec.name} axis {axis} is static ({fixed}), profile says {a}/{b}/{c}")


def to_polygraphy_profiles(profiles: Sequence[Mapping[str, ShapeRange]]) -> list[Any]:
    """polygraphy ``Profile`` objects (no TensorRT needed until ``Profile.to_trt``)."""
    from polygraphy.backend.trt import Profile

    out = []
    for shapes in profiles:
        p = Profile()
        for name, (lo, opt, hi) in shapes.items():
            p.add(name, min=tuple(lo), opt=tuple(opt), max=tuple(hi))
        out.append(p)
    return out


def _profile_json(shapes: Mapping[str, ShapeRange]) -> dict[str, dict[str, list[int]]]:
    return {n: {"min": list(lo), "opt": list(opt), "max": list(hi)} for n, (lo, opt, hi) in shapes.items()}


# --------------------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class PrecisionPlan:
    """How one engine gets its precision: the network mode and the builder flags to set."""

    strongly_typed: bool
    fp16_flag: bool = False
    bf16_flag: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def precision_plan(
    dtype: str, trt_version: str, onnx_dtype: str, strongly_typed: bool | None = None
) -> PrecisionPlan:
    """Decide strong typing and precision flags for ``dtype`` on TensorRT ``trt_version`` with an
    ONNX graph whose float tensors are ``onnx_dtype`` (see the module docstring for sources).

    ``strongly_typed=None`` is automatic: True on TensorRT >= 11 (no other mode exists), and on
    10.x when ``dtype`` is reduced precision and the ONNX already carries it.
    """
    for name, value in (("--dtype", dtype), ("ONNX dtype", onnx_dtype)):
        if value not in DTYPES:
            raise UsageError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")
    major, _ = _major_minor(trt_version)
    if major < MIN_TENSORRT_MAJOR:
        raise MissingComponent(
            f"TensorRT {trt_version} is older than {MIN_TENSORRT_MAJOR}.0, which this build needs"
        )
    reexport = (
        f"export the graph in {ELEMENT_OF_DTYPE[dtype]} (softmax/normalisation kept in float32) "
        f"or build with --dtype {onnx_dtype}"
    )
    if major >= 11:
        if strongly_typed is False:
            raise UsageError(
                f"TensorRT {trt_version} builds strongly typed networks only (weak typing was removed in 11.0)"
            )
        if dtype != onnx_dtype:
            raise UsageError(
                f"--dtype {dtype} on TensorRT {trt_version}: 11.x removed the FP16/BF16 builder flags, a "
                f"strongly typed engine computes in the ONNX's types, and this ONNX is {onnx_dtype}: {reexport}"
            )
        return PrecisionPlan(
            True, note=f"strongly typed (TensorRT {major}.x): precision from the ONNX ({onnx_dtype})"
        )
    typed = strongly_typed if strongly_typed is not None else (dtype != "fp32" and onnx_dtype == dtype)
    if typed:
        if dtype != onnx_dtype:
            raise UsageError(
                f"--dtype {dtype} with a strongly typed network: the engine would compute in the ONNX's "
                f"{onnx_dtype}; {reexport}, or drop --strongly-typed to use the {dtype.upper()} builder flag"
            )
        return PrecisionPlan(
            True, note=f"strongly typed (TensorRT {major}.x): precision from the ONNX ({onnx_dtype})"
        )
    if onnx_dtype not in ("fp32", dtype):
        raise UsageError(f"--dtype {dtype}: the ONNX is {onnx_dtype}; build with --dtype {onnx_dtype}")
    if dtype == "fp32":
        return PrecisionPlan(False, note="fp32, TF32 off")
    return PrecisionPlan(
        False,
        fp16_flag=dtype == "fp16",
        bf16_flag=dtype == "bf16",
        note=f"weakly typed {onnx_dtype} ONNX with BuilderFlag.{dtype.upper()} (TensorRT 10.x only; "
        "deprecated since 10.12)",
    )


# ---------------------------------------------------------------------------------------- settings


@dataclass
class BuildSettings:
    """What a build is asked for. ``profiles``: one dict per optimization profile (input name ->
    (min, opt, max) shapes); empty means one profile from the contract's ranges.
    ``profile_flags``: the CLI flags that shaped the profiles, repeated in the finish command."""

    dtype: str = "fp32"
    timing_cache: Path | None = None
    workspace_bytes: int | None = None
    profiles: list[ProfileShapes] = field(default_factory=list)
    strongly_typed: bool | None = None
    builder_optimization_level: int | None = None
    profile_flags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise UsageError(f"--workspace must be positive, got {self.workspace_bytes} bytes")
        if self.builder_optimization_level is not None and not 0 <= self.builder_optimization_level <= 5:
            raise UsageError(
                f"--builder-optimization-level must be in 0..5, got {self.builder_optimization_level}"
            )
        if self.timing_cache is not None:
            self.timing_cache = Path(self.timing_cache)

    def plan(self, trt_version: str, onnx_dtype: str) -> PrecisionPlan:
        return precision_plan(self.dtype, trt_version, onnx_dtype, self.strongly_typed)

    def settings_summary(self) -> dict[str, Any]:
        """JSON-ready description for the manifest."""
        return {
            "dtype": self.dtype,
            "strongly_typed": "auto" if self.strongly_typed is None else self.strongly_typed,
            "timing_cache": str(self.timing_cache) if self.timing_cache else None,
            "workspace_bytes": self.workspace_bytes,
            "builder_optimization_level": self.builder_optimization_level,
            "tf32": False,
            "profiles": [_profile_json(p) for p in self.profiles],
        }


def finish_command(out_dir: Path, engine: Path, settings: BuildSettings) -> str:
    """The command that builds the engines from ``out_dir`` on a host with TensorRT and a GPU."""
    parts = ["python", "-m", "star_export", "build", "--from", str(out_dir), "--engine", str(engine)]
    parts += ["--dtype", settings.dtype]
    if settings.timing_cache is not None:
        parts += ["--timing-cache", str(settings.timing_cache)]
    if settings.workspace_bytes is not None:
        parts += ["--workspace", str(-(-settings.workspace_bytes // (1 << 20)))]
    if settings.builder_optimization_level is not None:
        parts += ["--builder-optimization-level", str(settings.builder_optimization_level)]
    if settings.strongly_typed is not None:
        parts.append("--strongly-typed" if settings.strongly_typed else "--no-strongly-typed")
    parts += list(settings.profile_flags)
    return shlex.join(parts)


def engine_paths(engine: Path) -> tuple[Path, Path]:
    """(prefill engine, decode engine): ``out.plan`` -> (``out.plan``, ``out.decode.plan``)."""
    engine = Path(engine)
    if engine.suffix:
        return engine, engine.with_name(f"{engine.stem}.decode{engine.suffix}")
    return engine, engine.with_name(f"{engine.name}.decode")


# ------------------------------------------------------------------------------------------ build


class _Progress:
    """Prints ``[build prefill] stage ... done (1.2s)`` lines."""

    def __init__(self, tag: str, log: Callable[[str], None]):
        self.tag, self.log, self.t0 = tag, log, time.perf_counter()

    def stage(self, text: str) -> float:
        self.log(f"[build {self.tag}] {text} ...")
        return time.perf_counter()

    def done(self, start: float, extra: str = "") -> None:
        self.log(
            f"[build {self.tag}]   done ({time.perf_counter() - start:.1f}s{', ' + extra if extra else ''})"
        )


def _engine_io(engine: Any, trt: Any) -> list[dict[str, str]]:
    """Name, direction and dtype of each I/O tensor (``ICudaEngine.num_io_tensors``, TensorRT >= 8.5)."""
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        io.append(
            {
                "name": name,
                "mode": "input" if mode == trt.TensorIOMode.INPUT else "output",
                "dtype": str(engine.get_tensor_dtype(name)).split(".")[-1],
            }
        )
    return io


def polygraphy_loaders(
    onnx_path: Path,
    settings: BuildSettings,
    plan: PrecisionPlan,
    profiles: Sequence[Mapping[str, ShapeRange]],
    *,
    typed_flag: bool,
    workspace_pool: Any = None,
) -> tuple[Any, Any]:
    """The configured (not yet called) polygraphy loaders: ``NetworkFromOnnxPath`` and
    ``CreateConfig``. Constructing them needs no TensorRT; calling them does.

    ``typed_flag``: set ``STRONGLY_TYPED`` at network creation (TensorRT 10.x strong typing; on 11.x
    passed only while the flag still exists, where it is ignored). ``workspace_pool``: the
    ``trt.MemoryPoolType.WORKSPACE`` key for ``memory_pool_limits`` (given by the caller, which has
    TensorRT imported). The FP16/BF16 builder flags are set only where ``plan`` says so (TensorRT 10
    weak typing); TF32 is cleared.
    """
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath
    from polygraphy.logger import G_LOGGER

    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=typed_flag)
    limits = None
    if settings.workspace_bytes:
        if workspace_pool is None:
            raise ValueError("workspace_bytes needs the trt.MemoryPoolType.WORKSPACE key")
        limits = {workspace_pool: settings.workspace_bytes}
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        config = CreateConfig(
            profiles=to_polygraphy_profiles(profiles),
            fp16=plan.fp16_flag,
            bf16=plan.bf16_flag,
            tf32=False,
            load_timing_cache=str(settings.timing_cache) if settings.timing_cache else None,
            memory_pool_limits=limits,
            builder_optimization_level=settings.builder_optimization_level,
        )
    return network, config


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    contract: GraphContract,
    settings: BuildSettings,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build one engine from ``onnx_path`` and write it atomically to ``engine_path``.

    Returns the manifest entry: file, path, bytes, sha256, TensorRT version, dtype, precision plan,
    profiles (inputs, and output shapes at each corner), timing cache, engine I/O, build seconds.
    Raises ``MissingComponent`` (one line, with the command to finish on a GPU host) where
    TensorRT or a CUDA GPU is missing, before touching any file.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    ok, why = trt_status()
    if not ok:
        raise MissingComponent(
            f"{why}; to build the engine on a GPU host with TensorRT 10.x/11.x run: "
            f"{finish_command(onnx_path.parent, engine_path, settings)}"
        )
    if not onnx_path.is_file():
        raise UsageError(f"{onnx_path}: no such file")
    profiles = settings.profiles or [profile_shapes(contract)]
    for p in profiles:
        check_profile(contract, p)

    trt = _import_tensorrt()
    from polygraphy.backend.trt import EngineFromNetwork, SaveEngine
    from polygraphy.logger import G_LOGGER

    version = str(trt.__version__)
    plan = settings.plan(version, contract_dtype(contract))
    # On 11.x every network is strongly typed; pass the (ignored) flag only where it still exists.
    typed_flag = plan.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    progress = _Progress(contract.graph, log)
    log(f"[build {contract.graph}] TensorRT {version}: {plan.note}; {len(profiles)} profile(s)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    if settings.timing_cache is not None:
        settings.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(f".{engine_path.name}.{os.getpid()}.tmp")
    start_all = time.perf_counter()
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            network_loader, config = polygraphy_loaders(
                onnx_path,
                settings,
                plan,
                profiles,
                typed_flag=typed_flag,
                workspace_pool=trt.MemoryPoolType.WORKSPACE,
            )
            t = progress.stage(f"parsing {onnx_path.name}")
            network = network_loader()  # (builder, network, parser); the parser owns the weights
            progress.done(t, f"{network[1].num_layers} layers")
            t = progress.stage("building (tactic selection; minutes for large models)")
            engine = EngineFromNetwork(
                network,
                config=config,
                save_timing_cache=str(settings.timing_cache) if settings.timing_cache else None,
            )()
            progress.done(t)

            t = progress.stage(f"writing {engine_path.name}")
            SaveEngine(engine, str(tmp))()
            os.replace(tmp, engine_path)
            progress.done(t)
        io = _engine_io(engine, trt)
    finally:
        tmp.unlink(missing_ok=True)
    names = {x["name"] for x in io}
    expected = set(contract.input_names) | set(contract.output_names)
    if names != expected:
        raise RuntimeError(
            f"{engine_path}: engine I/O differs from the {contract.graph} contract: "
            f"missing {sorted(expected - names)}, extra {sorted(names - expected)}"
        )
    from star_export.manifest import file_entry

    entry = file_entry(engine_path)
    log(
        f"[build {contract.graph}] {engine_path} ({entry['bytes'] / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - start_all:.1f}s"
    )
    return {
        **entry,
        "path": str(engine_path),
        "graph": contract.graph,
        "onnx": onnx_path.name,
        "tensorrt": version,
        "dtype": settings.dtype,
        "precision": plan.to_dict(),
        "profiles": [
            {"inputs": _profile_json(p), "outputs": _profile_json(_outputs_for_profile(contract, p))}
            for p in profiles
        ],
        "timing_cache": str(settings.timing_cache) if settings.timing_cache else None,
        "workspace_bytes": settings.workspace_bytes,
        "builder_optimization_level": settings.builder_optimization_level,
        "io": io,
        "build_seconds": round(time.perf_counter() - start_all, 2),
    }


def _outputs_for_profile(contract: GraphContract, shapes: Mapping[str, ShapeRange]) -> dict[str, ShapeRange]:
    """Output shape ranges implied by a profile: dim sizes read back from the input shapes."""
    ranges: dict[str, list[int]] = {}
    for spec in contract.inputs:
        for axis, d in enumerate(spec.shape):
            if isinstance(d, str) and d.isidentifier():
                ranges.setdefault(d, [shapes[spec.name][i][axis] for i in range(3)])
    if set(ranges) != {d.name for d in contract.dims}:
        return {}
    return output_shapes(contract, {n: tuple(r) for n, r in ranges.items()})


# ----------------------------------------------------------------------------------------- parity


def _feed(contract: GraphContract, feeds: Mapping[str, Any]) -> dict[str, Any]:
    """Inputs cast to the contract's dtypes (bfloat16 as torch tensors: numpy has no bfloat16)."""
    import numpy as np

    out: dict[str, Any] = {}
    for spec in contract.inputs:
        value = feeds[spec.name]
        if spec.dtype == "bfloat16":
            import torch

            out[spec.name] = torch.as_tensor(np.asarray(value, dtype=np.float32)).to(torch.bfloat16)
        else:
            out[spec.name] = np.ascontiguousarray(np.asarray(value, dtype=spec.dtype))
    return out


def trt_parity(
    engine_path: Path,
    onnx_path: Path,
    contract: GraphContract,
    feeds_list: Sequence[Mapping[str, Any]],
    dtype: str,
) -> list[dict[str, Any]]:
    """TensorRT engine vs onnxruntime on the same ONNX, through polygraphy's ``Comparator.run``.

    One row per feed and output (``ParityRow`` dicts): max abs, max rel = max|diff| / max|ort|,
    tolerance ``TRT_TOLERANCES[dtype]`` (0 = exact for the int64 index outputs), passed.
    """
    ok, why = trt_status()
    if not ok:
        raise MissingComponent(f"{why}; TensorRT parity runs only where TensorRT and a CUDA GPU exist")
    if dtype not in TRT_TOLERANCES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    from star_export.runners import onnxrt_runner
    from star_export.validate import ParityReport

    feeds = [_feed(contract, f) for f in feeds_list]
    runners = [
        TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))), name="tensorrt"),
        onnxrt_runner(str(onnx_path), name="onnxruntime"),
    ]
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = Comparator.run(runners, data_loader=feeds)
    trt_iters, ort_iters = results[0][1], results[1][1]
    report = ParityReport()
    for i, (got_it, ref_it) in enumerate(zip(trt_iters, ort_iters, strict=True)):
        check = f"tensorrt {dtype} vs onnxruntime (feed {i})"
        for name in contract.output_names:
            got, ref = _numpy(got_it[name]), _numpy(ref_it[name])
            tol = 0.0 if name in INDEX_OUTPUTS else TRT_TOLERANCES[dtype]
            report.add(check, name, got, ref, tol)
    return [r.to_dict() for r in report.rows]


def _numpy(x: Any) -> Any:
    import numpy as np

    if hasattr(x, "detach"):  # torch tensor (bf16 outputs)
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


# ------------------------------------------------------------------------------------------- CLI


def add_build_arguments(parser: argparse.ArgumentParser, include_engine: bool = True) -> None:
    """Flags of ``build`` (and of ``llava --engine``; pass ``include_engine=False`` where the
    parser already defines ``--engine``)."""
    g = parser.add_argument_group("TensorRT engine")
    if include_engine:
        g.add_argument(
            "--engine",
            type=Path,
            default=None,
            metavar="PATH",
            help="prefill engine path; the decode engine goes beside it (out.plan -> out.decode.plan)",
        )
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="engine precision (default: the ONNX's). TensorRT 11: must match the exported ONNX "
        "(strong typing); TensorRT 10: fp16/bf16 on an fp32 ONNX use the builder flag",
    )
    g.add_argument(
        "--timing-cache",
        type=Path,
        default=None,
        metavar="PATH",
        help="tactic timing cache file, reused and updated",
    )
    g.add_argument(
        "--workspace", type=int, default=None, metavar="MiB", help="builder workspace memory pool limit"
    )
    g.add_argument(
        "--builder-optimization-level", type=int, default=None, metavar="N", help="0..5 (TensorRT default 3)"
    )
    g.add_argument(
        "--strongly-typed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force strong typing on/off (default: automatic; always on with TensorRT 11)",
    )
    for dim, flags in DIM_FLAGS.items():
        for which, flag in zip(("min", "opt", "max"), flags, strict=True):
            g.add_argument(flag, type=int, default=None, metavar="N", help=f"profile {which} {dim}")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="longest generation the decode profile allows (sets its max past length)",
    )


def _arg_ranges(args: argparse.Namespace, contract: GraphContract) -> tuple[dict[str, DimRange], list[str]]:
    """{dim: (min, opt, max)} for the dims whose flags were given (others keep the contract's), and
    those flags as strings for the finish command."""
    overrides: dict[str, DimRange] = {}
    flags: list[str] = []
    for dim, names in DIM_FLAGS.items():
        given = [getattr(args, n.lstrip("-").replace("-", "_"), None) for n in names]
        if all(v is None for v in given):
            continue
        for n, v in zip(names, given, strict=True):
            if v is not None:
                flags += [n, str(v)]
        if dim not in {d.name for d in contract.dims}:
            continue
        base = contract.dim(dim)
        lo, opt, hi = (
            v if v is not None else b for v, b in zip(given, (base.min, base.opt, base.max), strict=True)
        )
        if given[1] is None:  # keep opt inside a moved range
            opt = min(max(opt, lo), hi)
        overrides[dim] = (lo, opt, hi)
    return overrides, flags


def graph_overrides(
    manifest: Mapping[str, Any], contracts: Mapping[str, GraphContract], args: argparse.Namespace
) -> tuple[dict[str, dict[str, DimRange]], list[str]]:
    """Per-graph dim overrides from the CLI flags. Prefill takes batch/text_len directly; the
    decode graph's ``past_len`` range is recomputed with ``decode_contract`` from the manifest's
    geometry and STAR settings when text_len or ``--max-new-tokens`` flags are given."""
    prefill = contracts["prefill"]
    over, flags = _arg_ranges(args, prefill)
    out = {"prefill": dict(over)}
    mnt = getattr(args, "max_new_tokens", None)
    if mnt is not None:
        if mnt < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {mnt}")
        flags += ["--max-new-tokens", str(mnt)]
    if "decode" in contracts:
        decode = contracts["decode"]
        dec = {k: v for k, v in over.items() if k in {d.name for d in decode.dims}}
        if "text_len" in over or mnt is not None:
            dec["past_len"] = _decode_past_len(manifest, prefill, over, mnt)
        out["decode"] = dec
    return out, flags


def _decode_past_len(
    manifest: Mapping[str, Any],
    prefill: GraphContract,
    over: Mapping[str, DimRange],
    max_new_tokens: int | None,
) -> DimRange:
    from star_export.contract import decode_contract
    from star_export.load import Geometry
    from star_export.star import StarConfig

    try:
        geo = Geometry(**manifest["model"]["geometry"])
        star = manifest["star"]
        cfg = StarConfig(keep2=int(star["keep2"]), keep1=int(star["keep1"]), layer=int(star["layer_K"]))
    except (KeyError, TypeError) as e:
        raise UsageError(
            f"manifest.json lacks the geometry/STAR settings to size the decode profile ({e})"
        ) from None
    text = prefill.dim("text_len")
    text_r = over.get("text_len", (text.min, text.opt, text.max))
    batch = prefill.dim("batch")
    batch_r = over.get("batch", (batch.min, batch.opt, batch.max))
    if max_new_tokens is None:
        max_new_tokens = (manifest.get("decoding") or {}).get("max_new_tokens")
    if max_new_tokens is None:
        raise UsageError(
            "pass --max-new-tokens: the manifest does not say how long the decode profile must reach"
        )
    d = decode_contract(geo, cfg, batch_r, text_r, int(max_new_tokens)).dim("past_len")
    return (d.min, d.opt, d.max)


def settings_from_args(args: argparse.Namespace, default_dtype: str = "fp32") -> BuildSettings:
    workspace = getattr(args, "workspace", None)
    if workspace is not None and workspace <= 0:
        raise UsageError(f"--workspace must be a positive number of MiB, got {workspace}")
    return BuildSettings(
        dtype=getattr(args, "dtype", None) or default_dtype,
        timing_cache=getattr(args, "timing_cache", None),
        workspace_bytes=workspace << 20 if workspace else None,
        strongly_typed=getattr(args, "strongly_typed", None),
        builder_optimization_level=getattr(args, "builder_optimization_level", None),
    )


def check_target(trt_version: str | None) -> str:
    """Readiness-check target for the installed TensorRT (the 10.0 table for 10.0..10.14)."""
    if trt_version is None:
        return "10"
    major, minor = _major_minor(trt_version)
    if major >= 11:
        return "11"
    return "10" if minor >= 15 else "10.0"


def _write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    from star_export.outputs import write_json

    write_json(path, manifest)


def run_build(args: argparse.Namespace, out_dir: Path) -> int:
    """``build --from OUT_DIR``: readiness check of every graph, then the prefill engine (and the
    decode engine when the manifest lists ``decode``), recorded under ``engines`` in manifest.json.

    Exit codes: 0 built, 1 readiness check failed; raises UsageError (2) / MissingComponent (3).
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    manifest = read_manifest(out_dir, graphs=("prefill",))
    graphs = manifest["graphs"]
    engine = getattr(args, "engine", None) or out_dir / "prefill.plan"
    engine = Path(engine)
    if engine.is_dir():
        raise UsageError(f"--engine {engine}: is a directory")
    prefill_engine, decode_engine = engine_paths(engine)
    targets = {"prefill": prefill_engine, "decode": decode_engine}
    names = [g for g in ("prefill", "decode") if g in graphs]
    contracts = {g: contract_from_dict(graphs[g]) for g in names}
    onnx = {g: out_dir / graphs[g].get("file", f"{g}.onnx") for g in names}
    for g in names:
        if not onnx[g].is_file():
            raise UsageError(f"{onnx[g]}: listed in the manifest but missing")

    # 1. readiness (no TensorRT needed)
    from star_export.check import check_onnx

    target = check_target(tensorrt_version())
    failed = []
    for g in names:
        report = check_onnx(onnx[g], target=target, dynamic_inputs=contracts[g].dynamic_axes())
        print(
            f"[check] {onnx[g].name} for TensorRT {report.target}: {'ok' if report.ok else 'FAIL'} "
            f"({sum(report.op_counts.values())} nodes, {len(report.errors)} errors, {len(report.warnings)} warnings)"
        )
        if not report.ok:
            failed.append(report)
    if failed:
        for report in failed:
            print(report.format(), file=sys.stderr)
        print("star_export: TensorRT readiness check failed (see above); no engine built", file=sys.stderr)
        return 1

    # 2. settings and profiles (validated before looking for TensorRT, so usage errors come first)
    overrides, flags = graph_overrides(manifest, contracts, args)
    base = settings_from_args(args, default_dtype=contract_dtype(contracts["prefill"]))
    base = dataclasses.replace(base, profile_flags=tuple(flags))
    per_graph = {
        g: dataclasses.replace(base, profiles=[profile_shapes(contracts[g], overrides[g])]) for g in names
    }

    # 3. TensorRT and a GPU
    ok, why = trt_status()
    if not ok:
        raise MissingComponent(
            f"{why}; the ONNX graphs and manifest are in {out_dir}/; to build the engines on a GPU host "
            f"with TensorRT 10.x/11.x run: {finish_command(out_dir, prefill_engine, base)}"
        )

    # 4. build, then record atomically
    entries = {g: build_engine(onnx[g], targets[g], contracts[g], per_graph[g]) for g in names}
    manifest = json.loads(manifest_path.read_text())  # re-read: keep anything written meanwhile
    manifest["engines"] = {**(manifest.get("engines") or {}), **entries}
    manifest["engine_build"] = base.settings_summary() | {"tensorrt_status": trt_status()[1]}
    _write_manifest(manifest_path, manifest)
    for g in names:
        e = entries[g]
        print(
            f"engine {g}: {e['path']} ({e['bytes']} bytes, sha256 {e['sha256'][:12]}, TensorRT {e['tensorrt']})"
        )
    return 0
