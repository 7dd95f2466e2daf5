"""Stage 5: parity, measured in one run, reported as numbers (``parity.ParityReport``).

On seeded random images and prompts, B >= 2 with the last row left padded:

1. **onnxruntime vs the PyTorch static rewrite** (polygraphy's ``Comparator.run``; fp32 also
   ``compare_accuracy``), the batch and the padded row alone: kept indices by the selection rule
   (``selection``: identical, or every disagreement within the dtype's margin of the cut), then
   logits and presents, compared directly where the selections are identical and with the
   rewrite FORCED to onnxruntime's indices where they differ;
2. **the static rewrite vs the dynamic reference** (``reference.py``, fp32): the same selection rule,
   logits within 1e-5 relative, presents on the real (non-padding) slots;
3. **keep1 = keep2 = N: the rewrite vs the unmodified transformers model**, logits within 1e-5;
4. **a left-padded row vs the same prompt alone**, in PyTorch and in onnxruntime;
5. **greedy generation** through prefill + decode, onnxruntime vs the rewrite.

fp32 exports: tolerances of ``contract.TOLERANCES``, margins of 8 ulps (the exact-index rule but
for scores within rounding of the cut). fp16 exports run the same checks with the rewrite in fp16
and in fp32 (``validate_half``): margins from the dtype's rounding emulated on the fp32 path
(``precision_noise``), forced-selection logits within 32 epsilons, teacher-forced generation. bf16
graphs do not run on onnxruntime's CPU provider: a ``skipped`` row and the verdict say so, and the
bf16 rewrite is checked against fp32. Relative errors are max|a - b| / max|b| over the tensor (b the reference side).

One comparison (seeded inputs, ``Rewrite``, ``check_side``) lives in ``comparison``; its names are
importable from here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from star_export import precision_noise, reference, selection
from star_export.comparison import (
    SHORT,
    Rewrite,
    cast_pixels,
    check_side,
    generation_rows,
    make_inputs,
    row_alone,
)
from star_export.contract import KEEP_INPUT, GraphContract
from star_export.families import family_of
from star_export.geometry import Geometry
from star_export.parity import ParityReport, ParityRow  # noqa: F401  (ParityRow: part of this API)
from star_export.star import StarConfig

INDEX_OUTPUTS = ("stage1_keep_idx", "stage2_keep_idx")
MARGIN_OUTPUTS = ("stage1_margin", "stage2_margin")
MARGIN_ATOL = 1e-6  # the margins are differences of scores <= 1: absolute, in score units


# ---------------------------------------------------------------------------- fp32


def validate(
    model: Any,
    geo: Geometry,
    cfg: StarConfig,
    contract: GraphContract,
    onnx_path: str | None,
    seed: int = 0,
    batch: int = 2,
    text_len: int = 24,
    unpruned: bool = True,
) -> ParityReport:
    """All fp32 parity checks in one run. ``onnx_path=None`` skips the onnxruntime side;
    ``unpruned=False`` skips keep = N vs the unmodified model (it does not depend on the keep level)."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    from star_export.runners import TorchRunner, onnxrt_runner

    family = family_of(geo)
    report = ParityReport()
    feeds = make_inputs(geo, batch=batch, text_len=text_len, seed=seed, keep=keep_input(contract, cfg))
    padded_row = batch - 1
    alone = row_alone(feeds, padded_row)
    report.inputs = _describe(feeds, geo, seed, text_len)
    module = family.prefill_module(model, geo, cfg).eval()
    rewrite = Rewrite(module, "float32")
    tol = contract.tolerances
    margin = selection.margin_for("float32")

    if onnx_path is not None:
        # 1. onnxruntime vs torch rewrite through polygraphy (the padded batch and the row alone)
        runners = [
            TorchRunner(module, contract, name="torch-rewrite"),
            onnxrt_runner(onnx_path, name="onnxruntime"),
        ]
        with G_LOGGER.verbosity(G_LOGGER.ERROR):
            results = Comparator.run(runners, data_loader=[feeds, alone])
        torch_out = [dict(it) for it in results[0][1]]
        ort_out = [dict(it) for it in results[1][1]]
        # polygraphy's verdict, elementwise |diff| <= tol * max|torch| (indices: exact)
        atol = {
            name: 0.0
            if name in INDEX_OUTPUTS
            else MARGIN_ATOL
            if name in MARGIN_OUTPUTS
            else tol["onnx_vs_torch_logits_rel"] * min(float(np.abs(it[name]).max()) for it in torch_out)
            for name in contract.output_names
        }
        with G_LOGGER.verbosity(G_LOGGER.ERROR), np.errstate(invalid="ignore", divide="ignore"):
            accuracy = Comparator.compare_accuracy(
                results,
                compare_func=SimpleCompareFunc(
                    atol=atol, rtol=0.0, check_error_stat="elemwise", infinities_compare_equal=True
                ),
            )
        report.comparator = {
            "passed": bool(accuracy),
            "atol": atol,
            "rtol": 0.0,
            "check_error_stat": "elemwise",
        }
        for it, (tag, f) in enumerate((("batch", feeds), ("row alone", alone))):
            check_side(
                report,
                f"onnxruntime vs torch ({tag})",
                ort_out[it],
                rewrite,
                f,
                (margin, margin),
                tol["onnx_vs_torch_logits_rel"],
            )

    # 2. rewrite vs the dynamic reference, every row (fp32)
    check_reference(report, model, family, geo, cfg, rewrite, feeds, tol["rewrite_vs_reference_logits_rel"])

    # 3. keep1 = keep2 = N: the rewrite equals the unmodified model on the expanded prompt
    if unpruned:
        check_unpruned(report, model, family, geo, cfg.layer, feeds, tol["rewrite_vs_hf_logits_rel"])

    # 4. a left-padded row equals the same prompt alone
    row = slice(padded_row, padded_row + 1)
    batch_run = rewrite.run(feeds)
    check_side(
        report,
        "padded row vs alone (torch)",
        batch_run,
        rewrite,
        alone,
        (margin, margin),
        tol["padded_vs_alone_logits_rel"],
        presents=False,
        rows=row,
    )
    if onnx_path is not None:
        check_side(
            report,
            "padded row vs alone (onnxruntime)",
            ort_out[0],
            Rewrite(module, "float32"),
            alone,
            (margin, margin),
            tol["padded_vs_alone_logits_rel"],
            presents=False,
            rows=row,
        )
    return report


