"""Stage 4 of the data's way: the prefill graph of every keep level (+ ``decode.onnx``) -> TensorRT
engines (``.plan``): one per prefill graph and one decode engine, recorded in the manifest under
``engines`` by graph name.

One job per module:

- :mod:`~star_export.engines.status`: is TensorRT importable here, which version, is there a GPU;
- :mod:`~star_export.engines.profiles`: optimization-profile shape ranges from the I/O contract;
- :mod:`~star_export.engines.precision`: strong typing and precision flags, TensorRT 10.x vs 11.x;
- :mod:`~star_export.engines.settings`: what a build is asked for, engine paths, the finish command;
- :mod:`~star_export.engines.engine`: one engine through polygraphy's loaders;
- :mod:`~star_export.engines.parity`: TensorRT engines vs the PyTorch rewrite (every level's prefill, and
  greedy decode);
- :mod:`~star_export.engines.engines_only`: ``validate --trt --engines-only``: the engine rows alone,
  with the margins and inputs of the export's recorded report.json;
- :mod:`~star_export.engines.command`: the ``build`` command's flags and :func:`run_build`.

TensorRT is imported lazily (inside the functions that need it), so this package, its pure
helpers and ``--help`` work on machines without TensorRT or a GPU. Where either is missing,
:func:`build_engine` / :func:`run_build` raise :class:`MissingComponent` (exit 3) with the exact
command that finishes the build on a GPU host. The names below are the package's interface
(other stages and the tests import them from ``star_export.engines``).
"""

from __future__ import annotations

from star_export.contract import contract_from_dict
from star_export.engines.command import (
    DIM_FLAGS,
    add_build_arguments,
    graph_overrides,
    run_build,
    settings_from_args,
)
from star_export.engines.engine import build_engine, polygraphy_loaders, timing_cache_rejected
from star_export.engines.parity import (
    TRT_TOLERANCES,
    TrtBackend,
    trt_rows,
)
from star_export.engines.precision import (
    DTYPE_OF_ELEMENT,
    DTYPES,
    ELEMENT_OF_DTYPE,
    PrecisionPlan,
    contract_dtype,
    precision_plan,
    strongly_typed_flag,
)
from star_export.engines.profiles import (
    MIN_DIM_SIZE,
    DimRange,
    ProfileShapes,
    ShapeRange,
    check_profile,
    output_shapes,
    outputs_for_profile,
    profile_json,
    profile_shapes,
    to_polygraphy_profiles,
)
from star_export.engines.settings import BuildSettings, engine_files, engine_paths, finish_command
from star_export.engines.status import MIN_TENSORRT_MAJOR, check_target, tensorrt_version, trt_status

__all__ = [
    "DIM_FLAGS",
    "DTYPES",
    "DTYPE_OF_ELEMENT",
    "ELEMENT_OF_DTYPE",
    "MIN_DIM_SIZE",
    "MIN_TENSORRT_MAJOR",
    "TRT_TOLERANCES",
    "BuildSettings",
    "DimRange",
    "PrecisionPlan",
    "ProfileShapes",
    "ShapeRange",
    "TrtBackend",
    "add_build_arguments",
    "build_engine",
    "check_profile",
    "check_target",
    "contract_dtype",
    "contract_from_dict",
    "engine_files",
    "engine_paths",
    "finish_command",
    "graph_overrides",
    "output_shapes",
    "outputs_for_profile",
    "polygraphy_loaders",
    "precision_plan",
    "profile_json",
    "profile_shapes",
    "run_build",
    "settings_from_args",
    "strongly_typed_flag",
    "tensorrt_version",
    "timing_cache_rejected",
    "to_polygraphy_profiles",
    "trt_rows",
    "trt_status",
]
