"""``export`` as named stages, each a function that returns a small result the next one takes:

    resolve_settings -> load_model -> build_contracts -> export_graphs -> share_graph_weights
      -> scan_graphs -> validate_graphs -> write_outputs

``resolve_settings`` reads config.json only: every bad argument is a one-line ``UsageError``
before any weight is read. The stages from ``export_graphs`` on write into one staging directory
(``outputs.staged``, which ``api.export`` opens), so a failure leaves nothing half-written.
No stage calls an earlier one; what a later stage needs travels in the results.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from star_export.errors import UsageError
from star_export.progress import Log, Steps, heartbeat, quiet_libraries

DEFAULT_RECIPE = "llava-tiny"  # the embedded random model of the fast tests (--recipe llava-tiny)
GENERIC_PROFILE = {"batch": [1, 2, 8], "text_len": [2, 64, 512]}
DTYPES = {"fp32": ("float32", "float32"), "fp16": ("float16", "float16"), "bf16": ("bfloat16", "bfloat16")}
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "generation_config.json",
)


# ------------------------------------------------------------------------ 1. resolve settings


@dataclass(frozen=True)
class ExportSettings:
    """The checked arguments and the checkpoint's static layout: what every later stage reads."""

    model_dir: Path
    source: str  # "recipe:llava-tiny", a hub id or the directory
    family: Any  # the family module (star_export.families)
    layout: Mapping[str, Any]  # the family's layout options (the recipe's, overridden by the flags)
    geo: Any  # geometry.Geometry
    levels: tuple[Any, ...]  # star.StarConfig per keep level, the first the default
    dtype: str  # "fp32" | "fp16" | "bf16"
    batch: tuple[int, int, int]  # the profile's (min, opt, max)
    text_range: tuple[int, int, int]
    max_new_tokens: int
    validate: bool
    batch_size: int  # the validation inputs
    text_len: int
    seed: int

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, DTYPES[self.dtype][0])

    @property
    def onnx_dtype(self) -> str:
        return DTYPES[self.dtype][1]

    @property
    def several(self) -> bool:
        return len(self.levels) > 1

    def describe(self) -> str:
        geo = self.geo
        return (
            f"{self.source}: {self.family.describe(geo)}, {geo.num_layers} layers, "
            f"heads {geo.num_heads}/{geo.num_kv_heads} kv; "
            + "; ".join(
                f"keep1={c.keep1} keep2={c.keep2}"
                if c.keep_range is None
                else f"keep2 {c.keep_range[0]}..{c.keep_range[1]} (default {c.keep2})"
                for c in self.levels
            )
            + f"; K={self.levels[0].layer}"
        )


