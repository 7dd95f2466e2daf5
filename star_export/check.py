"""TensorRT-readiness check of an exported ONNX graph, without TensorRT.

TensorRT cannot be installed on the machines that export, so this module answers the
question "will the TensorRT ONNX parser take this graph, and does it keep the static-shape
contract of STAR_SPEC.md?" from the graph alone. It reads only the ONNX protobuf (weights
stored as external data are never loaded) and the operator support list shipped in
``star_export/data/trt_onnx_ops.json`` (onnx-tensorrt ``docs/operators.md`` for TensorRT
10.15, the onnx-tensorrt changelog and the TensorRT 11.x release notes; the file names its
sources and what it could not find).

Rules (``Finding.rule``), each an ``error`` unless marked otherwise:

- ``opset``: the default-domain opset must lie in the target's parser range
  (TensorRT 10.0: 9..20, 10.15: 9..24, 11.5: 9..25).
- ``domain``: a node outside the default ONNX domain (``com.microsoft``, ``ai.onnx.ml``, ...)
  would only import as a TensorRT plugin of that name. Model-local functions (the dynamo
  exporter writes some) are inlined first, so only real custom ops are reported.
- ``unsupported-op``: the op is marked unsupported for the target, or is absent from the table.
- ``forbidden-op``: policy, not a parser limit. Ops whose output shape depends on tensor
  values (NonZero, NonMaxSuppression, Unique, Compress) or that loop (Loop, Scan) break the
  prefill contract "only B and T are dynamic", even where TensorRT could import them.
  ``If`` is a ``warning`` (``review-op``): TensorRT imports it and it does not by itself
  make shapes data-dependent, but a prefill graph should not need it.
- ``topk-dynamic-k``, ``topk-k-limit``, ``topk-k-axis``, ``topk-sorted``: TopK's K must be a
  constant (an initializer or a Constant node, possibly through Identity/Cast/Reshape/
  Squeeze/Unsqueeze/Flatten), or, for a keep range, computed from the SHAPE of a declared keep
  input only (``shape_k_inputs``, default ``keep_slots``: Shape/Size of it, then ops on constants
  and shapes, e.g. ``Min(576, 2 * Shape(keep_slots)[1])``), so every output shape still follows from
  the input shapes. TensorRT 8.6+ accepts a runtime K (``ITopKLayer`` input 1, a scalar Int32
  shape tensor), but a K computed from another tensor's shape (what ``torch.sort`` exports) makes
  the kept-token count follow the text or the image, and a K computed from tensor values makes
  the shapes data-dependent: both are rejected, so the policy is stricter than the parser. K must be at most 3840 (the TensorRT 10.16 / 11.1
  headers, ``INetworkDefinition::addTopK`` / ``ITopKLayer``: K <= 3840, as the TopK operator
  page says; operators.md's "less than 3840" is one short of what the headers allow) and <= the
  size of the reduced axis when that is known, and ``sorted`` must be 1 (default 1).
- ``const-operand``: operands the parser table requires to be constant. Where operators.md says
  "must be an initializer" (``axis`` of CumSum, ``axes`` of Slice, Pad and the Reduce ops) the
  operand must be an initializer or a Constant node, which the parser imports as weights; a
  value computed from constants or from a shape is a tensor to the parser and fails. Where it
  says "resolvable to a constant" / "build-time constant" (``axes`` of Squeeze/Unsqueeze,
  ``depth`` of OneHot) a subgraph of constants is enough.
- ``data-dependent-shape``: a shape operand (Reshape/Expand/Tile/Slice/Range/
  ConstantOfShape/Pad/Resize/Split/Squeeze/Unsqueeze/OneHot/Reduce axes) computed from
  tensor values rather than from constants and ``Shape``/``Size`` outputs.
- ``dtype``: element types the parser rejects (STRING, COMPLEX*, INT16, UINT16/32/64, ...).
  DOUBLE is narrowed to FLOAT by the parser: an error on graph inputs and outputs (the
  engine's binding would be float32, not the float64 the graph declares), a warning
  elsewhere. UINT8 off the graph I/O is a warning (TensorRT takes UINT8 only as network
  I/O). INT64 is native in TensorRT 9+ and fine for ids, masks and indices.
- ``op-dtype`` (warning): the inferred type of an op's data input is not in the parser
  table's "Supported Types" for that op. The table is coarse, so this only warns.
- ``input-dims``: with ``dynamic_inputs`` (``{"input_ids": {0: "batch", 1: "text_len"}}``),
  each listed axis must be symbolic (``dim_param``) and every other axis of every graph
  input a fixed positive integer; a symbol named differently from the declaration is a
  warning. ``static_inputs`` (``{"pixel_values": {1: 3, 2: 336, 3: 336}}``) pins values.
- ``shape-inference`` (warning): ONNX shape inference failed; type-based rules ran on what
  the graph declares.

Graph output shapes are reported (``output_dims``), not judged: an output dim named by a
symbol the inputs do not have (e.g. ``u0`` after NonZero) shows up there.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Any

import onnx
import onnx.inliner

from star_export.contract import KEEP_INPUT
from star_export.errors import UsageError
from star_export.onnx_reader import DEFAULT_DOMAINS
from star_export.onnx_reader import Graph as _Graph
from star_export.onnx_reader import attr_int as _attr_int
from star_export.onnx_reader import dims as _dims
from star_export.onnx_reader import iter_nodes as _iter_nodes
from star_export.onnx_reader import label as _label
from star_export.onnx_reader import load as _load
from star_export.onnx_reader import op_key as _op_key
from star_export.onnx_reader import prepare as _prepare
from star_export.onnx_reader import topk_k as _topk_k

TOPK_MAX_K = 3840  # NvInfer.h (TensorRT 10.16, 11.1) addTopK / ITopKLayer: K <= 3840

# Policy: rejected even where the TensorRT parser would import them (see the module docstring).
FORBIDDEN_OPS: Mapping[str, str] = MappingProxyType(
    {
        "NonZero": "output shape depends on tensor values",
        "NonMaxSuppression": "number of selected boxes depends on tensor values",
        "Unique": "output shape depends on tensor values",
        "Compress": "output shape depends on tensor values",
        "Loop": "control flow; trip count and scan-output length may depend on tensor values",
        "Scan": "control flow; not part of a static-shape prefill graph",
    }
)
REVIEW_OPS: Mapping[str, str] = MappingProxyType(
    {"If": "data-dependent control flow; TensorRT imports it, a prefill graph should not need it"}
)

_REDUCE_OPS = tuple(
    f"Reduce{r}"
    for r in ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum", "SumSquare")
)
# Operand positions that define an output shape (must be constant or shape-derived).
_SHAPE_OPERANDS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        "Reshape": (1,),
        "Expand": (1,),
        "Tile": (1,),
        "ConstantOfShape": (0,),
        "Range": (0, 1, 2),
        "Slice": (1, 2, 3, 4),
        "Pad": (1, 3),
        "Resize": (2, 3),
        "Upsample": (1,),
        "Split": (1,),
        "Squeeze": (1,),
        "Unsqueeze": (1,),
        "OneHot": (1,),
        **dict.fromkeys(_REDUCE_OPS, (1,)),
    }
)
# Operand positions operators.md says "must be an initializer": initializer or Constant node only.
_INITIALIZER_OPERANDS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        "CumSum": (1,),
        "Slice": (3,),
        "Pad": (3,),
        **dict.fromkeys(_REDUCE_OPS, (1,)),
    }
)
# Operand positions that must resolve to a constant ("resolvable to a constant", "build-time constant").
_CONST_OPERANDS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        "Squeeze": (1,),
        "Unsqueeze": (1,),
        "OneHot": (1,),
    }
)
# Which input carries the type that the table's "Supported Types" column describes (default 0).
_DATA_INPUT: Mapping[str, int] = MappingProxyType({"Where": 1})
# ONNX element type name -> the code used in the parser table's "Supported Types" column.
_TABLE_TYPE = MappingProxyType(
    {
        "FLOAT": "FP32",
        "DOUBLE": "FP32",  # narrowed to FLOAT by the parser
        "FLOAT16": "FP16",
        "BFLOAT16": "BF16",
        "INT32": "INT32",
        "INT64": "INT64",
        "INT8": "INT8",
        "UINT8": "UINT8",
        "BOOL": "BOOL",
        "FLOAT8E4M3FN": "FP8",
        "FLOAT4E2M1": "FP4",
        "INT4": "INT4",
    }
)


@dataclass(frozen=True)
class Finding:
    """One problem: ``severity`` is "error" (the graph is not ready) or "warning"."""

    severity: str
    rule: str
    node: str
    op: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {
            "severity": self.severity,
            "rule": self.rule,
            "node": self.node,
            "op": self.op,
            "message": self.message,
        }


@dataclass
class CheckReport:
    """Result of `check_onnx`; ``ok`` when no finding is an error."""

    path: str
    opset: int
    target: str
    op_counts: dict[str, int]
    findings: list[Finding]
    input_dims: dict[str, list[int | str]]
    output_dims: dict[str, list[int | str]] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "target": self.target,
            "opset": self.opset,
            "ok": self.ok,
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "op_counts": dict(self.op_counts),
            "input_dims": {k: list(v) for k, v in self.input_dims.items()},
            "output_dims": {k: list(v) for k, v in self.output_dims.items()},
            "findings": [f.to_dict() for f in self.findings],
        }

    def format(self) -> str:
        """A short text report: one row per op type, then the findings."""
        worst: dict[str, str] = {}
        for f in self.findings:
            if f.op and worst.get(f.op) != "error":
                worst[f.op] = f.severity
        width = max([len("op"), *(len(op) for op in self.op_counts)])
        verdict = "OK" if self.ok else "NOT READY"
        lines = [
            f"TensorRT {self.target} readiness of {self.path or '<in-memory model>'} (opset {self.opset}): "
            f"{verdict}, {len(self.errors)} error(s), {len(self.warnings)} warning(s)",
            f"{'op':<{width}}  {'count':>5}  status",
        ]
        for op, n in sorted(self.op_counts.items()):
            lines.append(f"{op:<{width}}  {n:>5}  {worst.get(op, 'ok')}")
        for name, dims in self.input_dims.items():
            lines.append(f"input  {name}: {dims}")
        for name, dims in self.output_dims.items():
            lines.append(f"output {name}: {dims}")
        for f in self.findings:
            where = " ".join(x for x in (f.op, f.node) if x)
            where = f" [{where}]" if where else ""
            lines.append(f"{f.severity.upper():7} {f.rule}{where}: {f.message}")
        return "\n".join(lines)


# --- the shipped support list -------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def support_data() -> Mapping[str, Any]:
    """The parsed ``data/trt_onnx_ops.json`` (read once)."""
    text = resources.files("star_export").joinpath("data/trt_onnx_ops.json").read_text(encoding="utf-8")
    return json.loads(text)


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def resolve_target(target: str) -> str:
    """Map ``"10"``/``"11"`` to the documented release they stand for; reject unknown targets."""
    data = support_data()
    key = data["aliases"].get(str(target), str(target))
    if key not in data["targets"]:
        known = sorted([*data["targets"], *data["aliases"]])
        raise UsageError(f"unknown TensorRT target {target!r}; known: {', '.join(known)}")
    return key


@functools.lru_cache(maxsize=8)
def _op_table(target: str) -> Mapping[str, Mapping[str, Any]]:
    """Op name -> table entry for one resolved target (ops added later marked unsupported)."""
    data = support_data()
    ver = _version(target)
    table: dict[str, Mapping[str, Any]] = {}
    entries = dict(data["ops"])
    if ver[0] >= 11:
        entries.update(data.get("ops_added_11", {}))
    for name, entry in entries.items():
        since = entry.get("since")
        if since and _version(since) > ver:
            entry = {**entry, "supported": False, "restrictions": f"added in TensorRT {since}"}
        table[name] = entry
    return MappingProxyType(table)


def topk_nodes(model: str | os.PathLike | onnx.ModelProto) -> list[tuple[str, int | None]]:
    """(node name, constant K or None) for every TopK node, local functions inlined."""
    proto, _, base_dir = _load(model)
    proto = _prepare(proto)
    g = _Graph(proto.graph, base_dir, FORBIDDEN_OPS)
    out: list[tuple[str, int | None]] = []
    for i, node in enumerate(_iter_nodes(proto.graph)):
        if node.op_type == "TopK" and node.domain in DEFAULT_DOMAINS:
            k = _topk_k(node, g)
            out.append((_label(node, i), k[1][0] if k[0] and k[1] and len(k[1]) == 1 else None))
    return out


# --- the check ----------------------------------------------------------------------------------


class _Findings(list):
    """The findings of one check, with one-line adders."""

    def error(self, rule: str, message: str, node: str = "", op: str = "") -> None:
        self.append(Finding("error", rule, node, op, message))

    def warn(self, rule: str, message: str, node: str = "", op: str = "") -> None:
        self.append(Finding("warning", rule, node, op, message))


def check_onnx(
    model: str | os.PathLike | onnx.ModelProto,
    target: str = "10",
    dynamic_inputs: Mapping[str, Mapping[int, str]] | None = None,
    static_inputs: Mapping[str, Mapping[int, int]] | None = None,
    shape_k_inputs: Collection[str] = (KEEP_INPUT,),
) -> CheckReport:
    """Check an ONNX model (a path or a ModelProto) for the TensorRT ONNX parser of ``target``.

    ``target``: "10" (= 10.15), "10.0", "10.15", "11" (= 11.5) or "11.5".
    ``dynamic_inputs``: {input name: {axis: symbol}}; when given, the listed axes must be symbolic
    and every other axis of every graph input a fixed positive integer.
    ``static_inputs``: {input name: {axis: size}}: axes that must have exactly that size.
    ``shape_k_inputs``: graph inputs whose SHAPE may set a TopK's K (a keep range's ``keep_slots``).
    External-data weights are never read (only a TopK K stored externally, a few bytes).
    """
    key = resolve_target(target)
    proto, path, base_dir = _load(model)
    proto = _prepare(proto)
    found = _Findings()

    opset = _check_opset(proto, key, found)
    typed = _infer(proto, found)
    graph = typed.graph
    g = _Graph(graph, base_dir, FORBIDDEN_OPS)
    _check_ops(graph, key, found)
    _check_topk(graph, g, found, frozenset(shape_k_inputs))
    _check_operands(graph, g, found)
    _check_dtypes(graph, key, found)
    _check_input_dims(graph, g, dynamic_inputs, static_inputs, found)

    found.sort(key=lambda f: f.severity != "error")  # errors first, otherwise in check order
    return CheckReport(
        path=path,
        opset=opset,
        target=key,
        op_counts=dict(sorted(Counter(_op_key(n) for n in _iter_nodes(graph)).items())),
        findings=list(found),
        input_dims={i.name: (_dims(i) or ["?"]) for i in graph.input if i.name not in g.initializers},
        output_dims={o.name: (_dims(o) or ["?"]) for o in graph.output},
    )


def _check_opset(proto: onnx.ModelProto, key: str, found: _Findings) -> int:
    opsets = [o.version for o in proto.opset_import if o.domain in DEFAULT_DOMAINS]
    if not opsets:
        found.error("opset", "the model imports no default-domain ONNX opset")
        return 0
    opset = max(opsets)
    spec = support_data()["targets"][key]
    lo, hi = spec["opset_min"], spec["opset_max"]
    if not lo <= opset <= hi:
        found.error(
            "opset", f"default-domain opset {opset} is outside TensorRT {key}'s parser range {lo}..{hi}"
        )
    return opset


def _infer(proto: onnx.ModelProto, found: _Findings) -> onnx.ModelProto:
    """The model with inferred value_info; the model itself when inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as e:  # onnx raises several types (InferenceError, ValidationError, RuntimeError)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        found.warn("shape-inference", f"ONNX shape inference failed ({msg}); inferred types unchecked")
        return proto