def check_unpruned(
    report: ParityReport,
    model: Any,
    family: Any,
    geo: Geometry,
    layer: int,
    feeds: dict[str, np.ndarray],
    tolerance: float,
) -> None:
    """keep1 = keep2 = N: the rewrite's logits equal the unmodified transformers model's on the
    expanded prompt (each row alone, its padding stripped)."""
    pv, ids, mask = (torch.from_numpy(feeds[k]) for k in ("pixel_values", "input_ids", "attention_mask"))
    full_cfg = StarConfig(keep2=geo.n_visual, keep1=geo.n_visual, layer=layer)
    with torch.no_grad():
        full_logits = family.prefill_module(model, geo, full_cfg).eval()(pv, ids, mask)[0]
    rows = [[int(x) for x, m in zip(ids[b], mask[b], strict=True) if m] for b in range(ids.shape[0])]
    hf = [family.hf_unpruned_logits(model, geo, pv[b], r) for b, r in enumerate(rows)]
    report.add(
        "torch rewrite (keep=N) vs HF", "logits", full_logits.numpy(), torch.stack(hf).numpy(), tolerance
    )


def _describe(feeds: dict[str, np.ndarray], geo: Geometry, seed: int, text_len: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "batch": int(feeds["input_ids"].shape[0]),
        "text_len": text_len,
        "left_padding_per_row": [int((m == 0).sum()) for m in feeds["attention_mask"]],
        "image_position_per_row": [int(np.argmax(r == geo.image_token_id)) for r in feeds["input_ids"]],
    }


