"""Stage 5: parity, measured in one run, reported as numbers.

Checks (STAR_SPEC.md, issue #2), on seeded random images and prompts, B = 2 with left padding:
  1. onnxruntime vs the PyTorch static rewrite (through polygraphy's Comparator): kept indices
     identical, logits max|diff| <= 1e-4 * max|logit|, presents reported the same way;
  2. the static rewrite vs the dynamic reference (``reference.py``): indices identical, logits
     within 1e-5 relative, presents compared on the real (non-padding) slots;
  3. with keep1 = keep2 = N: the rewrite vs the unmodified LlavaForConditionalGeneration on the
     expanded prompt, logits within 1e-5 relative;
  4. a left-padded row vs the same prompt run alone, in PyTorch and in onnxruntime.
Relative errors are max|a - b| / max|b| over the tensor (b the reference side).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from star_export import reference
from star_export.contract import GraphContract
from star_export.families import family_of
from star_export.geometry import Geometry
from star_export.runners import TorchRunner, onnxrt_runner
from star_export.star import StarConfig

INDEX_OUTPUTS = ("stage1_keep_idx", "stage2_keep_idx")


@dataclass
class ParityRow:
    check: str
    output: str
    max_abs: float
    max_rel: float  # max|diff| / max|reference|
    tolerance: float  # bound on max_rel; 0 means exact equality
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ParityReport:
    rows: list[ParityRow] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    graph_check: dict[str, Any] | None = None
    comparator: dict[str, Any] | None = None  # polygraphy's compare_accuracy verdict
    trt: list[dict[str, Any]] | None = None  # TensorRT engine vs onnxruntime rows (build.trt_parity)

    @property
    def passed(self) -> bool:
        graph_ok = self.graph_check is None or self.graph_check.get("ok", False)
        comparator_ok = self.comparator is None or self.comparator.get("passed", False)
        trt_ok = self.trt is None or all(r.get("passed", False) for r in self.trt)
        return graph_ok and comparator_ok and trt_ok and all(r.passed for r in self.rows)

    def add(self, check: str, output: str, got: np.ndarray, ref: np.ndarray, tolerance: float) -> ParityRow:
        got = np.asarray(got)
        ref = np.asarray(ref)
        if got.shape != ref.shape:
            row = ParityRow(check, output, float("inf"), float("inf"), tolerance, False)
        else:
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            max_abs = float(diff.max()) if diff.size else 0.0
            scale = float(np.abs(ref.astype(np.float64)).max()) if ref.size else 0.0
            max_rel = max_abs / scale if scale > 0 else max_abs
            passed = max_abs == 0.0 if tolerance == 0 else max_rel <= tolerance
            row = ParityRow(check, output, max_abs, max_rel, tolerance, passed)
        self.rows.append(row)
        return row

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "inputs": self.inputs,
            "rows": [r.to_dict() for r in self.rows],
            "graph_check": self.graph_check,
            "comparator": self.comparator,
            "tensorrt": self.trt,
        }

    def format(self) -> str:
        lines = [f"{'check':<40} {'output':<22} {'max abs':>10} {'max rel':>10} {'tol':>8}  result"]
        for r in self.rows:
            tol = "exact" if r.tolerance == 0 else f"{r.tolerance:.0e}"
            lines.append(
                f"{r.check:<40} {r.output:<22} {r.max_abs:>10.2e} {r.max_rel:>10.2e} {tol:>8}  "
                f"{'ok' if r.passed else 'FAIL'}"
            )
        if self.comparator is not None:
            lines.append(
                f"{'polygraphy compare_accuracy':<40} {'all outputs':<22} {'':>10} {'':>10} {'':>8}  "
                f"{'ok' if self.comparator.get('passed') else 'FAIL'}"
            )
        if self.graph_check is not None:
            g = self.graph_check
            lines.append(
                f"{'graph scan (TensorRT readiness)':<40} {'all graphs':<22} {'':>10} {'':>10} {'':>8}  "
                f"{'ok' if g.get('ok') else 'FAIL'}"
            )
        lines.append(f"overall: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


def make_inputs(
    geo: Geometry, batch: int = 2, text_len: int = 24, pad: int = 5, seed: int = 0
) -> OrderedDict[str, np.ndarray]:
    """Seeded random images and prompts: row 0 full length, the other rows left padded by ``pad``.

    Each row holds one image placeholder with at least 2 real tokens before it and 2 after.
    """
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, *geo.pixel_shape, generator=g)
    low = 3
    ids = torch.randint(low, geo.vocab_size, (batch, text_len), generator=g)
    ids[ids == geo.image_token_id] = low
    mask = torch.ones(batch, text_len, dtype=torch.int64)
    for b in range(batch):
        n_pad = 0 if b == 0 else min(pad, text_len - 5)
        mask[b, :n_pad] = 0
        ids[b, :n_pad] = 0
        p = int(torch.randint(n_pad + 2, text_len - 2, (1,), generator=g))
        ids[b, p] = geo.image_token_id
    return OrderedDict(pixel_values=pixel_values.numpy(), input_ids=ids.numpy(), attention_mask=mask.numpy())


def row_alone(feeds: OrderedDict[str, np.ndarray], b: int) -> OrderedDict[str, np.ndarray]:
    """Row b with its padding stripped, as a batch of one."""
    keep = feeds["attention_mask"][b].astype(bool)
    return OrderedDict(
        pixel_values=feeds["pixel_values"][b : b + 1],
        input_ids=feeds["input_ids"][b : b + 1, keep],
        attention_mask=feeds["attention_mask"][b : b + 1, keep],
    )


def validate(
    model: Any,
    geo: Geometry,
    cfg: StarConfig,
    contract: GraphContract,
    onnx_path: str | None,
    seed: int = 0,
    batch: int = 2,
    text_len: int = 24,
) -> ParityReport:
    """All parity checks in one run. ``onnx_path=None`` skips the onnxruntime side."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    report = ParityReport()
    feeds = make_inputs(geo, batch=batch, text_len=text_len, seed=seed)
    padded_row = batch - 1
    alone = row_alone(feeds, padded_row)
    report.inputs = {
        "seed": seed,
        "batch": batch,
        "text_len": text_len,
        "left_padding_per_row": [int((m == 0).sum()) for m in feeds["attention_mask"]],
        "image_position_per_row": [int(np.argmax(r == geo.image_token_id)) for r in feeds["input_ids"]],
    }
    family = family_of(geo)
    rewrite = family.prefill_module(model, geo, cfg).eval()
    runners = [TorchRunner(rewrite, contract, name="torch-rewrite")]
    if onnx_path is not None:
        runners.append(onnxrt_runner(onnx_path, name="onnxruntime"))
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = Comparator.run(runners, data_loader=[feeds, alone])
    torch_out = [dict(it) for it in results[0][1]]  # per iteration: {name: array}

    # 1. onnxruntime vs torch rewrite: both iterations (the padded batch and the row alone)
    if onnx_path is not None:
        # polygraphy's verdict, elementwise |diff| <= tol * max|torch| (indices: exact)
        tol = contract.tolerances["onnx_vs_torch_logits_rel"]
        atol = {
            name: 0.0
            if name in INDEX_OUTPUTS
            else tol * min(float(np.abs(it[name]).max()) for it in torch_out)
            for name in contract.output_names
        }
        with G_LOGGER.verbosity(G_LOGGER.ERROR), np.errstate(invalid="ignore", divide="ignore"):
            accuracy = Comparator.compare_accuracy(
                results, compare_func=SimpleCompareFunc(atol=atol, rtol=0.0, check_error_stat="elemwise")
            )
        report.comparator = {
            "passed": bool(accuracy),
            "atol": atol,
            "rtol": 0.0,
            "check_error_stat": "elemwise",
        }
        ort_out = [dict(it) for it in results[1][1]]
        for it, tag in ((0, "batch"), (1, "row alone")):
            t, o = torch_out[it], ort_out[it]
            check = f"onnxruntime vs torch ({tag})"
            for name in INDEX_OUTPUTS:
                report.add(check, name, o[name], t[name], 0)
            report.add(
                check, "logits", o["logits"], t["logits"], contract.tolerances["onnx_vs_torch_logits_rel"]
            )
            worst = _worst_present(contract, o, t)
            report.add(check, "present.* (worst)", *worst, contract.tolerances["onnx_vs_torch_logits_rel"])

    # 2. rewrite vs the dynamic reference, every row
    pv, ids, mask = (torch.from_numpy(feeds[k]) for k in contract.input_names)
    rows = reference.reference_batch(model, family, geo, pv, ids, mask, cfg.keep1, cfg.keep2, cfg.layer)
    check = "torch rewrite vs reference"
    t = torch_out[0]
    report.add(check, "stage1_keep_idx", t["stage1_keep_idx"], np.array([r.stage1_keep_idx for r in rows]), 0)
    report.add(check, "stage2_keep_idx", t["stage2_keep_idx"], np.array([r.stage2_keep_idx for r in rows]), 0)
    report.add(
        check,
        "logits",
        t["logits"],
        torch.stack([r.logits for r in rows]).numpy(),
        contract.tolerances["rewrite_vs_reference_logits_rel"],
    )
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
        check,
        "present.* (real slots)",
        np.concatenate(got_kv),
        np.concatenate(ref_kv),
        contract.tolerances["rewrite_vs_reference_logits_rel"],
    )

    # 3. keep1 = keep2 = N: the rewrite equals the unmodified model on the expanded prompt
    full_cfg = StarConfig(keep2=geo.n_visual, keep1=geo.n_visual, layer=cfg.layer)
    with torch.no_grad():
        full_logits = family.prefill_module(model, geo, full_cfg).eval()(pv, ids, mask)[0]
    hf = []
    for b in range(batch):
        real = [int(x) for x, m in zip(ids[b], mask[b], strict=True) if m]
        hf.append(family.hf_unpruned_logits(model, geo, pv[b], real))
    report.add(
        "torch rewrite (keep=N) vs HF",
        "logits",
        full_logits.numpy(),
        torch.stack(hf).numpy(),
        contract.tolerances["rewrite_vs_hf_logits_rel"],
    )

    # 4. a left-padded row equals the same prompt alone (torch; onnxruntime below)
    check = "padded row vs alone (torch)"
    for name in (*INDEX_OUTPUTS, "logits"):
        tol = 0 if name in INDEX_OUTPUTS else contract.tolerances["padded_vs_alone_logits_rel"]
        report.add(check, name, torch_out[0][name][padded_row : padded_row + 1], torch_out[1][name], tol)
    if onnx_path is not None:
        check = "padded row vs alone (onnxruntime)"
        for name in (*INDEX_OUTPUTS, "logits"):
            tol = 0 if name in INDEX_OUTPUTS else contract.tolerances["padded_vs_alone_logits_rel"]
            report.add(check, name, ort_out[0][name][padded_row : padded_row + 1], ort_out[1][name], tol)
    return report