def _check_ops(graph: onnx.GraphProto, key: str, found: _Findings) -> None:
    table = _op_table(key)
    nodes: dict[str, list[str]] = {}  # op key -> node labels
    domain: dict[str, str] = {}
    for i, node in enumerate(_iter_nodes(graph)):
        op = _op_key(node)
        nodes.setdefault(op, []).append(_label(node, i))
        domain[op] = node.domain
        if op == "Constant":
            bad = [
                a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")
            ]
            if bad:
                found.error("unsupported-op", f"Constant with {bad[0]} is unsupported", _label(node, i), op)
    for op, labels in nodes.items():
        where = labels[0]
        many = f" ({len(labels)} nodes, first {where})" if len(labels) > 1 else ""
        entry = table.get(op)
        if domain[op] not in DEFAULT_DOMAINS:
            msg = f"custom-domain op {op}{many}: the parser takes it only as a registered TensorRT plugin"
            found.error("domain", msg, where, op)
        elif op in FORBIDDEN_OPS:
            found.error("forbidden-op", f"{op}: {FORBIDDEN_OPS[op]}{many}", where, op)
        elif op in REVIEW_OPS:
            found.warn("review-op", f"{op}: {REVIEW_OPS[op]}{many}", where, op)
        elif entry is None:
            msg = f"{op} is not in the TensorRT {key} parser table{many}; it would be looked up as a plugin"
            found.error("unsupported-op", msg, where, op)
        elif not entry["supported"]:
            why = f": {entry['restrictions']}" if entry.get("restrictions") else ""
            found.error(
                "unsupported-op", f"{op} is unsupported by the TensorRT {key} parser{many}{why}", where, op
            )


