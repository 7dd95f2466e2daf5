"""The Python API under the CLI: ``export`` a checkpoint with STAR pruning, then ``load_export`` it.

    import star_export
    result = star_export.export("llava-hf/llava-1.5-7b-hf", keep=64, out="star_out")  # or a directory
    result.passed, result.report.rows, result.manifest["star"]
    answers = star_export.load_export("star_out").generate(["cat.png"], ["What is in the image?"])

``export`` runs the whole way into ``out`` atomically, as the named stages of
:mod:`star_export.export_stages` (resolve settings -> load -> contracts -> export graphs -> share
weights -> scan -> validate -> write), and returns an :class:`ExportResult`; it raises
``UsageError`` for bad input before any weight is read. Nothing is printed unless ``log`` is given
(the CLI passes ``print``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from star_export.export_stages import DEFAULT_RECIPE as DEFAULT_RECIPE  # the session's default too
from star_export.export_stages import (
    ExportSettings,
    build_contracts,
    export_graphs,
    load_model,
    resolve_settings,
    scan_graphs,
    share_graph_weights,
    validate_graphs,
    write_outputs,
)
from star_export.export_stages import export_profile as export_profile
from star_export.progress import Log, Steps, quiet
from star_export.progress import quiet_libraries as quiet_libraries  # the CLI's and the session's too

OUTPUTS = (  # what an export owns in --out (names or patterns): a re-run replaces these, drops stale ones
    "prefill*.onnx",
    "prefill*.onnx.data",
    "decode.onnx",
    "decode.onnx.data",
    "weights.onnx.data",
    "processor",
    "manifest.json",
    "report.json",
)


@dataclass
class ExportResult:
    """What ``export`` wrote and measured."""

    out: Path
    written: list[str]  # entries of ``out`` this run wrote
    manifest: dict[str, Any]
    report: Any = None  # validate.ParityReport, None with validate=False
    scans: dict[str, Any] = field(default_factory=dict)  # graph -> check.CheckReport

    @property
    def scan_ok(self) -> bool:
        return all(s.ok for s in self.scans.values())

    @property
    def passed(self) -> bool:
        """The graph scans passed and, where validation ran, every parity check."""
        return self.scan_ok and (self.report is None or self.report.passed)


def export(
    model: str | Path | None = None,
    *,
    keep: int | Sequence[int] | str | None = None,
    keep1: int | Sequence[int] | None = None,
    layer: int | None = None,
    out: str | Path = "star_out",
    dtype: str | None = None,
    recipe: str | Path | None = None,
    grid: tuple[int, int] | None = None,
    image_size: int | tuple[int, int] | None = None,
    validate: bool = True,
    batch_size: int = 2,
    text_len: int = 24,
    seed: int = 0,
    profile: Mapping[str, Any] | None = None,
    log: Log | None = None,
    selection: str = "star",
) -> ExportResult:
    """Export ``model`` (a checkpoint directory, a hub id, or None: the recipe's embedded random model,
    or without a recipe the shipped trained demo model) with STAR pruning into ``out``: a prefill graph per keep level, one decode graph, the
    weights once (weights.onnx.data), processor/, manifest.json and (``validate``) report.json.

    keep: keep2, one level or several (``[32, 64, 128]``: one prefill graph each, the first the
    default; one decode graph serves them all), or a keep range ``"16:128"`` / ``"16:64:128"`` (one
    prefill graph whose TopK K is the length of its input ``keep_slots``; keep1 = min(N, 2*keep2));
    keep1: per level, default min(N, 2*keep); layer: K,
    the same for every level (defaults from the recipe, else 64 and 2). dtype: "fp32" | "fp16" | "bf16", default the checkpoint's own. grid / image_size: the
    family's static layout (``families``). batch_size / text_len / seed: the validation inputs.
    profile: overrides of the recipe's [profile] (``{"batch": (min, opt, max), "text_len": (...),
    "max_new_tokens": n}``, None for a bound not given): the graphs' dynamic-dim ranges in the
    manifest, the decode graph's past lengths, the Triton limits and the checks. selection: "star",
    or a baseline to measure STAR against (``star.SELECTIONS``; needs ``validate=False``). A full disk is a
    one-line ``DiskFull`` (a UsageError) naming ``out``; nothing is left half-written.
    """
    from star_export.atomic import disk_guard

    out = Path(out)
    need: dict[str, int] = {}  # the bytes an export writes at its peak, once the model is known
    with disk_guard(out, "--out", needed=lambda: need.get("bytes")):
        settings = resolve_settings(  # the arguments in the signature's order
            model, keep, keep1, layer, out, dtype, recipe, grid, image_size,
            validate, batch_size, text_len, seed, profile, selection,
        )  # fmt: skip
        return _run_stages(settings, out, log or quiet, need)


def _run_stages(settings: ExportSettings, out: Path, log: Log, need: dict[str, int]) -> ExportResult:
    """The stages after ``resolve_settings``, in order; the graphs and files staged beside ``out``
    and moved in only when every stage succeeded."""
    from star_export.outputs import staged

    steps = Steps(4 if settings.validate else 3, log)
    loaded = load_model(settings, steps)
    need["bytes"] = loaded.peak_bytes
    contracts = build_contracts(settings)
    with staged(out, owned=OUTPUTS) as stage:
        graphs = export_graphs(settings, loaded, contracts, stage, steps, log)
        share_graph_weights(graphs, log)
        scans = scan_graphs(contracts, graphs, steps, log)
        report = None
        if settings.validate:
            report = validate_graphs(settings, loaded, contracts, graphs, scans, steps, log)
        written = write_outputs(settings, contracts, graphs, report)
    return ExportResult(
        out=out,
        written=list(written.entries),
        manifest=written.manifest,
        report=report,
        scans=dict(scans.reports),
    )
