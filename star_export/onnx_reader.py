"""Reading an ONNX graph without its weights, for the TensorRT-readiness check (``check.py``): every
node (subgraphs included), symbolic dims, which tensors are constants or computed from shapes, and
the integer values behind a constant operand (following pass-through ops to the initializer)."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator

import onnx
import onnx.inliner
from onnx import external_data_helper, numpy_helper

DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops that pass a constant value through unchanged (for resolving TopK's K).
PASS_THROUGH = frozenset({"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
# Random ops: their outputs are never constants, whatever their inputs.
NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"})


def label(node: onnx.NodeProto, index: int) -> str:
    return node.name or (f"{node.op_type}:{node.output[0]}" if node.output else f"{node.op_type}#{index}")


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, subgraphs (If/Loop/Scan bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_nodes(g)


def op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


def dims(value_info: onnx.ValueInfoProto) -> list[int | str] | None:
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out: list[int | str] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append("?")
    return out


def load(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str, str | None]:
    if isinstance(model, onnx.ModelProto):
        return model, "", None
    path = os.fspath(model)
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"not an ONNX model ({first})") from None
    if not proto.graph.node and not proto.graph.input:
        raise ValueError("not an ONNX model (no graph)")
    return proto, path, os.path.dirname(os.path.abspath(path))


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline model-local functions (dynamo writes some) so the parser's view is checked."""
    if len(model.functions):
        model = onnx.inliner.inline_local_functions(model)
    return model


class Graph:
    """Producer map, constants and shape-derived tensors of the main graph. ``opaque_ops``: ops whose
    outputs never count as constant or shape-derived (the check passes its forbidden ops)."""

    def __init__(self, graph: onnx.GraphProto, base_dir: str | None, opaque_ops: Collection[str] = ()):
        self.base_dir = base_dir
        inputs = {i.name for i in graph.input}
        self.initializers = {t.name: t for t in graph.initializer if t.name not in inputs}
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in iter_nodes(graph):
            for out in node.output:
                if out:
                    self.producer[out] = node
        self.const: set[str] = set(self.initializers)
        self.shape_derived: set[str] = set()
        for node in graph.node:  # ONNX requires topological order
            ins = [i for i in node.input if i]
            outs = [o for o in node.output if o]
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                self.const.update(outs)
            elif node.op_type in ("Shape", "Size") and node.domain in DEFAULT_DOMAINS:
                self.shape_derived.update(outs)
            elif node.op_type in NONDETERMINISTIC or node.op_type in opaque_ops or not ins:
                continue
            elif all(i in self.const for i in ins):
                self.const.update(outs)
            elif all(i in self.const or i in self.shape_derived for i in ins):
                self.shape_derived.update(outs)

    def shape_sources(self, name: str) -> set[str] | None:
        """The tensors whose Shape/Size a shape-derived tensor ``name`` reads, or None when ``name`` is
        not computed from shapes and constants alone (a value read from data)."""
        if name not in self.shape_derived:
            return None
        sources: set[str] = set()
        todo, seen = [name], set()
        while todo:
            t = todo.pop()
            node = self.producer.get(t)
            if t in seen or t in self.const or node is None:
                continue
            seen.add(t)
            if node.op_type in ("Shape", "Size"):
                sources.add(node.input[0])
            else:
                todo += [i for i in node.input if i]
        return sources

    def is_weights(self, name: str) -> bool:
        """An initializer or a Constant node's output: what the TensorRT parser imports as weights."""
        node = self.producer.get(name)
        return name in self.initializers or (
            node is not None and node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS
        )

    def origin(self, name: str) -> str:
        """How a non-weights tensor comes about, for messages."""
        if name not in self.producer:
            return "a graph input"
        if name in self.shape_derived:
            return "computed from a shape"
        if name in self.const:
            return "computed from constants (not folded into an initializer)"
        return "computed at run time"

    def static_value(self, name: str) -> tuple[bool, list[int] | None]:
        """(is constant, its integer values if readable) following pass-through ops to the source."""
        seen = 0
        while seen < 32:
            seen += 1
            if name in self.initializers:
                return True, self._tensor_values(self.initializers[name])
            node = self.producer.get(name)
            if node is None:
                return False, None
            if node.op_type == "Constant":
                return True, self._constant_values(node)
            if node.op_type in PASS_THROUGH and node.input and node.input[0]:
                name = node.input[0]
                continue
            return name in self.const, None
        return False, None

    def _tensor_values(self, tensor: onnx.TensorProto) -> list[int] | None:
        if external_data_helper.uses_external_data(tensor):
            if self.base_dir is None:
                return None
            tensor = onnx.TensorProto.FromString(tensor.SerializeToString())
            try:
                external_data_helper.load_external_data_for_tensor(tensor, self.base_dir)
            except (OSError, ValueError):
                return None
        try:
            return [int(v) for v in numpy_helper.to_array(tensor).reshape(-1).tolist()]
        except (TypeError, ValueError):
            return None

    def _constant_values(self, node: onnx.NodeProto) -> list[int] | None:
        for attr in node.attribute:
            if attr.name == "value":
                return self._tensor_values(attr.t)
            if attr.name == "value_int":
                return [int(attr.i)]
            if attr.name == "value_ints":
                return [int(v) for v in attr.ints]
        return None


def topk_k(node: onnx.NodeProto, g: Graph) -> tuple[bool, list[int] | None]:
    if len(node.input) > 1 and node.input[1]:
        return g.static_value(node.input[1])
    for attr in node.attribute:  # opset < 10: K is an attribute
        if attr.name == "k":
            return True, [int(attr.i)]
    return False, None


def attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default