def _check_topk(graph: onnx.GraphProto, g: _Graph, found: _Findings, keep_inputs: frozenset[str]) -> None:
    shapes = {vi.name: _dims(vi) for vi in [*graph.value_info, *graph.input, *graph.output]}
    graph_inputs = {i.name for i in graph.input} - set(g.initializers)
    for i, node in enumerate(_iter_nodes(graph)):
        if node.op_type != "TopK" or node.domain not in DEFAULT_DOMAINS:
            continue
        name = _label(node, i)
        is_const, values = _topk_k(node, g)
        if not is_const:
            src = node.input[1] if len(node.input) > 1 else "<missing>"
            read = g.shape_sources(src)
            if read and read <= keep_inputs & graph_inputs:
                continue  # a keep range: K follows the keep input's shape only
            if read is None:
                kind = "computed from tensor values (data-dependent)"
            else:
                kind = f"computed from the shape of {', '.join(sorted(read)) or 'nothing'}"
            msg = (
                f"TopK K ('{src}') is {kind}: the kept count must be a literal (torch.topk(x, k) with an "
                f"int k, not torch.sort) or follow the shape of a keep input ({', '.join(sorted(keep_inputs))})"
            )
            found.error("topk-dynamic-k", msg, name, "TopK")
        elif values is None or len(values) != 1:
            found.warn("topk-k-limit", "TopK K is constant but its value could not be read", name, "TopK")
        else:
            k = values[0]
            if not 1 <= k <= TOPK_MAX_K:
                msg = f"TopK K={k} is outside TensorRT's limit 1..{TOPK_MAX_K} (K at most {TOPK_MAX_K})"
                found.error("topk-k-limit", msg, name, "TopK")
            dims = shapes.get(node.input[0])
            axis = _attr_int(node, "axis", -1)
            size = dims[axis] if dims and -len(dims) <= axis < len(dims) else None
            if isinstance(size, int) and k > size:
                found.error("topk-k-axis", f"TopK K={k} exceeds the size {size} of axis {axis}", name, "TopK")
        if _attr_int(node, "sorted", 1) != 1:
            found.error("topk-sorted", "TopK sorted=0: TensorRT requires sorted=1", name, "TopK")