def resolve_settings(
    model: str | Path | None,
    keep: int | Sequence[int] | None,
    keep1: int | Sequence[int] | None,
    layer: int | None,
    out: Path,
    dtype: str | None,
    recipe: str | Path | None,
    grid: tuple[int, int] | None,
    image_size: int | tuple[int, int] | None,
    validate: bool,
    batch_size: int,
    text_len: int,
    seed: int,
    profile: Mapping[str, Any] | None,
    selection: str = "star",
) -> ExportSettings:
    """Check every argument against the recipe and config.json (no weight is read)."""
    if validate and selection != "star":
        raise UsageError(
            f"selection {selection!r} is a baseline: validation re-derives STAR's own choice, "
            "so export it with validate=False"
        )
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    from star_export.outputs import check_out_dir

    check_out_dir(out)  # before any weight is read
    quiet_libraries()
    model_dir, source, rec, family = _resolve_source(model, recipe)

    from star_export.load import auto_config, checkpoint_dtype, geometry_of
    from star_export.star import StarConfig

    defaults = rec.star if rec else {}
    default_keep = int(defaults.get("keep", 64))
    if isinstance(keep, str) and ":" not in keep:  # "32,64,128" as the command line writes levels
        keep = [int(v) for v in keep.split(",")]
    keeps, keep1s = _keep_levels(keep, keep1, default_keep) if not isinstance(keep, str) else ([], [])
    layer = layer if layer is not None else int(defaults.get("layer", 2))
    export_dtype = dtype or checkpoint_dtype(model_dir)
    given = {k: v for k, v in {"grid": grid, "image_size": image_size}.items() if v is not None}
    layout = {**(rec.layout if rec else {}), **given}  # the flags override the recipe's layout
    config = auto_config(model_dir)
    geo = geometry_of(family, config, layout, model_dir)
    family.check_layout(model_dir, geo)
    levels = tuple(
        StarConfig.resolve(
            keep=k,
            keep1=k1,
            layer=layer,
            n_visual=geo.n_visual,
            num_layers=geo.num_layers,
            selection=selection,
        )
        for k, k1 in zip(keeps, keep1s, strict=True)
    )
    if isinstance(keep, str):  # a keep range: one prefill graph, keep2 from keep_slots' length
        levels = (keep_range_level(keep, keep1, layer, default_keep, geo),)
    batch, text_range, max_new = export_profile(rec.profile if rec else {}, profile or {}, batch_size)
    t_hi = text_range[2]
    if not 5 <= text_len <= t_hi:
        raise UsageError(f"--text-len must be in 5..{t_hi} (the profile's max text length), got {text_len}")
    family.check_profile(config, geo, t_hi - 1 + geo.n_positions + max_new)
    return ExportSettings(
        model_dir, source, family, layout, geo, levels, export_dtype, batch, text_range, max_new,
        validate, batch_size, text_len, seed,
    )  # fmt: skip


def _resolve_source(model: str | Path | None, recipe: str | Path | None):
    """(model_dir, source label, recipe or None, family)."""
    from star_export.load import (
        DEMO_RECIPE,
        DEMO_SOURCE,
        demo_checkpoint,
        materialise,
        read_config,
        resolve_model,
    )
    from star_export.preprocess import check_processor_files
    from star_export.recipes import load_recipe

    if model is None and recipe is None:  # the shipped trained demo model
        rec = load_recipe(DEMO_RECIPE)
        model_dir, source = demo_checkpoint(), DEMO_SOURCE
    elif model is None:
        rec = load_recipe(recipe)
        if not rec.embedded:
            raise UsageError(f"recipe {rec.name!r} needs a checkpoint: pass --model DIR")
        model_dir, source = materialise(rec), f"recipe:{rec.name}"
    else:
        rec = load_recipe(recipe) if recipe is not None else None
        model_dir, source = resolve_model(model)
    cfg, family = read_config(model_dir)  # fails fast, before any weight is read
    if model is not None and rec is not None:
        _check_expectations(model_dir, cfg, family, rec)
    check_processor_files(model_dir, "--model")  # an export without a processor could not be used
    return model_dir, source, rec, family


def _check_expectations(model_dir: Path, cfg: dict[str, Any], family: Any, recipe: Any) -> None:
    """A recipe's [expect] table against the directory's config.json."""
    actual = family.expectations(cfg)
    for key, want in recipe.expect.items():
        if key in actual and actual[key] is not None and actual[key] != want:
            raise UsageError(
                f"--model {model_dir}: {key} is {actual[key]}, recipe {recipe.name!r} expects {want}"
            )


def _keep_levels(
    keep: int | Sequence[int] | None, keep1: int | Sequence[int] | None, default_keep: int
) -> tuple[list[int], list[int | None]]:
    """``--keep`` / ``--keep1`` (one value or a list, ``--keep 32,64``) as one entry per level."""
    keeps = _ints(keep, [default_keep])
    keep1s = _ints(keep1, [None] * len(keeps))
    if len(keep1s) != len(keeps):
        raise UsageError(
            f"--keep1 lists {len(keep1s)} values for {len(keeps)} keep levels: give one per level"
        )
    if len(set(keeps)) != len(keeps):
        raise UsageError(f"--keep {','.join(map(str, keeps))}: each keep level once")
    return keeps, keep1s