def check_reference(
    report: ParityReport,
    model: Any,
    family: Any,
    geo: Geometry,
    cfg: StarConfig,
    rewrite: Rewrite,
    feeds: dict[str, np.ndarray],
    tolerance: float,
) -> None:
    """The fp32 rewrite vs the dynamic reference: selections (margin: 8 ulps), logits, presents on the
    real slots; where a selection differs within the margin, the reference is forced to the rewrite's."""
    pv, ids, mask = (torch.from_numpy(feeds[k]) for k in ("pixel_values", "input_ids", "attention_mask"))
    t = rewrite.run(feeds)
    args = (model, family, geo, pv, ids, mask, cfg.keep1, cfg.keep2, cfg.layer)
    rows = reference.reference_batch(*args)
    check, margin = "torch rewrite vs reference", selection.margin_for("float32")
    scores1 = np.array([r.stage1_scores for r in rows])
    a1 = selection.compare(t["stage1_keep_idx"], np.array([r.stage1_keep_idx for r in rows]), scores1, margin)
    report.add_selection(check, "stage1_keep_idx", a1)
    if not a1.identical:
        rows = reference.reference_batch(*args, force1=t["stage1_keep_idx"])
    scores2 = np.full((len(rows), geo.n_visual), np.nan)
    for b, r in enumerate(rows):
        for j, s in r.stage2_scores.items():
            scores2[b, j] = s
    a2 = selection.compare(t["stage2_keep_idx"], np.array([r.stage2_keep_idx for r in rows]), scores2, margin)
    report.add_selection(check, "stage2_keep_idx", a2)
    same = a1.identical and a2.identical
    if not a2.identical:
        rows = reference.reference_batch(*args, force1=t["stage1_keep_idx"], force2=t["stage2_keep_idx"])
    rule = "tol" if same else "forced"
    report.add(check, "logits", t["logits"], torch.stack([r.logits for r in rows]).numpy(), tolerance, rule)
    got_kv, ref_kv = [], []
    for b, r in enumerate(rows):
        n_pad = int((feeds["attention_mask"][b] == 0).sum())
        for i, (k, v) in enumerate(r.presents):
            got_kv += [
                t[f"present.{i}.key"][b][:, n_pad:].ravel(),
                t[f"present.{i}.value"][b][:, n_pad:].ravel(),
            ]
            ref_kv += [k.float().numpy().ravel(), v.float().numpy().ravel()]
    report.add(
        check, "present.* (real slots)", np.concatenate(got_kv), np.concatenate(ref_kv), tolerance, rule
    )


# ---------------------------------------------------------------------------- half precision


def validate_half(
    model: Any,
    model32: Any,
    geo: Geometry,
    cfg: StarConfig,
    contract: GraphContract,
    onnx_path: str | None,
    dtype: str,
    seed: int = 0,
    batch: int = 2,
    text_len: int = 24,
    unpruned: bool = True,
) -> ParityReport:
    """A float16/bfloat16 export: the fp32 semantics (rewrite vs reference vs unmodified model), the
    rewrite in ``dtype`` vs fp32, and the graph in onnxruntime vs the rewrite in ``dtype`` and in
    fp32, by the selection-with-margin rule and forced-selection numerical parity."""
    family = family_of(geo)
    report = validate(
        model32, geo, cfg, contract, None, seed=seed, batch=batch, text_len=text_len, unpruned=unpruned
    )
    feeds = make_inputs(geo, batch=batch, text_len=text_len, seed=seed, keep=keep_input(contract, cfg))
    alone = row_alone(feeds, batch - 1)
    low = Rewrite(family.prefill_module(model, geo, cfg).eval(), dtype)
    full = Rewrite(family.prefill_module(model32, geo, cfg).eval(), "float32")
    tolerance = selection.logits_tolerance(dtype, 0.0)
    name = SHORT[dtype]

    noise = precision_noise.measure(low, full, feeds, (cfg.keep1, cfg.keep2))
    rlow = noise.pop("runs")["low"]
    report.inputs["score_noise"] = noise
    precision_noise.add_rows(report, noise, f"torch {name} vs torch fp32")
    margins = tuple(noise["margins"])
    check_side(report, f"torch {name} vs torch fp32 (batch)", rlow, full, feeds, margins, tolerance)

    if onnx_path is None:
        return report
    if dtype == "bfloat16":
        report.skip(
            "onnxruntime bf16 vs torch",
            "all outputs",
            "not checkable on CPU: onnxruntime's CPU provider has no bfloat16 kernels (Conv, MatMul); "
            "run `validate --trt` on a GPU host",
        )
        report.unchecked = "bf16 graph unchecked on this host: run `validate --trt` on a GPU host"
        return report
    from star_export.runners import onnxrt_runner

    session = onnxrt_runner(onnx_path, name="onnxruntime")
    with session:
        ort_batch = dict(session.infer(cast_pixels(feeds, dtype)))
        ort_alone = dict(session.infer(cast_pixels(alone, dtype)))
    for tag, got, f in (("batch", ort_batch, feeds), ("row alone", ort_alone, alone)):
        check_side(report, f"onnxruntime {name} vs torch {name} ({tag})", got, low, f, margins, tolerance)
    check_side(
        report, f"onnxruntime {name} vs torch fp32 (batch)", ort_batch, full, feeds, margins, tolerance
    )
    row = slice(batch - 1, batch)
    check_side(
        report,
        f"padded row vs alone (onnxruntime {name})",
        ort_batch,
        low,
        alone,
        margins,
        tolerance,
        presents=False,
        rows=row,
    )
    return report


