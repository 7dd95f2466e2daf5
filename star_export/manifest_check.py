"""``manifest.json`` against itself and against the graphs it describes, when an export is loaded.

A manifest edited by hand (a keep level relabelled, keep2 48 where the graph holds 64, a key
deleted) or one that no longer matches its ONNX files would otherwise surface later as an
onnxruntime ``Expand`` error mid-generation, a ``KeyError``, or a Triton repository whose pipeline
reads a missing key. :func:`check_manifest` turns each into one line (``UsageError``, exit 2):

* the keys every consumer reads (``model.geometry``, ``star.levels``, ``graphs`` with each level's
  prefill graph and ``decode``, ``image``, ``image_token_id``) are present and well formed;
* every graph entry names the ONNX file's inputs and outputs, with the file's dtypes and shapes
  (static dims and symbolic ones alike; the file is read without its weights);
* every keep level agrees with its prefill graph (``stage1_keep_idx [batch, keep1]``,
  ``stage2_keep_idx [batch, keep2]``, the per-layer cache lengths of ``layer_K``) and the decode graph
  with K (``past_len_l1`` below K, ``past_len_l2`` from K on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from star_export.contract import KEEP_INPUT, keep_dims, present_length
from star_export.errors import UsageError

REQUIRED = {"model": dict, "star": dict, "graphs": dict, "image": dict, "image_token_id": int}
ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 7: "int64", 6: "int32", 9: "bool"}
_IO_CACHE: dict[tuple[str, int, int], dict[str, tuple[str, str, list[Any]]]] = {}
REEXPORT = "re-export the directory (python -m star_export llava --out DIR)"


def graph_io(path: Path) -> dict[str, tuple[str, str, list[Any]]]:
    """{tensor name: ("input" | "output", dtype, dims)} of an ONNX file, read without its weights
    (cached per file, size and modification time)."""
    import onnx

    from star_export.onnx_reader import dims

    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _IO_CACHE:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends
            raise UsageError(f"{path}: not an ONNX model ({type(e).__name__}); {REEXPORT}") from None
        io = {}
        for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
            for value in values:
                elem = value.type.tensor_type.elem_type
                io[value.name] = (kind, ONNX_DTYPES.get(elem, f"onnx type {elem}"), dims(value) or [])
        _IO_CACHE.clear()  # one export at a time is enough
        _IO_CACHE[key] = io
    return _IO_CACHE[key]


def _shape(graph: Mapping[str, Any], name: str) -> list[Any] | None:
    for t in (*graph["inputs"], *graph["outputs"]):
        if t["name"] == name:
            return list(t["shape"])
    return None


def _length(symbol: str, extra: int) -> set[str]:
    """How a contract writes ``symbol + extra`` (and how an exporter may simplify ``+ 0``)."""
    return {f"{symbol} + {extra}"} | ({symbol} if extra == 0 else set())


def _required(manifest: Mapping[str, Any], where: str) -> None:
    for key, kind in REQUIRED.items():
        if key not in manifest:
            raise UsageError(f"{where}: manifest.json has no {key!r}; {REEXPORT}")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise UsageError(f"{where}: manifest.json's {key!r} is not a {kind.__name__}; {REEXPORT}")
    if not isinstance(manifest["model"].get("geometry"), dict):
        raise UsageError(f"{where}: manifest.json has no 'model.geometry'; {REEXPORT}")
    if not isinstance(manifest["star"].get("levels"), list):
        raise UsageError(f"{where}: manifest.json has no 'star.levels'; {REEXPORT}")


def _against_file(directory: Path, name: str, entry: Mapping[str, Any], where: str) -> None:
    """A graph entry's tensors against its ONNX file (skipped when the file is missing: the callers
    report missing files for the graphs they need)."""
    path = directory / str(entry.get("file", f"{name}.onnx"))
    if not path.is_file():
        return
    io = graph_io(path)
    listed = {t["name"]: (t["dtype"], list(t["shape"])) for t in (*entry["inputs"], *entry["outputs"])}
    missing = sorted(n for n in listed if n not in io)
    unfed = sorted(n for n, (kind, _, _) in io.items() if kind == "input" and n not in listed)
    if missing or unfed:  # (a graph output the manifest does not list is harmless)
        detail = f"{missing[:3]} not in the graph" if missing else f"graph inputs {unfed[:3]} not listed"
        raise UsageError(
            f"{where}: manifest.json's {name} graph does not match {path.name}: {detail}; {REEXPORT}"
        )
    for tensor, (dtype, shape) in listed.items():
        held = io[tensor][1:]
        if (dtype, shape) != held:
            raise UsageError(
                f"{where}: manifest.json says {name}'s {tensor} is {dtype} {shape}, {path.name} holds "
                f"{held[0]} {held[1]}; {REEXPORT}"
            )


def _levels_against_graphs(manifest: Mapping[str, Any], geo: Any, held: list[Any], where: str) -> None:
    graphs = manifest["graphs"]
    for lv, entry in zip(held, manifest["star"]["levels"], strict=True):
        cfg, graph = lv.cfg, graphs[lv.graph]
        say = f"{where}: manifest.json's keep level {cfg.keep2} (keep1 {cfg.keep1}, K {cfg.layer})"
        file = str(graph.get("file", f"{lv.graph}.onnx"))
        if lv.file != file:
            raise UsageError(f"{say} names file {lv.file}, its graph {lv.graph!r} is {file}; {REEXPORT}")
        keep1, keep2 = keep_dims(geo, cfg)  # ints, or a keep range's expressions of ``keep``
        for tensor, keep, what in (
            ("stage1_keep_idx", keep1, "keep1"),
            ("stage2_keep_idx", keep2, "keep2"),
        ):
            shape = _shape(graph, tensor)
            if shape != ["batch", keep]:
                raise UsageError(
                    f"{say} does not match its graph {lv.file}: {tensor} is {shape}, {what} {keep} needs "
                    f"['batch', {keep}]; {REEXPORT}"
                )
        if cfg.keep_range is not None and _shape(graph, KEEP_INPUT) != ["batch", "keep"]:
            raise UsageError(
                f"{say} is a keep range but its graph has no {KEEP_INPUT} ['batch', 'keep']; {REEXPORT}"
            )
        for key, keep in (("span1", cfg.keep1), ("span2", cfg.keep2)):
            if key in entry and entry[key] != geo.span(keep):
                raise UsageError(
                    f"{say} says {key} {entry[key]}, the geometry gives {geo.span(keep)}; {REEXPORT}"
                )
        for i in range(geo.num_layers):
            keep = keep1 if i < cfg.layer else keep2
            want = _length("text_len", geo.span(keep) - 1) if isinstance(keep, int) else set()
            want = want or {str(present_length(geo, keep))}
            shape = _shape(graph, f"present.{i}.key")
            if shape is None or len(shape) != 4 or shape[2] not in want:
                raise UsageError(
                    f"{say} does not match its graph {lv.file}: present.{i}.key is {shape}, the level needs "
                    f"{sorted(want)[0]} slots at layer {i}; {REEXPORT}"
                )
    star, first = manifest["star"], held[0].cfg
    flat = {"keep1": first.keep1, "keep2": first.keep2, "layer_K": first.layer, "default_keep": first.keep2}
    for key, want in flat.items():  # the default level, flat for simple consumers (Triton's pipeline)
        if key in star and star[key] != want:
            raise UsageError(
                f"{where}: manifest.json says star.{key} {star[key]}, its default (first) keep level has "
                f"{want}; {REEXPORT}"
            )
    layer = first.layer
    decode = graphs["decode"]
    for i in range(geo.num_layers):
        symbol = "past_len_l1" if i < layer else "past_len_l2"
        shape = _shape(decode, f"past.{i}.key")
        if shape is not None and (len(shape) != 4 or shape[2] != symbol):
            raise UsageError(
                f"{where}: manifest.json's layer_K {layer} does not match the decode graph: past.{i}.key is "
                f"{shape}, K {layer} needs {symbol}; {REEXPORT}"
            )


def check_manifest(
    manifest: Mapping[str, Any],
    directory: Path,
    levels: Callable[[dict[str, Any], Any, str], list[Any]],
    where: str | None = None,
) -> None:
    """One-line UsageError for a manifest that lacks a key its consumers read, whose graph entries do
    not describe its ONNX files, or whose keep levels do not match their graphs. ``levels``: the
    manifest's reader of its keep levels (``manifest.levels``), passed in by that reader's module."""
    from star_export.contract import contract_from_dict
    from star_export.geometry import Geometry

    directory = Path(directory)
    where = where or f"--from {directory}"
    _required(manifest, where)
    try:
        geo = Geometry.from_dict(manifest["model"]["geometry"])
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}: manifest.json has no valid geometry ({e}); {REEXPORT}") from None
    held = levels(dict(manifest), geo, where)
    graphs = manifest["graphs"]
    for name in (*(lv.graph for lv in held), "decode"):
        if name not in graphs:
            raise UsageError(f"{where}: manifest.json's 'graphs' has no {name!r} graph; {REEXPORT}")
    for name, entry in graphs.items():
        try:
            contract_from_dict(entry)
        except UsageError as e:
            raise UsageError(f"{where}: manifest.json's {name} graph: {e}; {REEXPORT}") from None
        _against_file(directory, name, entry, where)
    _levels_against_graphs(manifest, geo, held, where)
