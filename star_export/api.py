"""The Python API under the CLI: ``export`` a checkpoint with STAR pruning, then ``load_export`` it.

    import star_export
    result = star_export.export("llava-hf/llava-1.5-7b-hf", keep=64, out="star_out")  # or a directory
    result.passed, result.report.rows, result.manifest["star"]
    answers = star_export.load_export("star_out").generate(["cat.png"], ["What is in the image?"])

``export`` runs the whole way (load -> rewrite -> ONNX -> graph scan -> parity -> manifest) into
``out`` atomically and returns an :class:`ExportResult`; it raises ``UsageError`` for bad input
before any weight is read. Nothing is printed unless ``log`` is given (the CLI passes ``print``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from star_export.errors import UsageError
from star_export.progress import Log, Steps, heartbeat, quiet

DEFAULT_RECIPE = "llava-tiny"
GENERIC_PROFILE = {"batch": [1, 2, 8], "text_len": [2, 64, 512]}
DTYPES = {"fp32": ("float32", "float32"), "fp16": ("float16", "float16"), "bf16": ("bfloat16", "bfloat16")}
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


def quiet_libraries() -> None:
    """Silence the exporters' and transformers' chatter (warnings stay for real problems)."""
    for name in (
        "torch.onnx",
        "torch.onnx._internal.exporter._registration",
        "torch._export",
        "torch.export",
        "transformers",
        "onnxscript",
        "torch._dynamo",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def copy_processor_files(model_dir: Path, target: Path) -> dict[str, Any]:
    """Copy the checkpoint's tokenizer / processor files so the output directory is self-contained."""
    import shutil

    copied = [name for name in PROCESSOR_FILES if (model_dir / name).is_file()]
    if copied:
        target.mkdir(parents=True, exist_ok=True)
        for name in copied:
            shutil.copy2(model_dir / name, target / name)
    return {"directory": "processor" if copied else None, "files": copied}


def _check_expectations(model_dir: Path, cfg: dict[str, Any], family: Any, recipe: Any) -> None:
    """A recipe's [expect] table against the directory's config.json."""
    actual = family.expectations(cfg)
    for key, want in recipe.expect.items():
        if key in actual and actual[key] is not None and actual[key] != want:
            raise UsageError(
                f"--model {model_dir}: {key} is {actual[key]}, recipe {recipe.name!r} expects {want}"
            )


def _resolve_source(model: str | Path | None, recipe: str | Path | None):
    """(model_dir, source label, recipe or None, checkpoint config dict, family)."""
    from star_export.load import materialise, read_config, resolve_model
    from star_export.preprocess import check_processor_files
    from star_export.recipes import load_recipe

    rec = (
        load_recipe(recipe)
        if recipe is not None
        else (load_recipe(DEFAULT_RECIPE) if model is None else None)
    )
    if model is None:
        if not rec.embedded:
            raise UsageError(f"recipe {rec.name!r} needs a checkpoint: pass --model DIR")
        model_dir, source = materialise(rec), f"recipe:{rec.name}"
    else:
        model_dir, source = resolve_model(model)
    cfg, family = read_config(model_dir)  # fails fast, before any weight is read
    if model is not None and rec is not None:
        _check_expectations(model_dir, cfg, family, rec)
    check_processor_files(model_dir, "--model")  # an export without a processor could not be used
    return model_dir, source, rec, family


def _ints(value: int | Sequence[int] | None, default: list) -> list:
    """A flag that takes one value or a list (``--keep 32,64``) as a list; ``default`` when None."""
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


