"""One TensorRT engine from one ONNX graph, through polygraphy's loaders: :func:`build_engine`.

Thin use of polygraphy's TensorRT loaders, which keep the code portable across TensorRT 10.x
and 11.x (polygraphy ``backend/trt/loader.py``, ``backend/trt/config.py`` and
``backend/common/loader.py``, 0.53)::

    network = NetworkFromOnnxPath(onnx, strongly_typed=...)()         # parse_from_file: external data ok
    config  = CreateConfig(profiles=[Profile...], fp16=..., bf16=...,   # fp16/bf16 only on TensorRT 10
                           load_timing_cache=..., memory_pool_limits={WORKSPACE: bytes},
                           builder_optimization_level=..., version_compatible=...,
                           hardware_compatibility_level=...)
    data    = EngineBytesFromNetwork(network, config, save_timing_cache=...)()  # the serialized plan
    SaveBytes(data, tmp)()  ->  os.replace(tmp, engine_path)            # atomic

The engine is never deserialized here (``EngineFromNetwork`` would build the bytes, deserialize
them into an ``ICudaEngine`` and ``SaveEngine`` serialize it again: a second copy of the weights on
the GPU and the host). The engine's I/O names and types are read from the parsed network, whose
marked inputs/outputs are the engine's.

TensorRT is imported at call time (polygraphy's loaders import it through ``mod.lazy_import`` on
first call). Where it or a GPU is missing, :func:`build_engine` raises :class:`MissingComponent`
(exit 3) with the exact command that finishes the build on a GPU host, before touching any file.

Timing cache (TensorRT "Optimizing Builder Performance", ``ITimingCache``): layer timings are
specific to the device, CUDA and TensorRT versions and to flags such as TF32. polygraphy loads the
file with ``set_timing_cache(cache, ignore_mismatch=False)`` and ignores the result, and after the
build combines the old file into the new cache with ``combine(..., ignore_mismatch=True)`` and
rewrites the file: a cache from another device would be merged and written back with this
device's header, so the next build would take it silently. :func:`choose_timing_cache` therefore
asks TensorRT first (:func:`timing_cache_rejected`, the same call on a scratch builder config) and
never hands polygraphy a file TensorRT refuses: it takes the first of ``timing.cache``,
``timing.1.cache``, ``timing.2.cache``, ... that TensorRT accepts or that does not exist yet (a
fresh cache, started beside the refused one), and the build says which file it wrote.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from star_export.contract import GraphContract
from star_export.engines import status
from star_export.engines.precision import PrecisionPlan, contract_dtype, strongly_typed_flag
from star_export.engines.profiles import (
    ShapeRange,
    check_profile,
    outputs_for_profile,
    profile_json,
    profile_shapes,
    to_polygraphy_profiles,
)
from star_export.engines.settings import HARDWARE_LEVELS, BuildSettings, finish_command
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


def network_io(network: Any) -> list[dict[str, str]]:
    """Name, direction and dtype of each I/O tensor of a parsed ``INetworkDefinition`` (the engine's
    I/O: the network's marked inputs and outputs, in the network's types)."""
    io = []
    for mode, count, get in (
        ("input", network.num_inputs, network.get_input),
        ("output", network.num_outputs, network.get_output),
    ):
        for i in range(count):
            t = get(i)
            io.append({"name": t.name, "mode": mode, "dtype": str(t.dtype).split(".")[-1]})
    return io


def polygraphy_loaders(
    onnx_path: Path,
    settings: BuildSettings,
    plan: PrecisionPlan,
    profiles: Sequence[Mapping[str, ShapeRange]],
    *,
    typed_flag: bool,
    workspace_pool: Any = None,
    hardware_level: Any = None,
) -> tuple[Any, Any]:
    """The configured (not yet called) polygraphy loaders: ``NetworkFromOnnxPath`` and
    ``CreateConfig``. Constructing them needs no TensorRT; calling them does.

    ``typed_flag``: set ``STRONGLY_TYPED`` at network creation (:func:`strongly_typed_flag`: TensorRT
    10.x strong typing; never on 11.x, where every network is strongly typed and the flag ignored). ``workspace_pool``: the
    ``trt.MemoryPoolType.WORKSPACE`` key for ``memory_pool_limits`` (given by the caller, which has
    TensorRT imported). The FP16/BF16 builder flags are set only where ``plan`` says so (TensorRT 10
    weak typing); TF32 is cleared. ``hardware_level``: the ``trt.HardwareCompatibilityLevel`` member
    of ``settings.hardware_compatibility_level`` (given by the caller, as ``workspace_pool``).
    """
    return network_loader(onnx_path, typed_flag), config_loader(
        settings, plan, profiles, workspace_pool=workspace_pool, hardware_level=hardware_level
    )


def network_loader(onnx_path: Path, typed_flag: bool) -> Any:
    """polygraphy's ``NetworkFromOnnxPath`` (constructed, not called; see :func:`polygraphy_loaders`)."""
    from polygraphy.backend.trt import NetworkFromOnnxPath

    return NetworkFromOnnxPath(str(onnx_path), strongly_typed=typed_flag)