def _check_operands(graph: onnx.GraphProto, g: _Graph, found: _Findings) -> None:
    for i, node in enumerate(graph.node):
        if node.domain not in DEFAULT_DOMAINS:
            continue
        present = [(pos, node.input[pos]) for pos in range(len(node.input)) if node.input[pos]]
        for pos, src in present:
            if pos in _INITIALIZER_OPERANDS.get(node.op_type, ()) and not g.is_weights(src):
                msg = (
                    f"input {pos} ('{src}') of {node.op_type} must be an initializer for TensorRT "
                    f"(operators.md); it is {g.origin(src)}"
                )
                found.error("const-operand", msg, _label(node, i), node.op_type)
            elif pos in _CONST_OPERANDS.get(node.op_type, ()) and not g.static_value(src)[0]:
                msg = f"input {pos} ('{src}') of {node.op_type} must be a constant for TensorRT"
                found.error("const-operand", msg, _label(node, i), node.op_type)
            elif pos in _SHAPE_OPERANDS.get(node.op_type, ()) and src not in g.const | g.shape_derived:
                msg = (
                    f"shape operand {pos} ('{src}') of {node.op_type} depends on tensor values, so the output "
                    "shape is data-dependent"
                )
                found.error("data-dependent-shape", msg, _label(node, i), node.op_type)