def _worst_present(contract: GraphContract, got: dict, ref: dict) -> tuple[np.ndarray, np.ndarray]:
    """The present tensor pair with the largest relative difference."""
    best, best_rel = None, -1.0
    for spec in contract.outputs:
        if not spec.name.startswith("present."):
            continue
        g, r = got[spec.name], ref[spec.name]
        rel = float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30))
        if rel > best_rel:
            best, best_rel = (g, r), rel
    return best


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
) -> None:
    """Greedy generation through prefill.onnx + decode.onnx vs the PyTorch rewrite: tokens
    identical, logits of every step within the onnxruntime tolerance, cache lengths L1/L2 + steps."""
    from star_export.runtime import GenerationConfig, OnnxruntimeBackend, TorchBackend, generate

    feeds = dict(make_inputs(geo, batch=batch, text_len=text_len, seed=seed))
    gen = GenerationConfig(max_new_tokens=steps)
    got = generate(OnnxruntimeBackend(prefill_path, decode_path), feeds, geo, cfg, gen, keep_logits=True)
    ref = generate(TorchBackend(model, geo, cfg, prefill, decode), feeds, geo, cfg, gen, keep_logits=True)
    check = f"generate onnxruntime vs torch ({steps} greedy)"
    report.add(check, "tokens", np.array(got.tokens), np.array(ref.tokens), 0)
    report.add(
        check,
        "logits (every step)",
        np.stack(got.step_logits),
        np.stack(ref.step_logits),
        prefill.tolerances["onnx_vs_torch_logits_rel"],
    )
    expect = [
        text_len - 1 + geo.span(cfg.keep1 if i < cfg.layer else cfg.keep2) + steps - 1
        for i in range(geo.num_layers)
    ]
    report.add(check, "cache lengths L1/L2+t", np.array(got.final_present_lengths), np.array(expect), 0)


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
) -> ParityReport:
    """Every parity check of an export (``paths``: {"prefill": ..., "decode": ...} .onnx files)."""
    report = validate(
        model, geo, cfg, prefill, str(paths["prefill"]), seed=seed, batch=batch, text_len=text_len
    )
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
    )
    return report


