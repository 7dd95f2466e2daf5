"""``manifest.json``: what a C++/Triton user needs to drive the exported graphs without Python.

Built from the contract (never restated by hand), the STAR config, the geometry, the image
pre-processing, the model's source and the versions of every library that produced the files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from star_export import __version__
from star_export.contract import KEEP_INPUT, GraphContract, keep_dims
from star_export.errors import UsageError
from star_export.geometry import Geometry
from star_export.star import StarConfig

MANIFEST_VERSION = 2  # 2: family image section, index_space, keep levels, one decode graph, shared weights
LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "polygraphy", "numpy")


def library_versions() -> dict[str, str]:
    out = {"star_export": __version__, "python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


def file_entry(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def prefill_graph(keep2: int, several: bool) -> str:
    """The prefill graph's name (and file stem) of a keep level: ``prefill`` when the export has one
    level, ``prefill_k{keep2}`` when it has several."""
    return f"prefill_k{keep2}" if several else "prefill"


def _level(geo: Geometry, cfg: StarConfig, graph: str) -> dict[str, Any]:
    if cfg.keep_range is not None:  # a keep range: one graph, keep2 from keep_slots' length
        keep1 = keep_dims(geo, cfg)[0]
        return {
            **_level(geo, StarConfig(keep2=cfg.keep2, keep1=cfg.keep1, layer=cfg.layer), graph),
            # the range's default (opt) level above; any keep2 in [min, max] is served by this graph
            "keep_range": {"min": cfg.keep_range[0], "opt": cfg.keep2, "max": cfg.keep_range[1]},
            # visual-span lengths at the range's ends (cache slots: the decode profile covers both)
            "span1_range": [geo.span(cfg.keep1_of(k)) for k in cfg.keep_range],
            "span2_range": [geo.span(k) for k in cfg.keep_range],
            "keep_input": KEEP_INPUT,
            "keep1_rule": f"keep1 = {keep1} (keep = keep2 = the length of {KEEP_INPUT})",
        }
    return {
        "keep1": cfg.keep1,
        "keep2": cfg.keep2,
        "layer_K": cfg.layer,
        # visual-span lengths: kept tokens + always-kept structural ones (LLaVA-NeXT newlines)
        "span1": geo.span(cfg.keep1),
        "span2": geo.span(cfg.keep2),
        "L1": f"text_len - 1 + {geo.span(cfg.keep1)}",
        "L2": f"text_len - 1 + {geo.span(cfg.keep2)}",
        "graph": graph,
        "file": f"{graph}.onnx",
        # a baseline of `compare` (star.SELECTIONS) says so; STAR's own levels leave it out
        **({"selection": cfg.selection} if cfg.selection != "star" else {}),
    }


def build_manifest(
    *,
    contracts: list[GraphContract],
    levels: list[StarConfig],
    geo: Geometry,
    family: Any,
    model_dir: Path,
    source: str,
    files: list[Path],
    opset: int,
    dtype: str = "float32",
    max_new_tokens: int | None = None,
    tokenizer: dict[str, Any] | None = None,
    layout: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``levels``: the export's keep levels, the first the default; ``contracts``: one prefill graph
    per level (named by ``prefill_graph``) and the decode graph they share."""
    graphs = {
        c.graph: {**c.to_dict(), "file": f"{c.graph}.onnx", "opset": opset, "dtype": dtype} for c in contracts
    }
    several = len(levels) > 1
    cfg = levels[0]
    return {
        "manifest_version": MANIFEST_VERSION,
        "model": {"source": source, "directory": str(model_dir), "geometry": geo.to_dict()},
        # the family's layout options that fixed the static shapes (grid, image_size)
        "layout": {k: list(v) if isinstance(v, tuple) else v for k, v in (layout or {}).items()},
        "star": {
            "N": geo.n_visual,
            "n_fixed": geo.n_fixed,
            # positions the image occupies: the first new token sits at real tokens - 1 + n_positions
            "n_positions": geo.n_positions,
            "present_length_per_layer": ["L1" if i < cfg.layer else "L2" for i in range(geo.num_layers)],
            # what an index of stage1_keep_idx / stage2_keep_idx names (the family's index space)
            "index_space": family.index_space(geo),
            # the default level (a request that names no keep gets it), flat for simple consumers
            **{
                k: v
                for k, v in _level(geo, cfg, prefill_graph(cfg.keep2, several)).items()
                if k not in ("graph", "file")
            },
            "default_keep": cfg.keep2,
            # every keep level: its own prefill graph; all share the decode graph and the weights
            "levels": [_level(geo, c, prefill_graph(c.keep2, several)) for c in levels],
        },
        "image_token_id": geo.image_token_id,
        "image": family.image_spec(model_dir, geo),
        "tokenizer": tokenizer or {},
        "prompt_rules": [
            "exactly one image placeholder token per row (not expanded to N copies)",
            "padding on the left only; attention_mask 0 at padding",
            "at least one token after the placeholder",
        ],
        "decoding": {
            "max_new_tokens": max_new_tokens,
            "loop": [
                "run prefill; layers < K return L1 = T-1+span1 slots, layers >= K return L2 = T-1+span2 "
                "(span = kept visual tokens + n_fixed)",
                "pad = T - sum(attention_mask) per row; attention_mask_l1 = [0]*pad + [1]*(L1-pad), "
                "attention_mask_l2 = [0]*pad + [1]*(L2-pad)",
                "position of the first new token = sum(attention_mask) - 1 + n_positions (the unpruned "
                "image's extent); +1 per step",
                "each step: input_ids = chosen token [B,1], position_ids [B,1], both masks with a 1 appended, "
                "past.{i}.key/value = previous present.{i}.key/value (every output present* feeds the "
                "input past*: also past_positions_l1/_l2 = previous present_positions_l1/_l2 where the "
                "graphs have them)",
                "decode steps do not prune further; every layer's cache grows by one per step",
            ],
        },
        "graphs": graphs,
        "files": [file_entry(f) for f in files],
        "versions": library_versions(),
    }