def _tensor_types(graph: onnx.GraphProto) -> dict[str, str]:
    """Tensor name -> ONNX element type name, from initializers, Constants, value_info and the I/O."""
    types: dict[str, int] = {t.name: t.data_type for t in graph.initializer}
    for node in _iter_nodes(graph):
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value" and node.output:
                types[node.output[0]] = attr.t.data_type
    for vi in [*graph.value_info, *graph.input, *graph.output]:  # declared I/O types last: they win
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return {name: onnx.TensorProto.DataType.Name(t) for name, t in types.items()}


def _check_dtypes(graph: onnx.GraphProto, key: str, found: _Findings) -> None:
    dt = support_data()["dtypes"]
    supported, downcast, io_only = set(dt["supported"]), set(dt["downcast"]), set(dt["io_only"])
    graph_inputs = {v.name for v in graph.input}
    io_names = graph_inputs | {v.name for v in graph.output}
    types = _tensor_types(graph)

    grouped: dict[tuple[str, str, str], list[str]] = {}
    for name, tname in sorted(types.items()):
        if name in io_names and tname not in supported:
            kind = "input" if name in graph_inputs else "output"
            why = (
                "narrowed to FLOAT by the parser: the engine binding would be float32"
                if tname in downcast
                else ""
            )
            found.error("dtype", f"graph {kind} '{name}' is {tname}: {why or 'not a TensorRT type'}", name)
        elif name in io_names:
            continue
        elif tname in downcast:
            grouped.setdefault(
                ("warning", tname, "narrowed to FLOAT, values clamped to +-FLT_MAX"), []
            ).append(name)
        elif tname in io_only:
            grouped.setdefault(("warning", tname, "TensorRT takes UINT8 only as network I/O"), []).append(
                name
            )
        elif tname not in supported:
            grouped.setdefault(("error", tname, "not a TensorRT type"), []).append(name)
    for (severity, tname, why), names in grouped.items():
        shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        (found.error if severity == "error" else found.warn)(
            "dtype", f"{tname} tensors ({why}): {shown}", names[0]
        )

    table = _op_table(key)
    seen: set[tuple[str, str]] = set()
    for i, node in enumerate(_iter_nodes(graph)):
        listed = table.get(node.op_type, {}).get("types") if node.domain in DEFAULT_DOMAINS else None
        pos = _DATA_INPUT.get(node.op_type, 0)
        if not listed or len(node.input) <= pos or node.input[pos] not in types:
            continue
        tname = types[node.input[pos]]
        code = _TABLE_TYPE.get(tname)
        if code is None or code in listed or (node.op_type, tname) in seen:
            continue
        seen.add((node.op_type, tname))
        msg = f"{node.op_type} input {pos} is {tname}; the parser table lists {', '.join(listed)}"
        found.warn("op-dtype", msg, _label(node, i), node.op_type)