def keep_range_level(text: str, keep1: Any, layer: int, default_keep: int, geo: Any) -> Any:
    """``--keep MIN:MAX`` (or ``MIN:OPT:MAX``) as one range level; its default keep (opt) is the
    recipe's keep moved into the range."""
    from star_export.star import StarConfig, parse_keep_range

    lo, opt, hi = parse_keep_range(text)
    opt = min(max(default_keep, lo), hi) if opt is None else opt
    k1 = keep1[0] if isinstance(keep1, Sequence) and len(keep1) == 1 else keep1
    return StarConfig.resolve_range(
        keep=(lo, opt, hi), keep1=k1, layer=layer, n_visual=geo.n_visual, num_layers=geo.num_layers
    )


def _ints(value: int | Sequence[int] | None, default: list) -> list:
    """A flag that takes one value or a list as a list; ``default`` when None."""
    if value is None:
        return default
    return [value] if isinstance(value, int) else list(value)


def _range(name: str, values: Sequence[int]) -> tuple[int, int, int]:
    lo, opt, hi = (int(v) for v in values)
    if not 1 <= lo <= opt <= hi:
        raise UsageError(f"profile {name}: expected 1 <= min <= opt <= max, got {lo}/{opt}/{hi}")
    return lo, opt, hi


def _override(name: str, base: Sequence[int], given: Sequence[int | None] | None) -> tuple[int, int, int]:
    """``base`` (min, opt, max) with the bounds ``given`` (None: keep the base's); an opt not given
    is moved into a changed range."""
    given = tuple(given or (None, None, None))
    lo, opt, hi = (b if g is None else int(g) for b, g in zip(base, given, strict=True))
    if given[1] is None:
        opt = min(max(opt, lo), hi)
    return _range(name, (lo, opt, hi))


def export_profile(
    recipe_profile: Mapping[str, Any], flags: Mapping[str, Any], batch_size: int
) -> tuple[tuple[int, int, int], tuple[int, int, int], int]:
    """(batch, text_len, max_new_tokens) of an export: the recipe's [profile] (else
    ``GENERIC_PROFILE``), the validation batch as opt batch (the max widened to it unless a max is
    given), then the profile flags (``export``'s ``profile``)."""
    base = {**GENERIC_PROFILE, **recipe_profile}
    b_lo, _, b_hi = _range("batch", base["batch"])
    given = tuple(flags.get("batch") or (None, None, None))
    hi = max(b_hi, batch_size) if given[2] is None else b_hi
    batch = _override("batch", (b_lo, batch_size, hi), given)
    t_lo, t_opt, t_hi = _range("text_len", base["text_len"])
    text = _override("text_len", (max(2, t_lo), max(2, t_opt), t_hi), flags.get("text_len"))
    if text[0] < 2:
        raise UsageError(
            f"profile text_len: min must be >= 2 (the placeholder and a token after it), got {text[0]}"
        )
    max_new = flags.get("max_new_tokens")
    max_new = int(base.get("max_new_tokens", 256) if max_new is None else max_new)
    if max_new < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {max_new}")
    return batch, text, max_new


# ------------------------------------------------------------------------------- 2. load


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # the transformers model at the export dtype, eval mode
    peak_bytes: int  # what the export writes at its peak: a data file per graph and the shared one


def load_model(settings: ExportSettings, steps: Steps) -> LoadedModel:
    """The checkpoint's weights at the export dtype (the one stage that reads them)."""
    from star_export.load import load

    s = settings
    steps.step(f"loading {s.source}")
    loaded = load(s.model_dir, source=s.source, dtype=s.torch_dtype, options=s.layout)
    size = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    steps.done(s.describe())
    return LoadedModel(loaded.model, (len(s.levels) + 2) * size)


# -------------------------------------------------------------------------- 3. contracts


@dataclass(frozen=True)
class Contracts:
    prefill: tuple[Any, ...]  # contract.GraphContract per keep level, in the levels' order
    decode: Any  # the one decode graph every level shares

    @property
    def graphs(self) -> tuple[Any, ...]:
        return (*self.prefill, self.decode)