def read_manifest(directory: Path, graphs: tuple[str, ...] | None = None) -> dict[str, Any]:
    """manifest.json of an output directory, checked for a compatible version and its graphs' files
    (``graphs``: the graph names to check; default every graph of the manifest)."""
    if not directory.is_dir():
        raise UsageError(f"--from {directory}: no such directory")
    path = directory / "manifest.json"
    if not path.is_file():
        raise UsageError(
            f"--from {directory}: no manifest.json (run `python -m star_export llava --out {directory}`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--from {directory}: manifest.json is not valid JSON ({e})") from None
    version = manifest.get("manifest_version") if isinstance(manifest, dict) else None
    if version != MANIFEST_VERSION:
        raise UsageError(
            f"--from {directory}: manifest version {version!r} is incompatible with this star_export "
            f"(expects {MANIFEST_VERSION}); re-export with `python -m star_export llava --out {directory}`"
        )
    from star_export.manifest_check import check_manifest

    check_manifest(
        manifest, directory, levels
    )  # keys, graphs' shapes, levels: one line for a hand-edited manifest
    for graph in graphs if graphs is not None else tuple(manifest.get("graphs", {})):
        entry = manifest.get("graphs", {}).get(graph)
        if entry is None or not (directory / entry.get("file", f"{graph}.onnx")).is_file():
            raise UsageError(f"--from {directory}: {graph}.onnx missing; re-export the directory")
    return manifest


@dataclass(frozen=True)
class Level:
    """One keep level of an export: its STAR settings and its prefill graph."""

    cfg: StarConfig
    graph: str
    file: str


def levels(manifest: dict[str, Any], geo: Geometry, where: str) -> list[Level]:
    """Every keep level of a manifest (the default first), each checked by the command line's rules
    (a hand-edited or foreign manifest with keep2 > keep1 or K outside 1..layers-1 is a UsageError,
    never a silently skipped stage)."""
    try:
        entries = manifest["star"]["levels"]
        out = []
        for e in entries:
            cfg = StarConfig.resolve(
                keep=int(e["keep2"]),
                keep1=int(e["keep1"]),
                layer=int(e["layer_K"]),
                n_visual=geo.n_visual,
                num_layers=geo.num_layers,
                selection=str(e.get("selection", "star")),
            )
            if "keep_range" in e:  # one graph for every keep2 in [min, max]
                r = e["keep_range"]
                cfg = StarConfig.resolve_range(
                    keep=(int(r["min"]), cfg.keep2, int(r["max"])),
                    keep1=None,
                    layer=cfg.layer,
                    n_visual=geo.n_visual,
                    num_layers=geo.num_layers,
                )
            out.append(Level(cfg, str(e["graph"]), str(e["file"])))
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{where}: manifest.json has no valid star settings ({e})") from None
    except UsageError as e:
        raise UsageError(f"{where}: manifest.json: {e}") from None
    if not out:
        raise UsageError(f"{where}: manifest.json lists no keep level")
    return out


def level(manifest: dict[str, Any], geo: Geometry, where: str, keep: int | None = None) -> Level:
    """The level whose keep2 is ``keep`` (default: the manifest's default), or a one-line UsageError
    listing the levels the export holds."""
    all_levels = levels(manifest, geo, where)
    if keep is None:
        return all_levels[0]
    for lv in all_levels:
        if lv.cfg.keep2 == keep:
            return lv
        if lv.cfg.covers(keep):
            return Level(lv.cfg, lv.graph, lv.file)
    held = ", ".join(describe_keeps(lv.cfg) for lv in all_levels)
    raise UsageError(
        f"--keep {keep}: this export holds keep levels {held}; re-export with --keep {held},{keep}"
    )


def describe_keeps(cfg: StarConfig) -> str:
    """``64``, or a keep range's ``16:128``."""
    return str(cfg.keep2) if cfg.keep_range is None else f"{cfg.keep_range[0]}:{cfg.keep_range[1]}"


def star_config(manifest: dict[str, Any], geo: Geometry, where: str, keep: int | None = None) -> StarConfig:
    """The STAR settings of one level (default: the manifest's default level; a keep inside a keep
    range: that range's level ``keep``, constants keep1/keep2)."""
    cfg = level(manifest, geo, where, keep).cfg
    return cfg if cfg.keep_range is None else cfg.at(cfg.keep2 if keep is None else keep)