def _check_input_dims(
    graph: onnx.GraphProto,
    g: _Graph,
    dynamic_inputs: Mapping[str, Mapping[int, str]] | None,
    static_inputs: Mapping[str, Mapping[int, int]] | None,
    found: _Findings,
) -> None:
    inputs = {i.name: _dims(i) for i in graph.input if i.name not in g.initializers}
    for name, dims in inputs.items():
        if dims is None:
            found.warn("input-dims", f"graph input '{name}' has no shape (unknown rank)", name)
    for name in {*(dynamic_inputs or {}), *(static_inputs or {})} - set(inputs):
        found.error("input-dims", f"declared input '{name}' is not a graph input", name)

    for name, dims in inputs.items():
        if dynamic_inputs is None or dims is None:
            continue
        declared = {int(a): s for a, s in dynamic_inputs.get(name, {}).items()}
        declared = {a + len(dims) if -len(dims) <= a < 0 else a: s for a, s in declared.items()}
        for axis in sorted(a for a in declared if not 0 <= a < len(dims)):
            found.error("input-dims", f"'{name}' has no axis {axis} (rank {len(dims)})", name)
        for axis, d in enumerate(dims):
            symbol = declared.get(axis)
            if symbol is None:
                if not (isinstance(d, int) and d > 0):
                    msg = f"'{name}' axis {axis} is '{d}' but must be a fixed size (only declared axes are dynamic)"
                    found.error("input-dims", msg, name)
            elif isinstance(d, int):
                found.error(
                    "input-dims",
                    f"'{name}' axis {axis} is fixed to {d} but must be dynamic ('{symbol}')",
                    name,
                )
            elif d == "?":
                found.warn("input-dims", f"'{name}' axis {axis} is dynamic but has no symbol", name)
            elif d != symbol:
                found.warn("input-dims", f"'{name}' axis {axis} is named '{d}', declared '{symbol}'", name)

    for name, axes in (static_inputs or {}).items():
        dims = inputs.get(name)
        for axis, size in axes.items() if dims else ():
            a = int(axis)
            d = dims[a] if -len(dims) <= a < len(dims) else None
            if d != size:
                found.error("input-dims", f"'{name}' axis {a} is {d!r}, expected {size}", name)