def export(
    model: str | Path | None = None,
    *,
    keep: int | Sequence[int] | None = None,
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
) -> ExportResult:
    """Export ``model`` (a checkpoint directory, a hub id, or None: the recipe, default the embedded
    llava-tiny) with STAR pruning into ``out``: a prefill graph per keep level, one decode graph, the
    weights once (weights.onnx.data), processor/, manifest.json and (``validate``) report.json.

    keep: keep2, one level or several (``[32, 64, 128]``: one prefill graph each, the first the
    default; one decode graph serves them all); keep1: per level, default min(N, 2*keep); layer: K,
    the same for every level (defaults from the recipe, else 64 and 2). dtype: "fp32" | "fp16" | "bf16", default the checkpoint's own. grid / image_size: the
    family's static layout (``families``). batch_size / text_len / seed: the validation inputs.
    profile: overrides of the recipe's [profile] (``{"batch": (min, opt, max), "text_len": (...),
    "max_new_tokens": n}``, None for a bound not given): the graphs' dynamic-dim ranges in the
    manifest, the decode graph's past lengths, the Triton limits and the checks. A full disk is a
    one-line ``DiskFull`` (a UsageError) naming ``out``; nothing is left half-written.
    """
    from star_export.atomic import disk_guard

    out = Path(out)
    need: dict[str, int] = {}  # the bytes an export writes at its peak, once the model is known
    with disk_guard(out, "--out", needed=lambda: need.get("bytes")):
        return _export(
            model, keep, keep1, layer, out, dtype, recipe, grid, image_size,
            validate, batch_size, text_len, seed, profile, log, need,
        )  # fmt: skip


