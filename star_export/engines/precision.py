"""How an engine gets its precision on TensorRT 10.x and 11.x: :func:`precision_plan`.

What was read, and how :func:`precision_plan` follows it:

- TensorRT 11 removed every weak-typing API: ``BuilderFlag.FP16`` / ``BF16`` (replacement:
  "strong typing with ModelOpt AutoCast"), ``OBEY_/PREFER_PRECISION_CONSTRAINTS`` ("strong typing,
  always enforced"), ``DIRECT_IO``, INT8 calibrators. Every network is strongly typed; the
  ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` flag is kept for compatibility and ignored,
  so :func:`strongly_typed_flag` passes it on 10.x only.
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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from star_export.contract import GraphContract
from star_export.engines.status import MIN_TENSORRT_MAJOR, major_minor
from star_export.errors import MissingComponent, UsageError

DTYPES = ("fp32", "fp16", "bf16")
# contract / manifest element-type names (numpy style) <-> --dtype names
DTYPE_OF_ELEMENT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
ELEMENT_OF_DTYPE = {v: k for k, v in DTYPE_OF_ELEMENT.items()}


def contract_dtype(contract: GraphContract) -> str:
    """The float type the graph was exported in ("fp32"/"fp16"/"bf16"): its first float input."""
    for t in contract.inputs:
        if t.dtype in DTYPE_OF_ELEMENT:
            return DTYPE_OF_ELEMENT[t.dtype]
    return "fp32"


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
    major, _ = major_minor(trt_version)
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


def strongly_typed_flag(plan: PrecisionPlan, trt_version: str) -> bool:
    """Whether to set ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` at network creation.

    Only on TensorRT 10.x, where it selects strong typing. On 11.x every network is strongly typed
    and the flag is deprecated and ignored ("Migrating from TensorRT 10.x to 11.x"), so it is not
    passed: the plan still says ``strongly_typed`` (that is what the engine is), the flag does not.
    """
    return plan.strongly_typed and major_minor(trt_version)[0] == 10
