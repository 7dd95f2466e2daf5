"""``star_model.h``: the model constants the C++ example (``examples/cpp``) is compiled with."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from star_export import __version__
from star_export.atomic import atomic_write, check_target
from star_export.deploy.source import graph_names, levels_of, read_export, served_limits
from star_export.errors import UsageError

DEFAULT_ENGINE = "prefill.plan"  # `build`'s --engine default (DIR/prefill.plan)


def _input_shape(graph: Mapping[str, Any], name: str) -> list[Any] | None:
    return next((list(t["shape"]) for t in graph["inputs"] if t["name"] == name), None)


def unsupported_layout(manifest: Mapping[str, Any]) -> str | None:
    """Why examples/cpp cannot drive this export, from generic manifest fields (None: it can).

    main.cpp feeds one square image as ``pixel_values [B, 3, S, S]`` (S = image_size) to every keep
    level's prefill graph, caches ``T - 1 + keep`` slots per layer (no fixed visual tokens:
    ``n_fixed == 0``), and gives each
    decode step one scalar position per row, ``real - 1 + N + step`` (``position_ids [B, 1]``, the
    image occupying its N positions: ``n_positions == n_visual``).
    """
    geo, graphs = manifest["model"]["geometry"], manifest["graphs"]
    size, n_visual = geo["image_size"], geo["n_visual"]
    for lv in manifest["star"]["levels"]:
        pixels = _input_shape(graphs[lv["graph"]], "pixel_values")
        if pixels != ["batch", 3, size, size]:
            return f"pixel_values {pixels}"
    n_fixed = int(geo.get("n_fixed", 0))
    if n_fixed:
        return f"{n_fixed} fixed (always kept) visual tokens"
    n_positions = int(geo.get("n_positions") or n_visual + n_fixed)
    if n_positions != n_visual:
        return f"an image occupying {n_positions} positions for {n_visual} visual tokens"
    positions = _input_shape(graphs["decode"], "position_ids")
    if positions != ["batch", 1]:
        return f"decode position_ids {positions}"
    return None


def engine_names(manifest: Mapping[str, Any]) -> dict[str, str]:
    """{graph: engine file name} of every keep level's prefill graph and the decode graph: the names
    ``build`` recorded in ``manifest["engines"]``, else the ones ``build --from DIR`` writes by default
    (``prefill.plan`` + ``prefill.decode.plan``; several levels ``prefill.k32.plan``, ...)."""
    from star_export.engines.settings import engine_files

    names = graph_names(manifest)
    out = {g: p.name for g, p in engine_files(Path(DEFAULT_ENGINE), names).items()}
    for g, entry in (manifest.get("engines") or {}).items():
        recorded = Path(str(entry.get("path") or entry.get("file") or "")).name
        if g in out and recorded:
            out[g] = recorded
    return out


def header_limits(manifest: Mapping[str, Any]) -> tuple[dict[str, int], str]:
    """(batch / text_len / past_len_l1 / past_len_l2 maxima, where they come from) for the header:
    the built engines' optimization profile 0 as ``build`` recorded it in ``manifest["engines"]``
    when every graph has an engine entry (the C++ example runs those engines, and TensorRT rejects
    shapes outside their profiles), else the export's ONNX ranges."""
    names = graph_names(manifest)
    recorded = manifest.get("engines") or {}
    engines = {g: (Path(str(recorded[g].get("path", ""))), recorded[g]) for g in names if g in recorded}
    if len(engines) != len(names):
        return served_limits(manifest["graphs"], {}, names), "the export's ONNX ranges (no engines recorded)"
    source = "the engines' optimization profile 0 (manifest.json engines)"
    return served_limits(manifest["graphs"], engines, names), source


def keep_range_consts(levels: list[dict[str, Any]]) -> list[tuple[str, str, int, str]]:
    """kKeepMin / kKeepMax of a keep-range export (0 / 0 without one): its one prefill engine takes any
    keep2 in [kKeepMin, kKeepMax] as the length of its input keep_slots."""
    ranged = next((lv for lv in levels if "keep_range" in lv), None)
    lo, hi = (ranged["keep_range"]["min"], ranged["keep_range"]["max"]) if ranged else (0, 0)
    doc = (
        "a keep range (0: none): kLevels[0]'s engine runs any keep2 in [kKeepMin, kKeepMax], fed as the "
        "LENGTH of its input keep_slots [B, keep2] (int64, values unread); keep1 = min(kNVisual, 2 * keep2)"
    )
    return [("int64_t", "kKeepMin", lo, doc), ("int64_t", "kKeepMax", hi, "")]


