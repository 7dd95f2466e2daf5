"""``validate --trt --engines-only``: the TensorRT engine rows alone, against the export's recorded
report, without re-running the CPU checks.

``validate --trt`` re-runs every CPU check first (the rewrite vs the dynamic reference and the
unmodified model, onnxruntime, CPU generation; for a half-precision export the checkpoint a second
time in fp32): tens of GB and a long wait at 7B. ``--engines-only`` keeps from that run only what
the engine rows need:

- the PyTorch rewrite in the export's dtype (the checkpoint loaded ONCE, never in fp32 for a
  half-precision export). It cannot be replaced by outputs recorded at export time: where an
  engine picks other tokens within the margin, its logits and caches are compared with the
  rewrite FORCED to the engine's selection, and half-precision decoding feeds the engine's tokens
  to the rewrite; both depend on what the engine does.
- the selection margins and the inputs they were measured on, read from the export's report.json
  (``inputs.score_noise_per_keep[keep2].margins``, ``inputs.seed`` / ``batch`` / ``text_len``):
  the margins come from the fp16/bf16 rewrite vs the fp32 rewrite, which is the fp32 run this mode
  avoids. An fp32 export records none and uses ``selection.margin_for("float32")``, as
  ``validate --trt`` does.

The CPU rows of report.json are kept as recorded (not re-run) and its ``tensorrt`` rows replaced;
the verdict is the recorded one AND the engine rows', and the output says that the CPU checks were
not re-run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from star_export.errors import UsageError


def add_trt_flags(parser: argparse.ArgumentParser) -> None:
    """``validate``'s TensorRT flags: ``--trt`` and ``--engines-only``."""
    parser.add_argument(
        "--trt",
        action="store_true",
        help="also compare the TensorRT engines recorded in the manifest (needs TensorRT + a GPU)",
    )
    parser.add_argument(
        "--engines-only",
        action="store_true",
        help="with --trt (implied): run the engine rows alone, with the margins and inputs of the "
        "export's report.json; the CPU checks are not re-run (the checkpoint is loaded once, in the "
        "export's dtype); --batch-size / --text-len / --seed are taken from report.json where it records "
        "them (the margins were measured on those inputs)",
    )


def recorded_report(directory: Path) -> dict[str, Any]:
    """The export's report.json (written by ``llava`` / ``validate``), or a one-line UsageError."""
    path = Path(directory) / "report.json"
    if not path.is_file():
        raise UsageError(
            f"--engines-only: {path} not found (the export ran with --skip-validation?); run "
            f"`python -m star_export validate --from {directory}` once, or drop --engines-only"
        )
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--engines-only: {path} is not readable JSON ({e})") from None
    if not isinstance(report, dict) or "passed" not in report or "rows" not in report:
        raise UsageError(f"--engines-only: {path} is not a parity report (no 'passed' / 'rows')")
    return report


def recorded_margins(
    report: Mapping[str, Any], keep2s: Sequence[int], dtype: str, path: Path
) -> dict[int, tuple[float, float]]:
    """{keep2: (stage-1 margin, stage-2 margin)} the recorded report measured for every keep level;
    fp32 exports record none and get ``selection.margin_for("float32")`` (as ``validate --trt``)."""
    from star_export import selection

    if dtype == "float32":
        return {k: (selection.margin_for("float32"),) * 2 for k in keep2s}
    noise = (report.get("inputs") or {}).get("score_noise_per_keep") or {}
    out = {}
    for k in keep2s:
        entry = noise.get(str(k)) or noise.get(k)
        if not entry or len(entry.get("margins") or ()) != 2:
            raise UsageError(
                f"--engines-only: {path} records no selection margins for keep level {k} of this "
                f"{dtype} export; run `validate --from {path.parent}` once, or drop --engines-only"
            )
        out[k] = (float(entry["margins"][0]), float(entry["margins"][1]))
    return out


def cpu_passed(report: Mapping[str, Any]) -> bool:
    """The recorded verdict of the CPU checks alone (rows, graph scan, comparator; not an earlier
    run's TensorRT rows), as ``ParityReport.passed`` computes it."""
    graph, comparator = report.get("graph_check"), report.get("comparator")
    return (
        all(bool(r.get("passed")) for r in report.get("rows") or [])
        and (graph is None or bool(graph.get("ok")))
        and (comparator is None or bool(comparator.get("passed")))
    )


def _inputs(report: Mapping[str, Any], batch: int, text_len: int, seed: int) -> tuple[int, int, int]:
    """(batch, text_len, seed) the recorded margins were measured on (else the flags')."""
    rec = report.get("inputs") or {}
    return int(rec.get("batch", batch)), int(rec.get("text_len", text_len)), int(rec.get("seed", seed))


def run_engines_only(directory: Path, batch: int = 2, text_len: int = 24, seed: int = 0) -> int:
    """Engine rows of ``directory``'s TensorRT engines against the rewrite in the export's dtype, with
    the recorded margins and inputs; report.json updated (CPU rows kept as recorded). Prints the
    engine rows and the verdict; returns the exit code (0 PASS, 1 FAIL)."""
    import torch

    from star_export.comparison import make_inputs, row_alone
    from star_export.engines import parity, status
    from star_export.errors import MissingComponent
    from star_export.geometry import Geometry
    from star_export.load import load
    from star_export.manifest import levels, read_manifest
    from star_export.outputs import write_json
    from star_export.parity import ParityReport, ParityRow

    directory = Path(directory)
    manifest = read_manifest(directory)
    report = recorded_report(directory)
    ok, why = status.trt_status()
    if not ok:
        raise MissingComponent(f"--trt: {why}; run this command on a GPU host with TensorRT")
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    held = levels(manifest, geo, f"--from {directory}")
    dtype = str(manifest["graphs"][held[0].graph]["inputs"][0]["dtype"])
    margins = recorded_margins(report, [lv.cfg.keep2 for lv in held], dtype, directory / "report.json")
    batch, text_len, seed = _inputs(report, batch, text_len, seed)
    model = load(
        manifest["model"]["directory"], dtype=getattr(torch, dtype), options=manifest.get("layout") or {}
    ).model
    feeds = make_inputs(geo, batch=batch, text_len=text_len, seed=seed)
    rows = parity.trt_rows(manifest, directory, model, [feeds, row_alone(feeds, batch - 1)], margins)
    engines_ok = all(bool(r.get("passed")) for r in rows)
    cpu_ok = cpu_passed(report)
    report["tensorrt"] = rows
    report["tensorrt_engines_only"] = {
        "cpu_checks": "recorded, not re-run",
        "inputs": {"batch": batch, "text_len": text_len, "seed": seed},
        "margins_per_keep": {str(k): list(v) for k, v in margins.items()},
    }
    report["passed"] = cpu_ok and engines_ok
    write_json(directory / "report.json", report)
    shown = ParityReport(rows=[ParityRow(**r) for r in rows])
    print("\n".join(shown.format().splitlines()[:-1]))
    print(f"CPU checks: not re-run (--engines-only); recorded in report.json: {'PASS' if cpu_ok else 'FAIL'}")
    print(f"TensorRT engines: {'PASS' if engines_ok else 'FAIL'}")
    print(f"overall: {'PASS' if report['passed'] else 'FAIL'}")
    print(f"wrote {directory / 'report.json'}")
    return 0 if report["passed"] else 1
