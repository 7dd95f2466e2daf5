"""Weights stored once: every graph of an export reads its initializers from ONE external-data file.

The exporter writes each graph with its own ``<graph>.onnx.data`` (the prefill graphs and the decode
graph each carry the decoder's weights: about 1.9x the checkpoint for one keep level, more for
several). :func:`share_weights` streams every external tensor of every graph into a single file,
each distinct tensor (by content) once, and points every graph's initializers at it (same
``location``, ``offset`` and ``length`` for the same weights), then deletes the per-graph files.
One tensor is in memory at a time. onnxruntime and TensorRT's ONNX parser read external data
relative to the graph's directory, so the graphs and the data file stay side by side.

:class:`SharedWeights` is the reading side: the file mapped once and its tensors handed to every
onnxruntime session of the export, so that they are held once in memory too.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

WEIGHTS_FILE = "weights.onnx.data"
ALIGN = 4096  # page-aligned offsets (memory-mapping readers)


@dataclass
class Shared:
    file: str
    bytes: int = 0  # the shared file's size
    tensors: int = 0  # distinct tensors stored
    references: int = 0  # initializers that point into it (all graphs)
    replaced_bytes: int = 0  # what the per-graph data files held together
    graphs: list[str] = field(default_factory=list)


def _external(graph: onnx.GraphProto):
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _external(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _external(g)


def _info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def share_weights(paths: Sequence[Path], name: str = WEIGHTS_FILE) -> Shared:
    """Rewrite the graphs ``paths`` (one directory) so that their external initializers live once in
    ``<directory>/<name>``; the per-graph data files they used are removed. Graphs without external
    data are left as they are."""
    paths = [Path(p) for p in paths]
    directory = paths[0].parent
    target = directory / name
    tmp = directory / f".{name}.tmp"
    store: dict[str, tuple[int, int]] = {}  # sha256 -> (offset, length)
    shared = Shared(file=name)
    sources: set[Path] = set()
    protos = []
    with tmp.open("wb") as out:
        for path in paths:
            model = onnx.load(str(path), load_external_data=False)
            for tensor in _external(model.graph):
                info = _info(tensor)
                source = directory / info["location"]
                sources.add(source)
                offset, length = int(info.get("offset", 0)), int(info["length"])
                with source.open("rb") as f:
                    f.seek(offset)
                    data = f.read(length)
                digest = hashlib.sha256(data).hexdigest()
                if digest not in store:
                    start = out.tell()
                    pad = -start % ALIGN
                    out.write(b"\0" * pad)
                    store[digest] = (start + pad, length)
                    out.write(data)
                    shared.tensors += 1
                where, size = store[digest]
                del tensor.external_data[:]
                for key, value in (("location", name), ("offset", str(where)), ("length", str(size))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                shared.references += 1
            protos.append((path, model))
            shared.graphs.append(path.name)
    if not store:  # nothing external: nothing to share
        tmp.unlink()
        return shared
    shared.replaced_bytes = sum(s.stat().st_size for s in sources if s.is_file())
    os.replace(tmp, target)
    for path, model in protos:
        onnx.save(model, str(path))
    for source in sources:
        if source != target and source.is_file():
            source.unlink()
    shared.bytes = target.stat().st_size
    return shared


class SharedWeights:
    """The external initializers of an export's graphs read once and handed to every session.

    An export stores its weights once on disk (:mod:`star_export.weights`: ``weights.onnx.data``,
    shared by every keep level's prefill graph and the decode graph). Left to itself, each
    onnxruntime session reads its own copy of them, and the CPU provider pre-packs its own copy of
    every MatMul weight on top: (levels + 1) x weights in memory. Here the data file is memory-mapped
    once (read-only, file-backed pages the kernel shares with every process that maps the file) and
    each initializer becomes one ``OrtValue`` over its slice of the mapping, given to every session
    through ``SessionOptions.add_initializer`` (onnxruntime uses the caller's buffer, no copy). Pre-
    packing is turned off in those sessions (``session.disable_prepacking``): its packed buffers are
    per session (the Python API has no shared pre-packed container) and would bring the copies back.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._maps: dict[str, np.ndarray] = {}  # data file -> its read-only memory map
        self.values: dict[tuple, Any] = {}  # (file, offset, length, dtype, dims) -> OrtValue
        self._arrays: list[np.ndarray] = []  # the OrtValues' buffers, alive as long as this object

    @property
    def bytes(self) -> int:
        """The bytes of the data files mapped (each once, whatever the number of sessions)."""
        return sum(m.nbytes for m in self._maps.values())

    def options(self, graph_path: Path, opts: Any) -> Any:
        """``opts`` with every external initializer of ``graph_path`` added from the shared mapping."""
        from onnx.helper import tensor_dtype_to_np_dtype

        model = onnx.load(str(graph_path), load_external_data=False)
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            dtype = np.dtype(tensor_dtype_to_np_dtype(tensor.data_type))
            offset, length = int(info.get("offset", 0)), int(info["length"])
            key = (info["location"], offset, length, dtype.str, tuple(tensor.dims))
            if key not in self.values:
                self.values[key] = self._value(info["location"], offset, length, dtype, tuple(tensor.dims))
            opts.add_initializer(tensor.name, self.values[key])
        opts.add_session_config_entry("session.disable_prepacking", "1")
        return opts

    def _value(self, location: str, offset: int, length: int, dtype: np.dtype, dims: tuple) -> Any:
        import onnxruntime as ort

        if location not in self._maps:
            self._maps[location] = np.memmap(self.directory / location, dtype=np.uint8, mode="r")
        array = self._maps[location][offset : offset + length].view(dtype).reshape(dims)
        self._arrays.append(array)
        return ort.OrtValue.ortvalue_from_numpy(array)
