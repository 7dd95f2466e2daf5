"""What a repository is made from: the export's manifest (its keep levels: one prefill graph each,
one decode graph for all), its recorded TensorRT engines, and the limits (batch, prompt, the two
past lengths) the models can serve."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from star_export.errors import UsageError


def read_export(from_dir: Path) -> dict[str, Any]:
    """The export's manifest.json, checked (one-line UsageErrors, as ``generate --from``): its graphs'
    files exist and its keep levels (``star.levels``) pass the command line's rules."""
    from star_export.geometry import Geometry
    from star_export.manifest import levels, read_manifest

    from_dir = Path(from_dir)
    if from_dir.exists() and not from_dir.is_dir():
        raise UsageError(f"--from {from_dir}: not a directory")
    manifest = read_manifest(from_dir)
    for key in ("star", "model", "image_token_id"):
        if key not in manifest:
            raise UsageError(f"--from {from_dir}: manifest.json has no {key!r}; re-export the directory")
    try:
        geo = Geometry.from_dict(manifest["model"]["geometry"])
    except (KeyError, TypeError) as e:
        raise UsageError(f"--from {from_dir}: manifest.json has no valid geometry ({e})") from None
    held = levels(manifest, geo, f"--from {from_dir}")
    for lv in held:
        if lv.graph not in manifest.get("graphs", {}):
            raise UsageError(f"--from {from_dir}: keep level {lv.cfg.keep2} has no graph {lv.graph!r}")
    if "decode" not in manifest.get("graphs", {}):
        raise UsageError(f"--from {from_dir}: manifest.json lists no decode graph; re-export the directory")
    return manifest


def check_servable(from_dir: Path, manifest: Mapping[str, Any]) -> None:
    """A one-line UsageError for an export the Triton pipeline cannot serve: bfloat16 tensors, which the
    Python backend's ``pb_utils.Tensor`` cannot carry (``as_numpy()`` has no BF16; numpy has no bfloat16)."""
    bf16 = sorted(
        g
        for g, graph in manifest["graphs"].items()
        if any(t.get("dtype") == "bfloat16" for t in (*graph.get("inputs", []), *graph.get("outputs", [])))
    )
    if bf16:
        raise UsageError(
            f"--from {from_dir}: a bf16 export cannot be served by the Triton pipeline (its Python backend "
            f"cannot carry bfloat16 tensors; graphs {', '.join(bf16)}); re-export with --dtype fp16 or fp32"
        )