def build_contracts(settings: ExportSettings) -> Contracts:
    """The exported I/O of every graph, as data (contract.py): one prefill graph per keep level
    (named by ``manifest.prefill_graph``) and the decode graph."""
    from star_export.contract import decode_contract, prefill_contract
    from star_export.manifest import prefill_graph

    s = settings
    pixel_doc = s.family.pixel_doc(s.geo)
    prefill = tuple(
        dataclasses.replace(
            prefill_contract(s.geo, c, s.batch, s.text_range, dtype=s.onnx_dtype, pixel_doc=pixel_doc),
            graph=prefill_graph(c.keep2, s.several),
        )
        for c in s.levels
    )
    decode = decode_contract(
        s.geo, list(s.levels), s.batch, s.text_range, s.max_new_tokens, dtype=s.onnx_dtype
    )
    return Contracts(prefill, decode)


# ----------------------------------------------------------------------- 4. export graphs


@dataclass(frozen=True)
class GraphFiles:
    directory: Path  # the staging directory
    paths: Mapping[str, Path]  # graph -> <graph>.onnx, every prefill graph then decode


def export_graphs(
    settings: ExportSettings, loaded: LoadedModel, contracts: Contracts, stage: Path, steps: Steps, log: Log
) -> GraphFiles:
    """Each graph through torch.onnx's dynamo exporter into ``stage``, its weights beside it."""
    from star_export.onnx_export import OPSET, example_decode_inputs, export_onnx

    s, family, dc = settings, settings.family, contracts.decode
    names = ", ".join(f"{c.graph}.onnx" for c in contracts.prefill)
    steps.step(f"exporting {names} and decode.onnx (torch.onnx dynamo exporter, opset {OPSET})")
    paths = {c.graph: stage / f"{c.graph}.onnx" for c in contracts.graphs}
    for c, level in zip(contracts.prefill, s.levels, strict=True):
        t0 = time.perf_counter()
        with heartbeat(f"exporting {c.graph}.onnx", log):
            module = family.prefill_module(loaded.model, s.geo, level).eval()
            export_onnx(module, c, paths[c.graph], s.geo.image_token_id, external_data=True)
        what = f"keep1={level.keep1}, keep2={level.keep2}"
        if level.keep_range is not None:
            what = f"keep2 = len(keep_slots) in {level.keep_range[0]}..{level.keep_range[1]}, keep1 = min(N, 2*keep2)"
        dims = ", ".join(d.name for d in c.dims)
        steps.done(f"{c.graph}.onnx ({what}): {dims} dynamic", since=t0)
    t0 = time.perf_counter()
    with heartbeat("exporting decode.onnx", log):
        module = family.decode_module(loaded.model, s.geo, s.levels[0]).eval()
        export_onnx(module, dc, paths["decode"], example_args=example_decode_inputs(dc), external_data=True)
    steps.done("decode.onnx (every level): batch, past_len_l1, past_len_l2 dynamic", since=t0)
    return GraphFiles(stage, paths)


# ---------------------------------------------------------------------- 5. share weights


def share_graph_weights(graphs: GraphFiles, log: Log) -> Any:
    """Every graph's weights into one weights.onnx.data, each tensor once (weights.Shared)."""
    from star_export.weights import share_weights

    shared = share_weights(list(graphs.paths.values()))
    log(
        f"      {shared.file}: {shared.tensors} tensors, {shared.bytes / 2**20:.1f} MiB, shared by "
        f"{len(shared.graphs)} graphs (the per-graph files held {shared.replaced_bytes / 2**20:.1f} MiB)"
    )
    return shared


# ------------------------------------------------------------------------------- 6. scan


@dataclass(frozen=True)
class Scans:
    reports: Mapping[str, Any]  # graph -> check.CheckReport

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.reports.values())

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **{k: s.to_dict() for k, s in self.reports.items()}}