def validate_directory(
    directory: Any, trt: bool = False, batch: int = 2, text_len: int = 24, seed: int = 0
) -> ParityReport:
    """The parity checks of an export directory, from its manifest (the checkpoint it names is loaded
    again); ``trt`` adds the TensorRT engines recorded in the manifest. Writes report.json."""
    from pathlib import Path

    from star_export.build import trt_parity, trt_status
    from star_export.contract import contract_from_dict
    from star_export.errors import MissingComponent, UsageError
    from star_export.load import load
    from star_export.manifest import read_manifest, star_config
    from star_export.outputs import write_json

    directory = Path(directory)
    manifest = read_manifest(directory)
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    cfg = star_config(manifest, geo, f"--from {directory}")
    pc = contract_from_dict(manifest["graphs"]["prefill"])
    dc = contract_from_dict(manifest["graphs"]["decode"])
    engines = manifest.get("engines") or {}
    if trt:
        ok, why = trt_status()
        if not ok:
            raise MissingComponent(f"--trt: {why}; run this command on a GPU host with TensorRT")
        if "prefill" not in engines:
            raise UsageError(f"--from {directory}: no engines in the manifest; run `build` first")
    paths = {"prefill": directory / "prefill.onnx", "decode": directory / "decode.onnx"}
    dtype = manifest["graphs"]["prefill"].get("dtype", "float32")
    if dtype != "float32":
        # reduced precision: no CPU reference of the same dtype; TensorRT vs onnxruntime only
        if not trt:
            raise UsageError(f"--from {directory}: a {dtype} export is validated against TensorRT: add --trt")
        feeds = make_inputs(geo, batch=batch, text_len=text_len, seed=seed)
        feeds["pixel_values"] = feeds["pixel_values"].astype(dtype if dtype != "bfloat16" else "float32")
        report = ParityReport(inputs={"seed": seed, "batch": batch, "text_len": text_len})
        report.trt = trt_parity(
            Path(engines["prefill"]["path"]),
            paths["prefill"],
            pc,
            [feeds],
            engines["prefill"].get("dtype", "fp16"),
        )
        write_json(directory / "report.json", report.to_dict())
        return report
    loaded = load(manifest["model"]["directory"], options=manifest.get("layout") or {})
    report = validate_export(loaded.model, geo, cfg, pc, dc, paths, seed=seed, batch=batch, text_len=text_len)
    if trt:
        feeds = make_inputs(geo, batch=batch, text_len=text_len, seed=seed)
        report.trt = trt_parity(
            Path(engines["prefill"]["path"]),
            paths["prefill"],
            pc,
            [feeds, row_alone(feeds, batch - 1)],
            engines["prefill"].get("dtype", "fp32"),
        )
    write_json(directory / "report.json", report.to_dict())
    return report