def config_loader(
    settings: BuildSettings,
    plan: PrecisionPlan,
    profiles: Sequence[Mapping[str, ShapeRange]],
    *,
    workspace_pool: Any = None,
    hardware_level: Any = None,
) -> Any:
    """polygraphy's ``CreateConfig`` for these settings (constructed, not called; see
    :func:`polygraphy_loaders`). ``settings.timing_cache`` is the file it loads: pass the one
    :func:`choose_timing_cache` chose."""
    from polygraphy.backend.trt import CreateConfig
    from polygraphy.logger import G_LOGGER

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
            version_compatible=settings.version_compatible,
            hardware_compatibility_level=hardware_level,
        )
    if settings.hardware_compatibility_level is not None and hardware_level is None:
        raise ValueError("hardware_compatibility_level needs the trt.HardwareCompatibilityLevel member")
    return config


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


MAX_TIMING_CACHES = 100  # timing.cache, timing.1.cache, ... timing.99.cache


def timing_cache_candidates(path: Path) -> list[Path]:
    """``timing.cache``, then ``timing.1.cache``, ``timing.2.cache``, ...: where a build looks for a
    timing cache this device accepts, or starts a fresh one (the first free name)."""
    path = Path(path)
    out = [path]
    for i in range(1, MAX_TIMING_CACHES):
        out.append(path.with_name(f"{path.stem}.{i}{path.suffix}") if path.suffix else Path(f"{path}.{i}"))
    return out


def choose_timing_cache(builder: Any, path: Path | None) -> tuple[Path | None, dict[str, str]]:
    """(the timing cache file to load and write back, {refused file: why}) for ``path``: the first of
    :func:`timing_cache_candidates` that TensorRT accepts or that does not exist yet. A refused
    cache is never given to polygraphy (which would merge it with ``ignore_mismatch=True`` and
    write it back with this device's header). A UsageError where every candidate is refused."""
    if path is None:
        return None, {}
    rejected: dict[str, str] = {}
    for candidate in timing_cache_candidates(Path(path)):
        why = timing_cache_rejected(builder, candidate)
        if why is None:
            return candidate, rejected
        rejected[str(candidate)] = why
    raise UsageError(
        f"--timing-cache {path}: TensorRT refuses it and the {MAX_TIMING_CACHES - 1} files beside it "
        "(timing.N.cache); remove them or pass another --timing-cache"
    )


def _hardware_level(trt: Any, settings: BuildSettings, version: str) -> Any:
    """The ``trt.HardwareCompatibilityLevel`` member ``--hardware-compatibility-level`` names (None: not given)."""
    if settings.hardware_compatibility_level is None:
        return None
    name = HARDWARE_LEVELS[settings.hardware_compatibility_level]
    level = getattr(getattr(trt, "HardwareCompatibilityLevel", None), name, None)
    if level is None:
        raise UsageError(
            f"--hardware-compatibility-level {settings.hardware_compatibility_level}: TensorRT {version} "
            f"has no HardwareCompatibilityLevel.{name}"
        )
    return level


