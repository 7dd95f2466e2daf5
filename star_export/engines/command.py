"""The ``build`` command: its flags (:func:`add_build_arguments`), the profile overrides they give,
and :func:`run_build` (readiness check, then one prefill engine per keep level and the decode
engine, recorded in manifest.json)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from star_export.contract import GraphContract, contract_from_dict
from star_export.engines import status
from star_export.engines.engine import build_engine
from star_export.engines.precision import DTYPES, contract_dtype
from star_export.engines.profiles import DimRange, profile_shapes
from star_export.engines.settings import (
    DEFAULT_TIMING_CACHE,
    HARDWARE_LEVELS,
    BuildSettings,
    engine_files,
    finish_command,
)
from star_export.errors import MissingComponent, UsageError
from star_export.manifest import read_manifest

# CLI flags per dynamic dim (min, opt, max); argparse dests are the same with "_" for "-".
DIM_FLAGS: Mapping[str, tuple[str, str, str]] = {
    "batch": ("--min-batch", "--opt-batch", "--max-batch"),
    "text_len": ("--min-text-len", "--opt-text-len", "--max-text-len"),
}


def add_build_arguments(parser: argparse.ArgumentParser, include_engine: bool = True) -> None:
    """Flags of ``build`` (and of ``llava --engine``; pass ``include_engine=False`` where the
    parser already defines ``--engine``)."""
    g = parser.add_argument_group("TensorRT engine")
    if include_engine:
        g.add_argument(
            "--engine",
            type=Path,
            default=None,
            metavar="PATH",
            help="prefill engine path (default: DIR/prefill.plan); the decode engine goes beside it "
            "(out.plan -> out.decode.plan); an export with several keep levels gets one prefill engine "
            "per level (out.k32.plan, out.k64.plan, ...)",
        )
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="engine precision (default: the ONNX's). TensorRT 11: must match the exported ONNX "
        "(strong typing); TensorRT 10: fp16/bf16 on an fp32 ONNX use the builder flag",
    )
    g.add_argument(
        "--timing-cache",
        type=Path,
        default=None,
        metavar="PATH",
        help="tactic timing cache file, reused and updated (default: DIR/timing.cache, one per export "
        "directory, shared by every keep level's build); a cache this GPU/TensorRT refuses is left alone "
        "and a fresh one is started beside it (timing.1.cache, ...)",
    )
    g.add_argument(
        "--no-timing-cache",
        action="store_true",
        help="build without a timing cache file (every tactic timed afresh, nothing written)",
    )
    g.add_argument(
        "--workspace", type=int, default=None, metavar="MiB", help="builder workspace memory pool limit"
    )
    g.add_argument(
        "--builder-optimization-level", type=int, default=None, metavar="N", help="0..5 (TensorRT default 3)"
    )
    g.add_argument(
        "--strongly-typed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force strong typing on/off (default: automatic; always on with TensorRT 11)",
    )
    g.add_argument(
        "--version-compatible",
        action="store_true",
        help="engines that later TensorRT versions can load (BuilderFlag.VERSION_COMPATIBLE, lean runtime "
        "embedded; may be slower); default: only the building TensorRT version loads them",
    )
    g.add_argument(
        "--hardware-compatibility-level",
        choices=tuple(HARDWARE_LEVELS),
        default=None,
        help="GPUs the engines may run on besides the building one (IBuilderConfig."
        "hardware_compatibility_level; ampere-plus: any Ampere or newer GPU, may be slower); default: TensorRT's",
    )
    for dim, flags in DIM_FLAGS.items():
        for which, flag in zip(("min", "opt", "max"), flags, strict=True):
            g.add_argument(flag, type=int, default=None, metavar="N", help=f"profile {which} {dim}")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="longest generation the decode profile allows (sets the max of both past lengths, "
        "past_len_l1 and past_len_l2, over every keep level)",
    )


def _arg_ranges(args: argparse.Namespace, contract: GraphContract) -> tuple[dict[str, DimRange], list[str]]:
    """{dim: (min, opt, max)} for the dims whose flags were given (others keep the contract's), and
    those flags as strings for the finish command."""
    overrides: dict[str, DimRange] = {}
    flags: list[str] = []
    for dim, names in DIM_FLAGS.items():
        given = [getattr(args, n.lstrip("-").replace("-", "_"), None) for n in names]
        if all(v is None for v in given):
            continue
        for n, v in zip(names, given, strict=True):
            if v is not None:
                flags += [n, str(v)]
        if dim not in {d.name for d in contract.dims}:
            continue
        base = contract.dim(dim)
        lo, opt, hi = (
            v if v is not None else b for v, b in zip(given, (base.min, base.opt, base.max), strict=True)
        )
        if given[1] is None:  # keep opt inside a moved range
            opt = min(max(opt, lo), hi)
        overrides[dim] = (lo, opt, hi)
    return overrides, flags


def _prefill_graphs(contracts: Mapping[str, GraphContract]) -> list[str]:
    return [g for g in contracts if g != "decode"]


def graph_overrides(
    manifest: Mapping[str, Any], contracts: Mapping[str, GraphContract], args: argparse.Namespace
) -> tuple[dict[str, dict[str, DimRange]], list[str]]:
    """Per-graph dim overrides from the CLI flags (``contracts``: {graph name: contract}, every keep
    level's prefill graph and the decode graph). Every prefill graph takes batch/text_len directly;
    the decode graph's ``past_len_l1`` / ``past_len_l2`` ranges are recomputed with
    ``decode_contract`` over ALL the manifest's keep levels when text_len or ``--max-new-tokens``
    flags are given."""
    prefills = _prefill_graphs(contracts)
    if not prefills:
        raise UsageError("the manifest lists no prefill graph")
    prefill = contracts[prefills[0]]  # every level's prefill graph has the same batch/text_len dims
    over, flags = _arg_ranges(args, prefill)
    out = {g: dict(over) for g in prefills}
    mnt = getattr(args, "max_new_tokens", None)
    if mnt is not None:
        if mnt < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {mnt}")
        flags += ["--max-new-tokens", str(mnt)]
    if "decode" in contracts:
        decode = contracts["decode"]
        dec = {k: v for k, v in over.items() if k in {d.name for d in decode.dims}}
        if "text_len" in over or mnt is not None:
            dec.update(_decode_past_lens(manifest, prefill, over, mnt))
        out["decode"] = dec
    return out, flags


def _decode_past_lens(
    manifest: Mapping[str, Any],
    prefill: GraphContract,
    over: Mapping[str, DimRange],
    max_new_tokens: int | None,
) -> dict[str, DimRange]:
    """{"past_len_l1": range, "past_len_l2": range} of the decode graph for these prompt ranges and
    answer length, covering every keep level of the manifest (``decode_contract``'s rule)."""
    from star_export.contract import decode_contract
    from star_export.geometry import Geometry
    from star_export.manifest import levels

    try:
        geo = Geometry.from_dict(manifest["model"]["geometry"])
    except (KeyError, TypeError) as e:
        raise UsageError(
            f"manifest.json lacks the geometry/STAR settings to size the decode profile ({e})"
        ) from None
    cfgs = [lv.cfg for lv in levels(dict(manifest), geo, "manifest.json")]
    text = prefill.dim("text_len")
    text_r = over.get("text_len", (text.min, text.opt, text.max))
    batch = prefill.dim("batch")
    batch_r = over.get("batch", (batch.min, batch.opt, batch.max))
    if max_new_tokens is None:
        max_new_tokens = (manifest.get("decoding") or {}).get("max_new_tokens")
    if max_new_tokens is None:
        raise UsageError(
            "pass --max-new-tokens: the manifest does not say how long the decode profile must reach"
        )
    contract = decode_contract(geo, cfgs, batch_r, text_r, int(max_new_tokens))
    out = {}
    for name in ("past_len_l1", "past_len_l2"):
        d = contract.dim(name)
        out[name] = (d.min, d.opt, d.max)
    return out


def settings_from_args(args: argparse.Namespace, default_dtype: str = "fp32") -> BuildSettings:
    """The build settings the CLI flags ask for (``--dtype`` defaults to ``default_dtype``)."""
    workspace = getattr(args, "workspace", None)
    if workspace is not None and workspace <= 0:
        raise UsageError(f"--workspace must be a positive number of MiB, got {workspace}")
    return BuildSettings(
        dtype=getattr(args, "dtype", None) or default_dtype,
        timing_cache=getattr(args, "timing_cache", None),
        workspace_bytes=workspace << 20 if workspace else None,
        strongly_typed=getattr(args, "strongly_typed", None),
        builder_optimization_level=getattr(args, "builder_optimization_level", None),
        version_compatible=bool(getattr(args, "version_compatible", False)),
        hardware_compatibility_level=getattr(args, "hardware_compatibility_level", None),
        no_timing_cache=bool(getattr(args, "no_timing_cache", False)),
    )


def _write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    from star_export.outputs import write_json

    write_json(path, manifest)


def run_build(args: argparse.Namespace, out_dir: Path) -> int:
    """``build --from OUT_DIR``: readiness check of every graph, then one prefill engine per keep
    level and one decode engine (when the manifest lists ``decode``), recorded under ``engines`` in
    manifest.json, keyed by graph name. Engine files come from ``--engine`` (default
    ``OUT_DIR/prefill.plan``, :func:`~star_export.engines.settings.engine_files`): a one-level export
    gets ``out.plan`` + ``out.decode.plan``; several levels ``out.k32.plan``, ``out.k64.plan``, ... +
    ``out.decode.plan``.

    Exit codes: 0 built, 1 readiness check failed; raises UsageError (2) / MissingComponent (3).
    """
    from star_export.geometry import Geometry
    from star_export.manifest import levels

    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    manifest = read_manifest(out_dir, graphs=())
    graphs = manifest["graphs"]
    try:
        geo = Geometry.from_dict(manifest["model"]["geometry"])
    except (KeyError, TypeError) as e:
        raise UsageError(f"--from {out_dir}: manifest.json has no valid geometry ({e})") from None
    level_graphs = [lv.graph for lv in levels(manifest, geo, f"--from {out_dir}")]
    engine = getattr(args, "engine", None) or out_dir / "prefill.plan"
    engine = Path(engine)
    if engine.is_dir():
        raise UsageError(f"--engine {engine}: is a directory")
    names = [g for g in (*level_graphs, "decode") if g in graphs]
    missing = [g for g in level_graphs if g not in graphs]
    if missing:
        raise UsageError(f"--from {out_dir}: manifest.json lists keep levels without graphs: {missing}")
    targets = engine_files(engine, names)
    contracts = {g: contract_from_dict(graphs[g]) for g in names}
    onnx = {g: out_dir / graphs[g].get("file", f"{g}.onnx") for g in names}
    for g in names:
        if not onnx[g].is_file():
            raise UsageError(f"{onnx[g]}: listed in the manifest but missing")

    # 1. readiness (no TensorRT needed)
    from star_export.check import check_onnx

    target = status.check_target(status.tensorrt_version())
    failed = []
    for g in names:
        report = check_onnx(onnx[g], target=target, dynamic_inputs=contracts[g].dynamic_axes())
        print(
            f"[check] {onnx[g].name} for TensorRT {report.target}: {'ok' if report.ok else 'FAIL'} "
            f"({sum(report.op_counts.values())} nodes, {len(report.errors)} errors, {len(report.warnings)} warnings)"
        )
        if not report.ok:
            failed.append(report)
    if failed:
        for report in failed:
            print(report.format(), file=sys.stderr)
        print("star_export: TensorRT readiness check failed (see above); no engine built", file=sys.stderr)
        return 1

    # 2. settings and profiles (validated before looking for TensorRT, so usage errors come first)
    overrides, flags = graph_overrides(manifest, contracts, args)
    base = settings_from_args(args, default_dtype=contract_dtype(contracts[level_graphs[0]]))
    base = dataclasses.replace(base, profile_flags=tuple(flags))
    finish = finish_command(out_dir, engine, base)  # the whole build, every level, from the one --engine
    # one timing cache per export directory by default: each level's build reuses the tactics of the last
    cache = None if base.no_timing_cache else (base.timing_cache or out_dir / DEFAULT_TIMING_CACHE)
    per_graph = {
        g: dataclasses.replace(
            base, timing_cache=cache, profiles=[profile_shapes(contracts[g], overrides[g])]
        )
        for g in names
    }

    # 3. TensorRT and a GPU
    ok, why = status.trt_status()
    if not ok:
        raise MissingComponent(
            f"{why}; the ONNX graphs and manifest are in {out_dir}/; to build the engines on a GPU host "
            f"with TensorRT 10.x/11.x run: {finish}"
        )

    # 4. build, then record atomically
    entries = {g: build_engine(onnx[g], targets[g], contracts[g], per_graph[g], finish=finish) for g in names}
    manifest = json.loads(manifest_path.read_text())  # re-read: keep anything written meanwhile
    manifest["engines"] = {**(manifest.get("engines") or {}), **entries}
    manifest["engine_build"] = (
        base.settings_summary()
        | {"timing_cache": str(cache) if cache else None}
        | {"tensorrt_status": status.trt_status()[1]}
    )
    _write_manifest(manifest_path, manifest)
    for g in names:
        e = entries[g]
        print(
            f"engine {g}: {e['path']} ({e['bytes']} bytes, sha256 {e['sha256'][:12]}, TensorRT {e['tensorrt']})"
        )
    written = sorted({e["timing_cache"] for e in entries.values() if e.get("timing_cache")})
    if written:
        print(f"timing cache: {', '.join(written)}")
    return 0