def scan_graphs(contracts: Contracts, graphs: GraphFiles, steps: Steps, log: Log) -> Scans:
    """Each graph's static shapes and TensorRT readiness (check.py), against its contract."""
    from star_export.check import check_onnx
    from star_export.contract import KEEP_INPUT

    steps.step("scanning the graphs (static shapes, TensorRT readiness)")
    reports = {}
    for c in contracts.graphs:
        path = graphs.paths[c.graph]
        reports[c.graph] = scan = check_onnx(path, dynamic_inputs=c.dynamic_axes())
        log(
            f"      {path.name}: {'ok' if scan.ok else 'FAIL'}, {sum(scan.op_counts.values())} nodes, "
            f"TopK x{scan.op_counts.get('TopK', 0)} "
            f"({'K from the shape of ' + KEEP_INPUT if KEEP_INPUT in c.input_names else 'constant K'}), "
            f"{len(scan.errors)} errors"
        )
    return Scans(reports)


# --------------------------------------------------------------------------- 7. validate


def validate_graphs(
    settings: ExportSettings,
    loaded: LoadedModel,
    contracts: Contracts,
    graphs: GraphFiles,
    scans: Scans,
    steps: Steps,
    log: Log,
) -> Any:
    """Parity of every keep level (validate.py): onnxruntime vs the PyTorch rewrite vs the reference
    vs the unmodified model; a half-precision export against the checkpoint in fp32 too. Returns
    the validate.ParityReport, the scans recorded in it."""
    from star_export.load import load
    from star_export.validate import validate_levels

    s = settings
    half = s.dtype != "fp32"
    steps.step(
        f"validating (B={max(2, s.batch_size)}, T={s.text_len}, left padding): onnxruntime vs torch rewrite"
        + (f" ({s.dtype} and fp32)" if half else "")
        + " vs reference vs unmodified model"
        + (f", {len(s.levels)} keep levels" if s.several else "")
    )
    model32 = load(s.model_dir, source=s.source, options=s.layout).model if half else None
    report = validate_levels(
        loaded.model,
        s.geo,
        list(zip(s.levels, contracts.prefill, strict=True)),
        contracts.decode,
        graphs.directory,
        seed=s.seed,
        batch=max(2, s.batch_size),
        text_len=s.text_len,
        model32=model32,
    )
    report.graph_check = scans.to_dict()
    log(report.format())
    steps.done("done")
    return report


# ------------------------------------------------------------------------------ 8. write


@dataclass(frozen=True)
class Written:
    manifest: dict[str, Any]
    entries: tuple[str, ...]  # what the staging directory holds, to move into ``out``


def write_outputs(settings: ExportSettings, contracts: Contracts, graphs: GraphFiles, report: Any) -> Written:
    """processor/, report.json (where validation ran) and manifest.json beside the graphs."""
    from star_export.manifest import build_manifest
    from star_export.onnx_export import OPSET
    from star_export.outputs import write_json

    s, stage = settings, graphs.directory
    tokenizer = copy_processor_files(s.model_dir, stage / "processor")
    if report is not None:
        write_json(stage / "report.json", report.to_dict())
    files = sorted(f for f in stage.iterdir() if f.name.endswith((".onnx", ".onnx.data")))
    manifest = build_manifest(
        contracts=list(contracts.graphs),
        levels=list(s.levels),
        geo=s.geo,
        family=s.family,
        model_dir=s.model_dir,
        source=s.source,
        files=files,
        opset=OPSET,
        max_new_tokens=s.max_new_tokens,
        dtype=s.onnx_dtype,
        tokenizer=tokenizer,
        layout=dict(s.layout),
    )
    write_json(stage / "manifest.json", manifest)
    return Written(manifest, tuple(sorted(item.name for item in stage.iterdir())))


def copy_processor_files(model_dir: Path, target: Path) -> dict[str, Any]:
    """Copy the checkpoint's tokenizer / processor files so the output directory is self-contained."""
    import shutil

    copied = [name for name in PROCESSOR_FILES if (model_dir / name).is_file()]
    if copied:
        target.mkdir(parents=True, exist_ok=True)
        for name in copied:
            shutil.copy2(model_dir / name, target / name)
    return {"directory": "processor" if copied else None, "files": copied}