# ---------------------------------------------------------------------------- generation


def validate_generation(
    report: ParityReport,
    model: Any,
    geo: Geometry,
    cfg: StarConfig,
    prefill: GraphContract,
    decode: GraphContract,
    prefill_path: str,
    decode_path: str,
    seed: int = 0,
    batch: int = 2,
    text_len: int = 24,
    steps: int = 8,
    dtype: str = "float32",
) -> None:
    """Greedy generation through prefill.onnx + decode.onnx vs the PyTorch rewrite (in ``dtype``)."""
    from star_export.runtime import OnnxruntimeBackend, TorchBackend

    feeds = dict(make_inputs(geo, batch=batch, text_len=text_len, seed=seed))  # generate feeds keep_slots
    generation_rows(
        report,
        "onnxruntime",
        OnnxruntimeBackend(prefill_path, decode_path),
        TorchBackend(model, geo, cfg, prefill, decode),
        feeds,
        geo,
        cfg,
        steps,
        dtype,
        prefill.tolerances["onnx_vs_torch_logits_rel"],
    )


def validate_export(
    model: Any,
    geo: Geometry,
    cfg: StarConfig,
    prefill: GraphContract,
    decode: GraphContract,
    paths: dict[str, Any],
    seed: int = 0,
    batch: int = 2,
    text_len: int = 24,
    model32: Any = None,
    unpruned: bool = True,
) -> ParityReport:
    """Every parity check of one keep level (``paths``: {"prefill": ..., "decode": ...} .onnx files).
    Half-precision exports need ``model32``, the same checkpoint in float32."""
    dtype = prefill.inputs[0].dtype
    kwargs = {"seed": seed, "batch": batch, "text_len": text_len, "unpruned": unpruned}
    if dtype == "float32":
        report = validate(model, geo, cfg, prefill, str(paths["prefill"]), **kwargs)
    else:
        report = validate_half(model, model32, geo, cfg, prefill, str(paths["prefill"]), dtype, **kwargs)
    if dtype != "bfloat16":
        validate_generation(
            report,
            model,
            geo,
            cfg,
            prefill,
            decode,
            str(paths["prefill"]),
            str(paths["decode"]),
            seed=seed,
            batch=batch,
            text_len=text_len,
            dtype=dtype,
        )
    return report