def _timing_cache(builder: Any, settings: BuildSettings, tag: str, log: Callable[[str], None]) -> tuple:
    """:func:`choose_timing_cache` for the build, with a WARNING line per refused file and a line
    naming the fresh file started beside them."""
    chosen, rejected = choose_timing_cache(builder, settings.timing_cache)
    for path, why in rejected.items():
        log(f"[build {tag}] WARNING: timing cache {path} is not used: {why}; it is left as it is")
    if rejected and chosen is not None:
        state = "reusing" if chosen.is_file() else "starting a fresh timing cache beside it:"
        log(f"[build {tag}] {state} {chosen}")
    return chosen, rejected


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    contract: GraphContract,
    settings: BuildSettings,
    log: Callable[[str], None] = print,
    *,
    finish: str | None = None,
) -> dict[str, Any]:
    """Build one engine from ``onnx_path`` and write it atomically to ``engine_path``: the serialized
    plan from polygraphy's ``EngineBytesFromNetwork``, written by ``SaveBytes`` (never deserialized).

    ``finish``: the command a missing TensorRT/GPU error prints (default: a ``build`` of this
    directory with ``--engine engine_path``; ``run_build`` passes the command of the whole build,
    whose ``--engine`` names every level's engine). ``settings.timing_cache``: the cache to reuse
    and update (:func:`choose_timing_cache`: a file this device refuses is left alone and a fresh
    one started beside it); the entry and the log name the file written.

    Returns the manifest entry: file, path, bytes, sha256, TensorRT version, dtype, precision plan,
    profiles (inputs, and output shapes at each corner), timing cache (and the refused ones),
    compatibility settings, engine I/O, build seconds. Raises ``MissingComponent`` (one line, with
    the command to finish on a GPU host) where TensorRT or a CUDA GPU is missing, before touching
    any file; ``RuntimeError`` where the parsed network's I/O is not the contract's (nothing built).
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
    from polygraphy.backend.common import SaveBytes
    from polygraphy.backend.trt import EngineBytesFromNetwork
    from polygraphy.logger import G_LOGGER

    version = str(trt.__version__)
    plan = settings.plan(version, contract_dtype(contract))
    hardware_level = _hardware_level(trt, settings, version)
    typed_flag = strongly_typed_flag(plan, version)  # 10.x only: on 11.x deprecated and ignored
    tag = contract.graph
    progress = _Progress(tag, log)
    log(f"[build {tag}] TensorRT {version}: {plan.note}; {len(profiles)} profile(s)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    if settings.timing_cache is not None:
        settings.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(f".{engine_path.name}.{os.getpid()}.tmp")
    start_all = time.perf_counter()
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            t = progress.stage(f"parsing {onnx_path.name}")
            network = network_loader(
                onnx_path, typed_flag
            )()  # (builder, network, parser); the parser owns the weights
            progress.done(t, f"{network[1].num_layers} layers")
            io = network_io(network[1])
            names, expected = {x["name"] for x in io}, set(contract.input_names) | set(contract.output_names)
            if names != expected:
                raise RuntimeError(
                    f"{onnx_path}: the parsed network's I/O differs from the {tag} contract: "
                    f"missing {sorted(expected - names)}, extra {sorted(names - expected)}; no engine built"
                )
            cache, rejected = _timing_cache(network[0], settings, tag, log)
            config = config_loader(
                dataclasses.replace(settings, timing_cache=cache),
                plan,
                profiles,
                workspace_pool=trt.MemoryPoolType.WORKSPACE,
                hardware_level=hardware_level,
            )
            t = progress.stage("building (tactic selection; minutes for large models)")
            data = EngineBytesFromNetwork(
                network, config=config, save_timing_cache=str(cache) if cache else None
            )()
            progress.done(t)

            t = progress.stage(f"writing {engine_path.name}")
            SaveBytes(data, str(tmp))()
            del data  # the serialized plan: one host copy, released before hashing the file
            os.replace(tmp, engine_path)
            progress.done(t)
    finally:
        tmp.unlink(missing_ok=True)
    if cache is not None and cache.is_file():
        log(f"[build {tag}] timing cache written: {cache} ({cache.stat().st_size} bytes)")
    from star_export.manifest import file_entry

    entry = file_entry(engine_path)
    log(
        f"[build {tag}] {engine_path} ({entry['bytes'] / 2**20:.1f} MiB) in {time.perf_counter() - start_all:.1f}s"
    )
    return {
        **entry,
        "path": str(engine_path),
        "graph": tag,
        "onnx": onnx_path.name,
        "tensorrt": version,
        "dtype": settings.dtype,
        "precision": plan.to_dict(),
        "profiles": [
            {"inputs": profile_json(p), "outputs": profile_json(outputs_for_profile(contract, p))}
            for p in profiles
        ],
        "timing_cache": str(cache) if cache else None,
        "timing_cache_rejected": rejected,
        "workspace_bytes": settings.workspace_bytes,
        "builder_optimization_level": settings.builder_optimization_level,
        "version_compatible": settings.version_compatible,
        "hardware_compatibility_level": settings.hardware_compatibility_level,
        "io": io,
        "build_seconds": round(time.perf_counter() - start_all, 2),
    }
