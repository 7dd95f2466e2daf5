"""TensorRT engines against the PyTorch rewrite: prefill and decode parity rows (``validate --trt``),
for every keep level of an export (its own prefill engine, the shared decode engine).

The same criterion as every other parity check (``selection``, ``comparison.check_side``): kept
indices agree when identical or when every disagreement lies within the margin of the cut (the
margins ``validate`` measured for the export's dtype); logits and presents are compared directly
where the selections are identical and with the rewrite forced to the engine's selection where
they differ; decoding runs a few greedy steps (fp32: tokens identical; fp16/bf16: the rewrite fed
the engine's tokens). Tolerances: fp32 1e-4 relative (TF32 is off, only kernel order differs);
fp16/bf16 ``selection.logits_tolerance`` (32 epsilons of the dtype).

:class:`TrtBackend` is the thin TensorRT side: polygraphy ``TrtRunner`` per engine behind
``runtime.Backend`` (``prefill(feeds)`` / ``decode(feeds)``), so ``runtime.generate`` drives the
engines with the per-layer caches they return.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from star_export.contract import GraphContract, contract_from_dict
from star_export.engines import status
from star_export.errors import MissingComponent, UsageError

TRT_TOLERANCES: Mapping[str, float] = {"fp32": 1e-4}  # half precision: selection.logits_tolerance
ELEMENT = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _feed(contract: GraphContract, feeds: Mapping[str, Any]) -> dict[str, Any]:
    """The contract's inputs cast to its dtypes (``encoding.cast_inputs``; bfloat16 as torch tensors:
    numpy has no bfloat16). Casting twice is harmless: a bf16 tensor stays one."""
    from star_export.encoding import cast_inputs, declared_dtypes
    from star_export.runtime import as_bfloat16

    return cast_inputs(
        {n: feeds[n] for n in contract.input_names}, declared_dtypes(contract.inputs), as_bfloat16
    )


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


def _engine_path(from_dir: Path, entry: Mapping[str, Any]) -> Path:
    path = Path(str(entry.get("path") or entry.get("file") or ""))
    return path if path.is_file() or path.is_absolute() else Path(from_dir) / path


def _level_margins(
    margins: tuple[float, float] | Mapping[int, Sequence[float]], keep2: int
) -> tuple[float, float]:
    if isinstance(margins, Mapping):
        if keep2 not in margins:
            raise UsageError(f"no selection margins for keep level {keep2}")
        m = margins[keep2]
        return (float(m[0]), float(m[1]))
    return (float(margins[0]), float(margins[1]))


def engine_margins(margins: tuple[float, float], engine_dtype: str, export_dtype: str) -> tuple[float, float]:
    """The selection margins an engine is judged with: the export's (measured for its dtype), widened
    to ``selection.margin_for(engine_dtype)`` where the engine computes in a lower precision than the
    export (``build --dtype fp16`` on an fp32 export, TensorRT 10's FP16 builder flag): a flip
    within fp16 rounding of the cut is then a near-tie, as it is for an fp16 export."""
    from star_export import selection

    if selection.PRECISION[engine_dtype] <= selection.PRECISION[export_dtype]:
        return margins
    floor = selection.margin_for(engine_dtype)
    return (max(margins[0], floor), max(margins[1], floor))


def trt_rows(
    manifest: Mapping[str, Any],
    from_dir: Path,
    model: Any,
    feeds_list: Sequence[Mapping[str, Any]],
    margins: tuple[float, float] | Mapping[int, Sequence[float]],
    steps: int = 4,
) -> list[dict[str, Any]]:
    """The TensorRT engines recorded in ``manifest["engines"]`` (one prefill engine per keep level,
    keyed by the level's graph name, and the decode engine) against the PyTorch rewrite of ``model``
    (the checkpoint in the export's dtype), by the criterion of every other parity check
    (``comparison.check_side``, ``comparison.generation_rows``), for EVERY keep level with that level's
    engine: kept indices by the selection-with-margin rule (``margins``: stage 1, stage 2; one pair
    for all levels or {keep2: pair}; widened by :func:`engine_margins` where the engine's precision is
    lower than the export's), logits and presents directly or with the rewrite forced to the
    engine's selection; then ``steps`` greedy decode steps through the shared decode engine (fp32:
    tokens identical; fp16/bf16: teacher-forced). With several levels every row's check starts with
    ``keep K2:``, as ``validate_levels`` names its rows.

    Raises ``MissingComponent`` where TensorRT or a GPU is missing, ``UsageError`` where the
    manifest records no engine for a level's prefill graph or for decode.
    """
    from star_export.comparison import SHORT, Rewrite, check_side, generation_rows
    from star_export.families import family_of
    from star_export.geometry import Geometry
    from star_export.manifest import levels
    from star_export.parity import ParityReport
    from star_export.runtime import TorchBackend
    from star_export.selection import logits_tolerance

    ok, why = status.trt_status()
    if not ok:
        raise MissingComponent(f"{why}; TensorRT parity runs only where TensorRT and a CUDA GPU exist")
    engines, graphs = manifest.get("engines") or {}, manifest["graphs"]
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    held = levels(dict(manifest), geo, f"--from {from_dir}")
    names = [lv.graph for lv in held]
    missing = [g for g in (*names, "decode") if g not in engines or g not in graphs]
    if missing:
        raise UsageError(
            f"--from {from_dir}: no {' / '.join(missing)} engine in the manifest; run `build` first"
        )
    dtype = ELEMENT.get(str((engines.get(names[0]) or {}).get("dtype", "fp32")), "float32")
    decode = contract_from_dict(graphs["decode"])
    family = family_of(geo)
    model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    tol = logits_tolerance(dtype, TRT_TOLERANCES["fp32"])
    several = len(held) > 1
    rows = []
    for level in held:
        cfg = level.cfg
        prefill = contract_from_dict(graphs[level.graph])
        level_margins = engine_margins(_level_margins(margins, cfg.keep2), dtype, model_dtype)
        report = ParityReport()
        rewrite = Rewrite(family.prefill_module(model, geo, cfg).eval(), model_dtype)
        backend = TrtBackend(
            _engine_path(from_dir, engines[level.graph]),
            _engine_path(from_dir, engines["decode"]),
            prefill,
            decode,
        )
        with backend as got:
            name = f"{got.name} {SHORT[dtype]}"
            for i, feeds in enumerate(feeds_list):
                out = got.prefill(dict(feeds))  # the backend casts to the contract's dtypes
                check_side(
                    report,
                    f"{name} vs torch {SHORT[model_dtype]} (feed {i})",
                    out,
                    rewrite,
                    dict(feeds),
                    level_margins,
                    tol,
                )
            ref = TorchBackend(model, geo, cfg, prefill, decode)
            generation_rows(
                report, name, got, ref, dict(feeds_list[0]), geo, cfg, steps, dtype, TRT_TOLERANCES["fp32"]
            )
        for row in report.rows:
            if several:
                row.check = f"keep {cfg.keep2}: {row.check}"
            rows.append(row.to_dict())
    return rows
