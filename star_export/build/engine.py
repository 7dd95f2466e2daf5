"""One TensorRT engine from one ONNX graph, through polygraphy's loaders: :func:`build_engine`.

Thin use of polygraphy's TensorRT loaders, which keep the code portable across TensorRT 10.x
and 11.x (polygraphy ``backend/trt/loader.py`` and ``config.py``, 0.53)::

    network = NetworkFromOnnxPath(onnx, strongly_typed=...)           # parse_from_file: external data ok
    config  = CreateConfig(profiles=[Profile...], fp16=..., bf16=...,   # fp16/bf16 only on TensorRT 10
                           load_timing_cache=..., memory_pool_limits={WORKSPACE: bytes},
                           builder_optimization_level=...)
    engine  = EngineFromNetwork(network, config, save_timing_cache=...) # merges + rewrites the cache file
    SaveEngine(engine, tmp)  ->  os.replace(tmp, engine_path)            # atomic

TensorRT is imported at call time (polygraphy's loaders import it through ``mod.lazy_import`` on
first call). Where it or a GPU is missing, :func:`build_engine` raises :class:`MissingComponent`
(exit 3) with the exact command that finishes the build on a GPU host, before touching any file.

Timing cache (TensorRT "Optimizing Builder Performance", ``ITimingCache``): layer timings are
specific to the device, CUDA and TensorRT versions and to flags such as TF32; polygraphy loads
the file with ``create_timing_cache`` + ``set_timing_cache(cache, ignore_mismatch=False)`` and,
after the build, combines the old file into the new cache (``combine(..., ignore_mismatch=True)``)
under a file lock and rewrites it, so one ``--timing-cache`` file is safely reused across builds.
polygraphy does not report a cache that ``set_timing_cache`` refused (another GPU model or
TensorRT version): :func:`timing_cache_rejected` asks the same question first, and the build
prints a WARNING line when the cache will not be used.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from star_export.build import status
from star_export.build.precision import PrecisionPlan, contract_dtype, strongly_typed_flag
from star_export.build.profiles import (
    ShapeRange,
    check_profile,
    outputs_for_profile,
    profile_json,
    profile_shapes,
    to_polygraphy_profiles,
)
from star_export.build.settings import BuildSettings, finish_command
from star_export.contract import GraphContract
from star_export.errors import MissingComponent, UsageError


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

    ``typed_flag``: set ``STRONGLY_TYPED`` at network creation (:func:`strongly_typed_flag`: TensorRT
    10.x strong typing; never on 11.x, where every network is strongly typed and the flag ignored). ``workspace_pool``: the
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


def timing_cache_rejected(builder: Any, path: Path | None) -> str | None:
    """Why TensorRT will not use the timing cache file at ``path``; None where it will (or none exists).

    polygraphy's ``CreateConfig`` attaches the file with ``set_timing_cache(cache,
    ignore_mismatch=False)`` and ignores the returned bool, so a cache written on another GPU model
    or by another TensorRT version is silently not used. This asks TensorRT the same question, with
    the same arguments, on a scratch ``IBuilderConfig`` of the same builder.
    """
    if path is None or not Path(path).is_file() or Path(path).stat().st_size == 0:
        return None
    probe = builder.create_builder_config()
    try:
        cache = probe.create_timing_cache(Path(path).read_bytes())
    except Exception as e:  # TensorRT raises its own types
        return f"TensorRT cannot read it ({status.first_line(e)})"
    if cache is None:
        return "TensorRT cannot read it"
    if not probe.set_timing_cache(cache, ignore_mismatch=False):
        return "it was written on another GPU model or by another TensorRT version"
    return None


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    contract: GraphContract,
    settings: BuildSettings,
    log: Callable[[str], None] = print,
    *,
    finish: str | None = None,
) -> dict[str, Any]:
    """Build one engine from ``onnx_path`` and write it atomically to ``engine_path``.

    ``finish``: the command a missing TensorRT/GPU error prints (default: a ``build`` of this
    directory with ``--engine engine_path``; ``run_build`` passes the command of the whole build,
    whose ``--engine`` names every level's engine).

    Returns the manifest entry: file, path, bytes, sha256, TensorRT version, dtype, precision plan,
    profiles (inputs, and output shapes at each corner), timing cache, engine I/O, build seconds.
    Raises ``MissingComponent`` (one line, with the command to finish on a GPU host) where
    TensorRT or a CUDA GPU is missing, before touching any file.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    ok, why = status.trt_status()
    if not ok:
        raise MissingComponent(
            f"{why}; to build the engine on a GPU host with TensorRT 10.x/11.x run: "
            f"{finish or finish_command(onnx_path.parent, engine_path, settings)}"
        )
    if not onnx_path.is_file():
        raise UsageError(f"{onnx_path}: no such file")
    profiles = settings.profiles or [profile_shapes(contract)]
    for p in profiles:
        check_profile(contract, p)

    trt = status.import_tensorrt()
    from polygraphy.backend.trt import EngineFromNetwork, SaveEngine
    from polygraphy.logger import G_LOGGER

    version = str(trt.__version__)
    plan = settings.plan(version, contract_dtype(contract))
    typed_flag = strongly_typed_flag(plan, version)  # 10.x only: on 11.x deprecated and ignored
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
            rejected = timing_cache_rejected(network[0], settings.timing_cache)
            if rejected is not None:
                log(
                    f"[build {contract.graph}] WARNING: timing cache {settings.timing_cache} is not used: "
                    f"{rejected}; every tactic is timed afresh, and the file is rewritten after the build"
                )
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
            {"inputs": profile_json(p), "outputs": profile_json(outputs_for_profile(contract, p))}
            for p in profiles
        ],
        "timing_cache": str(settings.timing_cache) if settings.timing_cache else None,
        "workspace_bytes": settings.workspace_bytes,
        "builder_optimization_level": settings.builder_optimization_level,
        "io": io,
        "build_seconds": round(time.perf_counter() - start_all, 2),
    }