def _export(
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
    profile_flags: Mapping[str, Any] | None,
    log: Log | None,
    need: dict[str, int],
) -> ExportResult:
    import time

    log = log or quiet
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    from star_export.outputs import check_out_dir

    check_out_dir(out)  # before any weight is read
    quiet_libraries()
    model_dir, source, rec, family = _resolve_source(model, recipe)

    import torch

    from star_export.load import auto_config, checkpoint_dtype, geometry_of, load
    from star_export.star import StarConfig

    defaults = rec.star if rec else {}
    keeps = _ints(keep, [int(defaults.get("keep", 64))])
    keep1s = _ints(keep1, [None] * len(keeps))
    if len(keep1s) != len(keeps):
        raise UsageError(
            f"--keep1 lists {len(keep1s)} values for {len(keeps)} keep levels: give one per level"
        )
    if len(set(keeps)) != len(keeps):
        raise UsageError(f"--keep {','.join(map(str, keeps))}: each keep level once")
    layer = layer if layer is not None else int(defaults.get("layer", 2))
    export_dtype = dtype or checkpoint_dtype(model_dir)
    torch_dtype = getattr(torch, DTYPES[export_dtype][0])
    onnx_dtype = DTYPES[export_dtype][1]
    given = {k: v for k, v in {"grid": grid, "image_size": image_size}.items() if v is not None}
    options = {**(rec.layout if rec else {}), **given}  # the flags override the recipe's layout
    # geometry and STAR settings from config.json alone: bad settings fail before weights load
    config = auto_config(model_dir)
    geo = geometry_of(family, config, options)
    family.check_layout(model_dir, geo)
    levels = [
        StarConfig.resolve(keep=k, keep1=k1, layer=layer, n_visual=geo.n_visual, num_layers=geo.num_layers)
        for k, k1 in zip(keeps, keep1s, strict=True)
    ]
    batch, text_range, max_new = export_profile(rec.profile if rec else {}, profile_flags or {}, batch_size)
    t_hi = text_range[2]
    if not 5 <= text_len <= t_hi:
        raise UsageError(f"--text-len must be in 5..{t_hi} (the profile's max text length), got {text_len}")
    family.check_profile(config, geo, t_hi - 1 + geo.n_positions + max_new)

    steps = Steps(4 if validate else 3, log)
    steps.step(f"loading {source}")
    loaded = load(model_dir, source=source, dtype=torch_dtype, options=options)
    # at its peak the stage holds a data file per graph (levels + decode) and the shared one
    need["bytes"] = (len(levels) + 2) * sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    steps.done(
        f"{source}: {family.describe(geo)}, {geo.num_layers} layers, heads {geo.num_heads}/{geo.num_kv_heads} kv; "
        + "; ".join(f"keep1={c.keep1} keep2={c.keep2}" for c in levels)
        + f"; K={layer}"
    )

    from star_export.check import check_onnx
    from star_export.contract import decode_contract, prefill_contract
    from star_export.manifest import build_manifest, prefill_graph
    from star_export.onnx_export import OPSET, example_decode_inputs, export_onnx
    from star_export.outputs import staged, write_json
    from star_export.weights import share_weights

    several = len(levels) > 1
    pcs = [
        dataclasses.replace(
            prefill_contract(geo, c, batch, text_range, dtype=onnx_dtype, pixel_doc=family.pixel_doc(geo)),
            graph=prefill_graph(c.keep2, several),
        )
        for c in levels
    ]
    dc = decode_contract(geo, levels, batch, text_range, max_new, dtype=onnx_dtype)
    result = ExportResult(out=out, written=[], manifest={})
    with staged(out, owned=OUTPUTS) as stage:
        names = ", ".join(f"{c.graph}.onnx" for c in pcs)
        steps.step(f"exporting {names} and decode.onnx (torch.onnx dynamo exporter, opset {OPSET})")
        paths = {c.graph: stage / f"{c.graph}.onnx" for c in (*pcs, dc)}
        for c, level in zip(pcs, levels, strict=True):
            t0 = time.perf_counter()
            with heartbeat(f"exporting {c.graph}.onnx", log):
                module = family.prefill_module(loaded.model, geo, level).eval()
                export_onnx(module, c, paths[c.graph], geo.image_token_id, external_data=True)
            steps.done(
                f"{c.graph}.onnx (keep1={level.keep1}, keep2={level.keep2}): batch, text_len dynamic",
                since=t0,
            )
        t0 = time.perf_counter()
        with heartbeat("exporting decode.onnx", log):
            module = family.decode_module(loaded.model, geo, levels[0]).eval()
            export_onnx(
                module, dc, paths["decode"], example_args=example_decode_inputs(dc), external_data=True
            )
        steps.done("decode.onnx (every level): batch, past_len_l1, past_len_l2 dynamic", since=t0)
        shared = share_weights(list(paths.values()))
        log(
            f"      {shared.file}: {shared.tensors} tensors, {shared.bytes / 2**20:.1f} MiB, shared by "
            f"{len(shared.graphs)} graphs (the per-graph files held {shared.replaced_bytes / 2**20:.1f} MiB)"
        )
        tokenizer = copy_processor_files(loaded.model_dir, stage / "processor")

        steps.step("scanning the graphs (static shapes, TensorRT readiness)")
        for c in (*pcs, dc):
            result.scans[c.graph] = scan = check_onnx(paths[c.graph], dynamic_inputs=c.dynamic_axes())
            log(
                f"      {paths[c.graph].name}: {'ok' if scan.ok else 'FAIL'}, {sum(scan.op_counts.values())} nodes, "
                f"TopK x{scan.op_counts.get('TopK', 0)} (constant K), {len(scan.errors)} errors"
            )

        if validate:
            from star_export.validate import validate_levels

            half = export_dtype != "fp32"
            steps.step(
                f"validating (B={max(2, batch_size)}, T={text_len}, left padding): onnxruntime vs torch rewrite"
                + (f" ({export_dtype} and fp32)" if half else "")
                + " vs reference vs unmodified model"
                + (f", {len(levels)} keep levels" if several else "")
            )
            # a half-precision export is checked against the fp32 semantics too: the checkpoint in fp32
            model32 = load(model_dir, source=source, options=options).model if half else None
            report = validate_levels(
                loaded.model,
                geo,
                list(zip(levels, pcs, strict=True)),
                dc,
                stage,
                seed=seed,
                batch=max(2, batch_size),
                text_len=text_len,
                model32=model32,
            )
            report.graph_check = {"ok": result.scan_ok, **{k: s.to_dict() for k, s in result.scans.items()}}
            log(report.format())
            steps.done("done")
            write_json(stage / "report.json", report.to_dict())
            result.report = report

        files = sorted(f for f in stage.iterdir() if f.name.endswith((".onnx", ".onnx.data")))
        result.manifest = build_manifest(
            contracts=[*pcs, dc],
            levels=levels,
            geo=geo,
            family=family,
            model_dir=loaded.model_dir,
            source=loaded.source,
            files=files,
            opset=OPSET,
            max_new_tokens=max_new,
            dtype=onnx_dtype,
            tokenizer=tokenizer,
            layout=options,
        )
        write_json(stage / "manifest.json", result.manifest)
        result.written = sorted(item.name for item in stage.iterdir())
    return result
