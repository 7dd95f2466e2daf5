"""``manifest.json``: what a C++/Triton user needs to drive the exported graphs without Python.

Built from the contract (never restated by hand), the STAR config, the geometry, the image
pre-processing, the model's source and the versions of every library that produced the files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from star_export import __version__
from star_export.contract import GraphContract
from star_export.errors import UsageError
from star_export.load import Geometry
from star_export.star import StarConfig

MANIFEST_VERSION = 1
LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "polygraphy", "numpy")


def library_versions() -> dict[str, str]:
    out = {"star_export": __version__, "python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


def image_preprocessing(model_dir: Path, geo: Geometry) -> dict[str, Any]:
    """Resize/crop/normalise as the checkpoint's ``preprocessor_config.json`` says (CLIP defaults)."""
    pre: dict[str, Any] = {}
    path = model_dir / "preprocessor_config.json"
    if path.is_file():
        pre = json.loads(path.read_text())
    if geo.arch == "qwen2_vl":
        patch, tp, merge = (
            pre.get("patch_size", 14),
            pre.get("temporal_patch_size", 2),
            pre.get("merge_size", 2),
        )
        return {
            "size": geo.image_size,
            "resize": f"bicubic to {geo.image_size}x{geo.image_size} (aspect ratio not kept: one static resolution)",
            "rescale_factor": pre.get("rescale_factor", 1 / 255),
            "mean": pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),
            "std": pre.get("image_std", [0.26862954, 0.26130258, 0.27577711]),
            "patch_size": patch,
            "temporal_patch_size": tp,
            "merge_size": merge,
            "layout": f"[B, {geo.pixel_shape[0]}, {geo.pixel_shape[1]}]: {patch}x{patch} patches in "
            f"{merge}x{merge} merge blocks (block-major), each row [c, t, y, x] with the image repeated "
            f"{tp} times along t (Qwen2VLImageProcessor's layout; star_export.qwen2vl.patchify)",
        }
    return {
        "size": geo.image_size,
        "resize_shortest_edge": (pre.get("size") or {}).get("shortest_edge", geo.image_size),
        "center_crop": pre.get("do_center_crop", True),
        "rescale_factor": pre.get("rescale_factor", 1 / 255),
        "mean": pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),
        "std": pre.get("image_std", [0.26862954, 0.26130258, 0.27577711]),
        "layout": "NCHW, RGB",
        **(
            {
                "anyres": {
                    "grid": list(geo.grid),
                    "pixel_values": f"[B, {geo.pixel_shape[0]}, 3, {geo.image_size}, {geo.image_size}]: the base "
                    "image resized to the tile size, then the tiles of the image resized (aspect kept) and "
                    f"padded to {geo.grid[0] * geo.image_size}x{geo.grid[1] * geo.image_size}, row by row "
                    "(the checkpoint's LlavaNextImageProcessor with that resolution as its only pinpoint)",
                }
            }
            if geo.arch == "llava_next"
            else {}
        ),
    }


def file_entry(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def build_manifest(
    *,
    contracts: list[GraphContract],
    cfg: StarConfig,
    geo: Geometry,
    model_dir: Path,
    source: str,
    files: list[Path],
    opset: int,
    dtype: str = "float32",
    max_new_tokens: int | None = None,
    tokenizer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    graphs = {
        c.graph: {**c.to_dict(), "file": f"{c.graph}.onnx", "opset": opset, "dtype": dtype} for c in contracts
    }
    return {
        "manifest_version": MANIFEST_VERSION,
        "model": {"source": source, "directory": str(model_dir), "geometry": geo.to_dict()},
        "star": {
            "N": geo.n_visual,
            "keep1": cfg.keep1,
            "keep2": cfg.keep2,
            "layer_K": cfg.layer,
            # visual-span lengths: kept tokens + always-kept structural ones (LLaVA-NeXT newlines)
            "n_fixed": geo.n_fixed,
            "span1": geo.span(cfg.keep1),
            "span2": geo.span(cfg.keep2),
            # positions the image occupies: the first new token sits at real tokens - 1 + n_positions
            "n_positions": geo.n_positions,
            "L1": f"text_len - 1 + {geo.span(cfg.keep1)}",
            "L2": f"text_len - 1 + {geo.span(cfg.keep2)}",
            "present_length_per_layer": ["L1" if i < cfg.layer else "L2" for i in range(geo.num_layers)],
        },
        "image_token_id": geo.image_token_id,
        "image": image_preprocessing(model_dir, geo),
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
                "past.{i}.key/value = previous present.{i}.key/value",
                "decode steps do not prune further; every layer's cache grows by one per step",
            ],
        },
        "graphs": graphs,
        "files": [file_entry(f) for f in files],
        "versions": library_versions(),
    }


def read_manifest(directory: Path, graphs: tuple[str, ...] = ("prefill", "decode")) -> dict[str, Any]:
    """manifest.json of an output directory, checked for a compatible version and its graphs' files."""
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
    for graph in graphs:
        entry = manifest.get("graphs", {}).get(graph)
        if entry is None or not (directory / entry.get("file", f"{graph}.onnx")).is_file():
            raise UsageError(f"--from {directory}: {graph}.onnx missing; re-export the directory")
    return manifest