def cpp_header(manifest: Mapping[str, Any]) -> str:
    """``star_model.h`` for examples/cpp: the model constants, from the manifest (never by hand): the
    geometry, the limits (:func:`header_limits`: the built engines' profiles where ``build`` recorded
    them), and one row per keep level (keep1, keep2, span1, span2,
    its prefill engine's file name), the default level first."""
    geo, star = manifest["model"]["geometry"], manifest["star"]
    problem = unsupported_layout(manifest)
    if problem is not None:
        raise UsageError(
            "--cpp-header: examples/cpp drives LLaVA-1.5 exports (pixel_values [B, 3, S, S], no fixed "
            f"visual tokens, scalar positions continuing after the N visual tokens); this export has "
            f"{problem}: use the manifest's tensor table"
        )
    levels = levels_of(manifest)
    engines = engine_names(manifest)
    limits, source = header_limits(manifest)
    consts = [
        (
            "int32_t",
            "kNumLayers",
            geo["num_layers"],
            "decoder layers: present.{i}.* / past.{i}.*, i < kNumLayers",
        ),
        (
            "int32_t",
            "kLayerK",
            star["layer_K"],
            "layers < K hold L1 = T - 1 + span1 slots (past_len_l1), layers >= K hold L2 (past_len_l2)",
        ),
        ("int64_t", "kNVisual", star["N"], "visual tokens before pruning (positions continue after N)"),
        ("int64_t", "kImageSize", geo["image_size"], "pixel_values: [B, 3, kImageSize, kImageSize]"),
        ("int64_t", "kVocab", geo["vocab_size"], "logits: [B, kVocab]"),
        ("int64_t", "kKvHeads", geo["num_kv_heads"], "present/past: [B, kKvHeads, S, kHeadDim]"),
        ("int64_t", "kHeadDim", geo["head_dim"], ""),
        (
            "int32_t",
            "kSlotPositions",
            int(_input_shape(manifest["graphs"]["decode"], "past_positions_l1") is not None),
            "1: the graphs carry each cached slot's original position (present_positions_* -> past_positions_*)",
        ),
        ("int64_t", "kImageTokenId", manifest["image_token_id"], "the ONE placeholder per prompt row"),
        ("int64_t", "kMaxBatch", limits["batch"], f"maxima of {source}"),
        ("int64_t", "kMaxTextLen", limits["text_len"], ""),
        ("int64_t", "kMaxPastLenL1", limits["past_len_l1"], "decode: past_len_l1 (layers < K) <= this"),
        ("int64_t", "kMaxPastLenL2", limits["past_len_l2"], "decode: past_len_l2 (layers >= K) <= this"),
        (
            "int64_t",
            "kDefaultKeep",
            star.get("default_keep", levels[0]["keep2"]),
            "keep2 of the default level",
        ),
        ("int32_t", "kNumLevels", len(levels), "rows of kLevels"),
        *keep_range_consts(levels),
    ]
    body = "\n".join(
        f"constexpr {t} {n} = {int(v)};" + (f"  // {doc}" if doc else "") for t, n, v, doc in consts
    )
    rows = "\n".join(
        f"    {{{int(lv['keep1'])}, {int(lv['keep2'])}, {int(lv['span1'])}, {int(lv['span2'])}, "
        f'"{engines[lv["graph"]]}"}},  // graph {lv["graph"]}'
        for lv in levels
    )
    summary = ", ".join(f"{lv['keep1']}->{lv['keep2']}" for lv in levels)
    return f"""// Generated by star_export {__version__} from manifest.json of {manifest["model"]["source"]}
// (keep levels keep1->keep2: {summary}; default keep {levels[0]["keep2"]}; K={star["layer_K"]}): do not edit.
// Regenerate with
//   python -m star_export triton --from OUT_DIR --cpp-header examples/cpp/star_model.h
#pragma once
#include <cstdint>

namespace star_model {{
{body}

// One prefill engine per keep level (the default first); ONE decode engine serves every level.
struct Level {{
    int64_t keep1;       // visual tokens kept by stage 1: stage1_keep_idx [B, keep1]
    int64_t keep2;       // visual tokens kept by stage 2: stage2_keep_idx [B, keep2]; --keep picks it
    int64_t span1;       // image cache slots before layer K: L1 = T - 1 + span1 (past_len_l1 after prefill)
    int64_t span2;       // image cache slots from layer K on: L2 = T - 1 + span2 (past_len_l2 after prefill)
    const char* engine;  // the level's prefill engine file (in --engine-dir)
}};
constexpr Level kLevels[] = {{
{rows}
}};
constexpr const char* kDecodeEngine = "{engines["decode"]}";  // in --engine-dir
}}  // namespace star_model
"""


def write_cpp_header(from_dir: Path, path: Path) -> Path:
    """Write :func:`cpp_header` of the export in ``from_dir`` to ``path`` (atomically)."""
    manifest = read_export(Path(from_dir))
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--cpp-header {path}: is a directory")
    check_target(path, "--cpp-header")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, cpp_header(manifest))  # nothing half-written on a full disk
    return path
