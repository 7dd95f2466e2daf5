"""TensorRT engines against onnxruntime on the same ONNX graphs: per-output parity rows.

Tolerances per engine precision: max|trt - ort| <= tol * max|ort| per output tensor. fp32: TF32
is off, only kernel order differs (same bound as onnxruntime vs torch). fp16: unit roundoff
2^-11 ~ 4.9e-4, accumulated over the decoder layers -> 1e-2. bf16: unit roundoff 2^-8 ~ 3.9e-3
-> 3e-2. Index outputs (the kept-token indices) are compared exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from star_export.build import status
from star_export.build.precision import DTYPES
from star_export.contract import GraphContract
from star_export.errors import MissingComponent, UsageError

TRT_TOLERANCES: Mapping[str, float] = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}
INDEX_OUTPUTS = ("stage1_keep_idx", "stage2_keep_idx")


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
    ok, why = status.trt_status()
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