def validate_levels(
    model: Any,
    geo: Geometry,
    levels: list[tuple[StarConfig, GraphContract]],
    decode: GraphContract,
    directory: Path,
    seed: int = 0,
    batch: int = 2,
    text_len: int = 24,
    model32: Any = None,
) -> ParityReport:
    """Every keep level of an export in ``directory`` (its prefill graph ``<graph>.onnx`` and the
    shared decode.onnx), the model loaded once: one report, a row group per level (rows prefixed
    ``keep K2:`` when there are several); keep = N vs the unmodified model runs once."""
    levels = [(at, pc) for cfg, pc in levels for at in range_points(cfg)]
    several = len(levels) > 1
    merged = ParityReport()
    for i, (cfg, pc) in enumerate(levels):
        paths = {"prefill": Path(directory) / f"{pc.graph}.onnx", "decode": Path(directory) / "decode.onnx"}
        report = validate_export(
            model, geo, cfg, pc, decode, paths, seed, batch, text_len, model32=model32, unpruned=i == 0
        )
        for row in report.rows:
            if several:
                row.check = f"keep {cfg.keep2}: {row.check}"
            merged.rows.append(row)
        if i == 0:
            merged.inputs = dict(report.inputs)
        merged.unchecked = merged.unchecked or report.unchecked
        if "score_noise" in report.inputs:
            merged.inputs.setdefault("score_noise_per_keep", {})[cfg.keep2] = report.inputs["score_noise"]
        if report.comparator is not None:
            comparators = merged.comparator or {"passed": True, "per_keep": {}}
            comparators["passed"] = comparators["passed"] and report.comparator["passed"]
            comparators["per_keep"][cfg.keep2] = report.comparator
            merged.comparator = comparators
    return merged


def range_points(cfg: StarConfig) -> list[StarConfig]:
    """The levels a prefill graph is validated at: the level itself, or a keep range's default keep
    and both ends (each checked against the constant-K rewrite of that keep)."""
    if cfg.keep_range is None:
        return [cfg]
    return [cfg.at(k) for k in dict.fromkeys((cfg.keep2, *cfg.keep_range))]


def keep_input(contract: GraphContract, cfg: StarConfig) -> int | None:
    """The length of ``keep_slots`` to feed a graph of ``contract`` at level ``cfg`` (None: no such input)."""
    return cfg.keep2 if KEEP_INPUT in contract.input_names else None


def validate_directory(
    directory: Any, trt: bool = False, batch: int = 2, text_len: int = 24, seed: int = 0
) -> ParityReport:
    """The parity checks of an export directory, every keep level, from its manifest (the checkpoint
    it names is loaded once, in the export's dtype and, for half-precision exports, in fp32); ``trt``
    adds the TensorRT engines recorded in the manifest. Writes report.json."""
    from star_export.contract import contract_from_dict
    from star_export.load import load
    from star_export.manifest import levels as manifest_levels
    from star_export.manifest import read_manifest
    from star_export.outputs import write_json

    directory = Path(directory)
    manifest = read_manifest(directory)
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    held = manifest_levels(manifest, geo, f"--from {directory}")
    pcs = [(lv.cfg, contract_from_dict(manifest["graphs"][lv.graph])) for lv in held]
    dc = contract_from_dict(manifest["graphs"]["decode"])
    if trt:
        from star_export.engines import trt_status

        ok, why = trt_status()
        if not ok:
            from star_export.errors import MissingComponent

            raise MissingComponent(f"--trt: {why}; run this command on a GPU host with TensorRT")
    dtype = pcs[0][1].inputs[0].dtype
    layout = manifest.get("layout") or {}
    model_dir = manifest["model"]["directory"]
    loaded = load(model_dir, dtype=getattr(torch, dtype), options=layout)
    model32 = None if dtype == "float32" else load(model_dir, options=layout).model
    report = validate_levels(
        loaded.model, geo, pcs, dc, directory, seed=seed, batch=batch, text_len=text_len, model32=model32
    )
    if trt:
        from star_export.engines.parity import trt_rows

        feeds = make_inputs(geo, batch=batch, text_len=text_len, seed=seed)
        # each level's engine is judged with the margins measured for that level (half precision)
        noise = report.inputs.get("score_noise_per_keep") or {}
        margins = {int(k): tuple(v["margins"]) for k, v in noise.items()} or (
            (selection.margin_for("float32"),) * 2
        )
        report.trt = trt_rows(
            manifest, directory, loaded.model, [feeds, row_alone(feeds, batch - 1)], margins
        )
        report.unchecked = None  # the engines built from the graphs ran
    write_json(directory / "report.json", report.to_dict())
    return report