def levels_of(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The manifest's keep levels (``star.levels``: keep1, keep2, span1, span2, graph, ...), the
    default first (a manifest :func:`read_export` checked)."""
    return [dict(lv) for lv in manifest["star"]["levels"]]


def graph_names(manifest: Mapping[str, Any]) -> list[str]:
    """Every graph a repository serves: each keep level's prefill graph, then ``decode``."""
    return [lv["graph"] for lv in levels_of(manifest)] + ["decode"]


def batch_first(graph: Mapping[str, Any]) -> None:
    """Triton batching needs ``batch`` as the first dim of every tensor of a graph."""
    for t in (*graph["inputs"], *graph["outputs"]):
        if not t["shape"] or t["shape"][0] != "batch":
            raise UsageError(
                f"{graph['graph']}: tensor {t['name']} has shape {t['shape']}; Triton batching needs "
                "'batch' as the first dim of every tensor"
            )


def dim_max(graph: Mapping[str, Any], name: str) -> int:
    """The export's maximum of a dynamic dim of one graph."""
    return int(next(d["max"] for d in graph["dynamic_dims"] if d["name"] == name))


def profile_bound(
    engine: Mapping[str, Any], graph: Mapping[str, Any], symbol: str, which: str = "max"
) -> int | None:
    """The engine's profile-0 ``which`` ("min"/"max") of a bare symbolic dim (e.g. ``past_len_l2``),
    read from its inputs' recorded shapes; None where the manifest records no profile."""
    profiles = engine.get("profiles") or []
    if not profiles:
        return None
    shapes = profiles[0].get("inputs", {})
    for t in graph["inputs"]:
        if t["name"] in shapes and symbol in t["shape"]:
            return int(shapes[t["name"]][which][t["shape"].index(symbol)])
    return None


def profile_max(engine: Mapping[str, Any], graph: Mapping[str, Any], symbol: str) -> int | None:
    """The engine's profile-0 max of a bare symbolic dim (e.g. ``past_len_l1``), from its inputs."""
    return profile_bound(engine, graph, symbol, "max")


def check_min_batch(
    from_dir: Path, graphs: Mapping[str, Any], engines: Mapping[str, Mapping[str, Any]]
) -> None:
    """Triton's TensorRT backend runs every batch of 1..max_batch_size it forms (one request alone
    is batch 1) and rejects shapes outside the engine's profile (tensorrt_backend
    ``ValidateDimension``: "model expected the shape of dimension 0 to be between min and max"):
    an engine whose profile 0 starts above batch 1 would fail batch-1 requests. One-line UsageError."""
    for g in engines:
        low = profile_bound(engines[g], graphs[g], "batch", "min")
        if low is not None and low != 1:
            raise UsageError(
                f"--backend tensorrt: the {g} engine's optimization profile 0 starts at batch {low}, but "
                "Triton sends batches from 1 up (a single request is batch 1); rebuild with --min-batch 1 "
                f"(python -m star_export build --from {from_dir} --min-batch 1)"
            )


def _engine_file(from_dir: Path, entry: Mapping[str, Any]) -> Path | None:
    recorded = Path(str(entry.get("path") or entry.get("file") or ""))
    for candidate in (recorded, from_dir / recorded, from_dir / recorded.name):
        if str(candidate) not in ("", ".") and candidate.is_file():
            return candidate
    return None


def find_engines(from_dir: Path, manifest: Mapping[str, Any]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{graph: (engine file, manifest entry)} for every keep level's prefill graph and for decode
    (``manifest["engines"]``, keyed by graph name as ``build`` records them), or a one-line
    UsageError."""
    engines = manifest.get("engines") or {}
    names = graph_names(manifest)
    missing = [g for g in names if g not in engines]
    if missing:
        raise UsageError(
            f"--backend tensorrt: {from_dir}/manifest.json records no TensorRT engine for "
            f"{', '.join(missing)}; build them on a host with TensorRT and a GPU "
            f"(python -m star_export build --from {from_dir}) or use --backend onnxruntime/python"
        )
    out = {}
    for g in names:
        path = _engine_file(from_dir, engines[g])
        if path is None:
            raise UsageError(
                f"--backend tensorrt: the {g} engine recorded in manifest.json "
                f"({engines[g].get('path')}) is not there; rebuild or copy it into {from_dir}"
            )
        out[g] = (path, dict(engines[g]))
    check_min_batch(from_dir, manifest["graphs"], {g: engines[g] for g in names})
    return out


def served_limits(
    graphs: Mapping[str, Any],
    engines: Mapping[str, tuple[Path, Mapping[str, Any]]],
    names: list[str],
) -> dict[str, int]:
    """Batch / text_len / past_len_l1 / past_len_l2 maxima the repository serves (``names``: its
    graphs, :func:`graph_names`): the export's ranges, narrowed to the engines' profile 0 where
    TensorRT engines are served. Batch and text_len: the smallest over the graphs (every level)."""
    prefills = [g for g in names if g != "decode"]
    limits = {
        "batch": min(dim_max(graphs[g], "batch") for g in names),
        "text_len": min(dim_max(graphs[g], "text_len") for g in prefills),
        "past_len_l1": dim_max(graphs["decode"], "past_len_l1"),
        "past_len_l2": dim_max(graphs["decode"], "past_len_l2"),
    }
    if engines:
        served: dict[str, list[int]] = {}
        for key, gs in (
            ("batch", names),
            ("text_len", prefills),
            ("past_len_l1", ["decode"]),
            ("past_len_l2", ["decode"]),
        ):
            for g in gs:
                got = profile_max(engines[g][1], graphs[g], key)
                if got is not None:
                    served.setdefault(key, []).append(got)
        for key, values in served.items():
            limits[key] = min(limits[key], *values) if key == "batch" else min(values)
    return limits


def longest_answer(limits: Mapping[str, int], levels: list[dict[str, Any]], text_len: int) -> tuple[int, int]:
    """(new tokens, keep2 of the level that limits it): the longest answer every level allows after a
    ``text_len``-token prompt (``contract.max_new_tokens``: the tighter of the two past lengths)."""
    from star_export.contract import max_new_tokens

    dims = {k: {"max": limits[k]} for k in ("past_len_l1", "past_len_l2")}
    ends = []  # (keep2, span1, span2) of every level, and of a keep range's largest keep
    for lv in levels:
        ends.append((lv["keep2"], lv["span1"], lv["span2"]))
        if "keep_range" in lv:
            ends.append((lv["keep_range"]["max"], lv["span1_range"][1], lv["span2_range"][1]))
    return min((max_new_tokens(dims, text_len, int(s1), int(s2)), int(keep)) for keep, s1, s2 in ends)
