"""TensorRT engines against onnxruntime on the same ONNX graphs: per-output parity rows.

Tolerances per engine precision: max|trt - ort| <= tol * max|ort| per output tensor. fp32: TF32
is off, only kernel order differs (same bound as onnxruntime vs torch). fp16: unit roundoff
2^-11 ~ 4.9e-4, accumulated over the decoder layers -> 1e-2. bf16: unit roundoff 2^-8 ~ 3.9e-3
-> 3e-2. Index outputs (the kept-token indices) are compared exactly.

- :func:`trt_parity`: the prefill engine, one forward per feed, through polygraphy's
  ``Comparator.run``.
- :func:`trt_decode_parity`: prefill + decode engines through a few greedy steps, against
  onnxruntime on prefill.onnx + decode.onnx. The loop (:func:`decode_parity`) takes any two
  backends with ``prefill(feeds) -> dict`` / ``decode(feeds) -> dict`` (``runtime.Backend``) and
  drives both with ``runtime.generate``, so every decode step feeds the per-layer caches the
  engine itself returned (growing by one slot a step); :class:`TrtBackend` is the thin TensorRT
  side, polygraphy ``TrtRunner`` per engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from star_export.build import status
from star_export.build.precision import DTYPES
from star_export.contract import GraphContract, contract_from_dict
from star_export.errors import MissingComponent, UsageError

if TYPE_CHECKING:
    from star_export.geometry import Geometry
    from star_export.runtime import Backend
    from star_export.star import StarConfig

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


# ----------------------------------------------------------------------------------------- decode


class TrtBackend:
    """The prefill and decode engines behind ``runtime.Backend``, through polygraphy's ``TrtRunner``.

    A context manager: entering activates both runners (deserialises the engines, creates the
    execution contexts), leaving deactivates them. Inputs are cast to the contract's dtypes;
    outputs are copied to fresh host arrays, because ``TrtRunner`` may reuse its output buffers
    on the next call (polygraphy ``BaseRunner.infer``), and the caches of one step are the next
    step's inputs.
    """

    name = "tensorrt"

    def __init__(
        self, prefill_engine: Path, decode_engine: Path, prefill: GraphContract, decode: GraphContract
    ):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self._graphs = {}
        for graph, engine, contract in (
            ("prefill", prefill_engine, prefill),
            ("decode", decode_engine, decode),
        ):
            runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name=f"tensorrt-{graph}")
            self._graphs[graph] = (runner, contract)

    def __enter__(self) -> TrtBackend:
        for runner, _ in self._graphs.values():
            runner.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        for runner, _ in self._graphs.values():
            if runner.is_active:
                runner.deactivate()

    def _infer(self, graph: str, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np

        runner, contract = self._graphs[graph]
        out = runner.infer(_feed(contract, feeds))
        return {name: np.array(_numpy(out[name]), copy=True) for name in contract.output_names}

    def prefill(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """One prefill engine run: {output name: host array}."""
        return self._infer("prefill", feeds)

    def decode(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """One decode step on the decode engine: {output name: host array}."""
        return self._infer("decode", feeds)


def decode_parity(
    got: Backend,
    ref: Backend,
    feeds: Mapping[str, Any],
    geo: Geometry,
    cfg: StarConfig,
    dtype: str,
    steps: int = 4,
    check: str | None = None,
) -> list[dict[str, Any]]:
    """Greedy generation through ``got`` and ``ref`` from the same prompt, compared step by step.

    Rows (``ParityRow`` dicts, as :func:`trt_parity`): the generated ``tokens`` (exact); the
    ``logits`` of every step up to and including the first whose tokens differ (until then both
    saw the same inputs; tolerance ``TRT_TOLERANCES[dtype]``, relative to max|ref|); the prefill's
    kept indices (exact); each layer's final cache length (exact: prefill length + steps - 1).
    """
    import numpy as np

    from star_export.runtime import GenerationConfig, generate
    from star_export.validate import ParityReport

    if dtype not in TRT_TOLERANCES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if steps < 1:
        raise UsageError(f"decode parity needs at least 1 step, got {steps}")
    gen = GenerationConfig(max_new_tokens=steps)  # greedy; no stop tokens: every row runs `steps`
    a = generate(got, dict(feeds), geo, cfg, gen, keep_logits=True)
    b = generate(ref, dict(feeds), geo, cfg, gen, keep_logits=True)
    check = check or f"{got.name} {dtype} vs {ref.name}, {steps} greedy steps"
    report = ParityReport()
    tokens_a, tokens_b = np.array(a.tokens), np.array(b.tokens)  # (B, steps)
    report.add(check, "tokens", tokens_a, tokens_b, 0)
    differ = np.flatnonzero((tokens_a != tokens_b).any(axis=0)) if tokens_a.shape == tokens_b.shape else [0]
    n = int(differ[0]) + 1 if len(differ) else len(b.step_logits)
    report.add(
        check,
        f"logits (steps 1..{n})",
        np.stack(a.step_logits[:n]),
        np.stack(b.step_logits[:n]),
        TRT_TOLERANCES[dtype],
    )
    for name in INDEX_OUTPUTS:
        report.add(check, name, getattr(a, name), getattr(b, name), 0)
    report.add(
        check,
        "cache lengths (per layer)",
        np.array(a.final_present_lengths),
        np.array(b.final_present_lengths),
        0,
    )
    return [r.to_dict() for r in report.rows]


def _engine_path(from_dir: Path, entry: Mapping[str, Any]) -> Path:
    path = Path(str(entry.get("path") or entry.get("file") or ""))
    return path if path.is_file() or path.is_absolute() else Path(from_dir) / path


def trt_decode_parity(
    manifest: Mapping[str, Any],
    from_dir: Path,
    feeds_list: Sequence[Mapping[str, Any]],
    steps: int = 4,
) -> list[dict[str, Any]]:
    """The TensorRT prefill + decode engines recorded in ``manifest["engines"]`` vs onnxruntime on
    ``from_dir``'s prefill.onnx + decode.onnx: :func:`decode_parity` per feed (greedy, ``steps``
    tokens), at the prefill engine's recorded dtype. Feeds: ``pixel_values``, ``input_ids``,
    ``attention_mask`` (e.g. ``validate.make_inputs``), cast to the graphs' dtypes here; their
    shapes must lie inside the engines' profiles (e.g. the profile's min and max batch).

    Raises ``MissingComponent`` where TensorRT or a GPU is missing, ``UsageError`` where the
    manifest records no decode engine or the engines are bf16 (onnxruntime takes no bfloat16
    numpy arrays).
    """
    ok, why = status.trt_status()
    if not ok:
        raise MissingComponent(f"{why}; TensorRT parity runs only where TensorRT and a CUDA GPU exist")
    from star_export.geometry import Geometry
    from star_export.manifest import star_config
    from star_export.runtime import OnnxruntimeBackend

    engines, graphs = manifest.get("engines") or {}, manifest["graphs"]
    missing = [g for g in ("prefill", "decode") if g not in engines or g not in graphs]
    if missing:
        raise UsageError(
            f"--from {from_dir}: no {' / '.join(missing)} engine in the manifest; run `build` first"
        )
    dtype = str(engines["prefill"].get("dtype", "fp32"))
    if dtype == "bf16":
        raise UsageError("decode parity against onnxruntime runs fp32/fp16 engines; these are bf16")
    contracts = {g: contract_from_dict(graphs[g]) for g in ("prefill", "decode")}
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    cfg = star_config(manifest, geo, f"--from {from_dir}")
    onnx = {g: Path(from_dir) / graphs[g].get("file", f"{g}.onnx") for g in ("prefill", "decode")}
    ref = OnnxruntimeBackend(onnx["prefill"], onnx["decode"])
    rows: list[dict[str, Any]] = []
    with TrtBackend(
        _engine_path(from_dir, engines["prefill"]),
        _engine_path(from_dir, engines["decode"]),
        contracts["prefill"],
        contracts["decode"],
    ) as got:
        for i, feeds in enumerate(feeds_list):
            cast = _feed(contracts["prefill"], feeds)
            check = f"tensorrt {dtype} vs onnxruntime, {steps} greedy steps (feed {i})"
            rows += decode_parity(got, ref, cast, geo, cfg, dtype, steps, check)
    return rows
