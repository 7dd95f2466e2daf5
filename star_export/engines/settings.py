"""What a build is asked for (:class:`BuildSettings`), the engine file names, and the command
that finishes a build on a GPU host."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from star_export.engines.precision import DTYPES, PrecisionPlan, precision_plan
from star_export.engines.profiles import ProfileShapes, profile_json
from star_export.errors import UsageError

# --hardware-compatibility-level values -> trt.HardwareCompatibilityLevel member names (TensorRT 10.x/11.x)
HARDWARE_LEVELS = {
    "none": "NONE",
    "ampere-plus": "AMPERE_PLUS",
    "same-compute-capability": "SAME_COMPUTE_CAPABILITY",
}
DEFAULT_TIMING_CACHE = "timing.cache"  # `build --from DIR` uses DIR/timing.cache unless told otherwise


@dataclass
class BuildSettings:
    """What a build is asked for. ``profiles``: one dict per optimization profile (input name ->
    (min, opt, max) shapes); empty means one profile from the contract's ranges.
    ``profile_flags``: the CLI flags that shaped the profiles, repeated in the finish command.
    ``version_compatible`` / ``hardware_compatibility_level`` (a :data:`HARDWARE_LEVELS` key): what
    polygraphy's ``CreateConfig`` sets as ``BuilderFlag.VERSION_COMPATIBLE`` /
    ``IBuilderConfig.hardware_compatibility_level``. ``no_timing_cache``: ``--no-timing-cache`` was
    given (``run_build`` then uses no default cache)."""

    dtype: str = "fp32"
    timing_cache: Path | None = None
    workspace_bytes: int | None = None
    profiles: list[ProfileShapes] = field(default_factory=list)
    strongly_typed: bool | None = None
    builder_optimization_level: int | None = None
    profile_flags: tuple[str, ...] = ()
    version_compatible: bool = False
    hardware_compatibility_level: str | None = None
    no_timing_cache: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise UsageError(f"--workspace must be positive, got {self.workspace_bytes} bytes")
        if self.builder_optimization_level is not None and not 0 <= self.builder_optimization_level <= 5:
            raise UsageError(
                f"--builder-optimization-level must be in 0..5, got {self.builder_optimization_level}"
            )
        level = self.hardware_compatibility_level
        if level is not None and level not in HARDWARE_LEVELS:
            raise UsageError(
                f"--hardware-compatibility-level must be one of {', '.join(HARDWARE_LEVELS)}, got {level!r}"
            )
        if self.no_timing_cache and self.timing_cache is not None:
            raise UsageError("--no-timing-cache and --timing-cache exclude each other")
        if self.timing_cache is not None:
            self.timing_cache = Path(self.timing_cache)

    def plan(self, trt_version: str, onnx_dtype: str) -> PrecisionPlan:
        """The precision plan of these settings for TensorRT ``trt_version`` and an ``onnx_dtype`` graph."""
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
            "version_compatible": self.version_compatible,
            "hardware_compatibility_level": self.hardware_compatibility_level,
            "profiles": [profile_json(p) for p in self.profiles],
        }


def finish_command(out_dir: Path, engine: Path, settings: BuildSettings) -> str:
    """The command that builds the engines from ``out_dir`` on a host with TensorRT and a GPU."""
    parts = ["python", "-m", "star_export", "build", "--from", str(out_dir), "--engine", str(engine)]
    parts += ["--dtype", settings.dtype]
    if settings.timing_cache is not None:
        parts += ["--timing-cache", str(settings.timing_cache)]
    if settings.no_timing_cache:
        parts.append("--no-timing-cache")
    if settings.workspace_bytes is not None:
        parts += ["--workspace", str(-(-settings.workspace_bytes // (1 << 20)))]
    if settings.builder_optimization_level is not None:
        parts += ["--builder-optimization-level", str(settings.builder_optimization_level)]
    if settings.strongly_typed is not None:
        parts.append("--strongly-typed" if settings.strongly_typed else "--no-strongly-typed")
    if settings.version_compatible:
        parts.append("--version-compatible")
    if settings.hardware_compatibility_level is not None:
        parts += ["--hardware-compatibility-level", settings.hardware_compatibility_level]
    parts += list(settings.profile_flags)
    return shlex.join(parts)


def _beside(engine: Path, tag: str) -> Path:
    """``out.plan`` + ``decode`` -> ``out.decode.plan`` (``dir/engine`` -> ``dir/engine.decode``)."""
    if engine.suffix:
        return engine.with_name(f"{engine.stem}.{tag}{engine.suffix}")
    return engine.with_name(f"{engine.name}.{tag}")


def engine_paths(engine: Path) -> tuple[Path, Path]:
    """(prefill engine, decode engine): ``out.plan`` -> (``out.plan``, ``out.decode.plan``)."""
    engine = Path(engine)
    return engine, _beside(engine, "decode")


def engine_files(engine: Path, graphs: Sequence[str]) -> dict[str, Path]:
    """{graph: engine file} of an export's graphs from the one ``--engine`` path: a one-level export's
    ``prefill`` graph -> ``out.plan``; a level's ``prefill_k32`` -> ``out.k32.plan``; ``decode`` ->
    ``out.decode.plan`` (one decode engine serves every level)."""
    engine = Path(engine)
    out = {}
    for graph in graphs:
        if graph == "prefill":
            out[graph] = engine
        elif graph == "decode":
            out[graph] = _beside(engine, "decode")
        elif graph.startswith("prefill_k") and graph[len("prefill_k") :].isdigit():
            out[graph] = _beside(engine, graph[len("prefill_") :])
        else:
            raise UsageError(f"graph {graph!r}: no engine name for it (prefill, prefill_k<keep>, decode)")
    return out
