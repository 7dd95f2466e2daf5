"""Tests for star_export.check: small hand-built graphs, one saved with external data, two dynamo exports."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from star_export.check import FORBIDDEN_OPS, CheckReport, check_onnx, support_data, topk_nodes
from star_export.errors import UsageError

DYN = {"scores": {0: "batch"}, "input_ids": {0: "batch", 1: "text_len"}}


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = 18,
    extra_opsets: Sequence[onnx.OperatorSetIdProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets], ir_version=10
    )
    return model


def _k(value: int, name: str = "k") -> onnx.TensorProto:
    return numpy_helper.from_array(np.array([value], dtype=np.int64), name)


def _good(
    k: int = 4, sorted_: int | None = None, opset: int = 18, batch: int | str = "batch"
) -> onnx.ModelProto:
    """scores [B, 16] -> TopK(K const) -> ascending TopK of the indices -> Gather rows; ids [B, T] pass."""
    topk_attrs = {"axis": -1} if sorted_ is None else {"axis": -1, "sorted": sorted_}
    nodes = [
        helper.make_node("TopK", ["scores", "k"], ["vals", "idx"], name="topk_keep", **topk_attrs),
        helper.make_node("TopK", ["idx", "k"], ["sidx", "_"], name="topk_sort", axis=-1, largest=0),
        helper.make_node("GatherElements", ["scores", "sidx"], ["kept"], name="gather_keep", axis=1),
        helper.make_node("Add", ["input_ids", "one"], ["ids_out"], name="add_ids"),
    ]
    inputs = [
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 16]),
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, "text_len"]),
    ]
    outputs = [
        helper.make_tensor_value_info("kept", TensorProto.FLOAT, [batch, k]),
        helper.make_tensor_value_info("sidx", TensorProto.INT64, [batch, k]),
        helper.make_tensor_value_info("ids_out", TensorProto.INT64, [batch, "text_len"]),
    ]
    inits = [_k(k), numpy_helper.from_array(np.array(1, dtype=np.int64), "one")]
    return _model(nodes, inputs, outputs, inits, opset=opset)


def _rules(report: CheckReport, severity: str = "error") -> set[str]:
    return {f.rule for f in report.findings if f.severity == severity}


def test_good_graph_passes_and_serialises():
    report = check_onnx(_good(), target="10", dynamic_inputs=DYN)
    assert report.ok, report.format()
    assert report.findings == []
    assert report.target == "10.15"
    assert report.opset == 18
    assert report.op_counts == {"Add": 1, "GatherElements": 1, "TopK": 2}
    assert report.input_dims == {"scores": ["batch", 16], "input_ids": ["batch", "text_len"]}
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] is True and d["output_dims"]["kept"] == ["batch", 4]
    text = report.format()
    assert "OK" in text and "TopK" in text and "GatherElements" in text
    assert topk_nodes(_good()) == [("topk_keep", 4), ("topk_sort", 4)]


def test_topk_k_from_shape_is_dynamic_and_fails():
    # K = Shape(scores)[1:2], what torch.sort exports: a shape-derived, not literal, K.
    nodes = [
        helper.make_node("Shape", ["scores"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "one"], ["n"], name="gather_n", axis=0),
        helper.make_node("Reshape", ["n", "r1"], ["k_dyn"], name="reshape_k"),
        helper.make_node("TopK", ["scores", "k_dyn"], ["vals", "idx"], name="topk_dyn", axis=-1),
    ]
    inits = [
        numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "r1"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", "k"])],
        inits,
    )
    report = check_onnx(model)
    assert not report.ok
    [f] = report.errors
    assert f.rule == "topk-dynamic-k" and f.op == "TopK" and f.node == "topk_dyn"
    assert "shape" in f.message
    assert topk_nodes(model) == [("topk_dyn", None)]


def test_topk_k_from_constant_node_passes():
    model = _good()
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "k"))
    model.graph.node.insert(0, helper.make_node("Constant", [], ["k"], name="k_const", value=_k(4, "kv")))
    assert check_onnx(model).ok
    assert topk_nodes(model) == [("topk_keep", 4), ("topk_sort", 4)]


def _topk_model(k: int) -> onnx.ModelProto:
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="big_topk", axis=-1)]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5000])],
        [helper.make_tensor_value_info("i", TensorProto.INT64, [1, k])],
        [_k(k)],
    )


@pytest.mark.parametrize("k, ok", [(3839, True), (3840, True), (3841, False), (4096, False)])
def test_topk_k_must_be_at_most_3840(k: int, ok: bool):
    """The TensorRT 10.16 / 11.1 headers (addTopK / ITopKLayer): K <= 3840, so 3840 passes, 3841 fails."""
    report = check_onnx(_topk_model(k))
    assert report.ok is ok
    if not ok:
        assert _rules(report) == {"topk-k-limit"}
        assert f"K={k}" in report.errors[0].message and "at most 3840" in report.errors[0].message


def test_topk_k_larger_than_axis_fails():
    report = check_onnx(_good(k=17), dynamic_inputs=DYN)
    assert "topk-k-axis" in _rules(report)


def test_topk_sorted_zero_fails():
    report = check_onnx(_good(sorted_=0), dynamic_inputs=DYN)
    assert _rules(report) == {"topk-sorted"}
    assert report.errors[0].node == "topk_keep"
    assert check_onnx(_good(sorted_=1), dynamic_inputs=DYN).ok


def test_nonzero_fails_as_forbidden():
    nodes = [helper.make_node("NonZero", ["x"], ["nz"], name="nz")]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("nz", TensorProto.INT64, [2, "n"])],
    )
    report = check_onnx(model)
    assert not report.ok
    assert [(f.rule, f.op) for f in report.errors] == [("forbidden-op", "NonZero")]
    assert "NonZero" in FORBIDDEN_OPS
    # The parser itself supports NonZero (TensorRT 8.5+): the rejection is policy, and the data says so.
    assert support_data()["ops"]["NonZero"]["supported"] is True


def test_custom_domain_op_fails():
    nodes = [helper.make_node("FusedMatMul", ["a", "b"], ["y"], name="fmm", domain="com.microsoft")]
    model = _model(
        nodes,
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        extra_opsets=[helper.make_opsetid("com.microsoft", 1)],
    )
    report = check_onnx(model)
    assert [(f.rule, f.op) for f in report.errors] == [("domain", "com.microsoft::FusedMatMul")]
    assert report.op_counts == {"com.microsoft::FusedMatMul": 1}


def test_local_function_is_inlined_not_reported():
    body = [helper.make_node("Relu", ["x"], ["y"])]
    fn = helper.make_function("local.fns", "MyRelu", ["x"], ["y"], body, [helper.make_opsetid("", 18)])
    model = _model(
        [helper.make_node("MyRelu", ["a"], ["b"], name="call", domain="local.fns")],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 3])],
        extra_opsets=[helper.make_opsetid("local.fns", 1)],
    )
    model.functions.append(fn)
    report = check_onnx(model)
    assert report.ok, report.format()
    assert report.op_counts == {"Relu": 1}


def test_float64_input_fails():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    report = check_onnx(model)
    dtype_errors = [f for f in report.errors if f.rule == "dtype"]
    assert [f.node for f in dtype_errors] == ["x"]
    assert "DOUBLE" in dtype_errors[0].message


def test_unsupported_dtype_initializer_fails_and_int64_is_fine():
    nodes = [helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.UINT32, [2])],
        [helper.make_tensor_value_info("y", TensorProto.UINT32, [2])],
        [numpy_helper.from_array(np.array([1, 2], dtype=np.uint32), "c")],
    )
    report = check_onnx(model)
    assert {f.node for f in report.errors if f.rule == "dtype"} == {"x", "y", "c"}
    assert check_onnx(_good()).ok  # INT64 ids and TopK indices are fine for TensorRT 10


def test_fixed_batch_fails_when_declared_dynamic():
    report = check_onnx(_good(batch=2), dynamic_inputs=DYN)
    errors = [f for f in report.errors if f.rule == "input-dims"]
    assert {f.node for f in errors} == {"scores", "input_ids"}
    assert all("axis 0 is fixed to 2" in f.message for f in errors)
    # Without the declaration the same graph is fine: a fixed batch is a contract question, not a parser one.
    assert check_onnx(_good(batch=2)).ok


def test_undeclared_symbolic_axis_fails():
    # scores' axis 1 is fixed (16); declaring only the batch of input_ids leaves its text_len undeclared.
    report = check_onnx(_good(), dynamic_inputs={"scores": {0: "batch"}, "input_ids": {0: "batch"}})
    [f] = report.errors
    assert f.rule == "input-dims" and f.node == "input_ids" and "axis 1" in f.message


def test_static_inputs_pin_sizes():
    assert check_onnx(_good(), static_inputs={"scores": {1: 16}}).ok
    report = check_onnx(_good(), static_inputs={"scores": {1: 24}})
    assert _rules(report) == {"input-dims"}


@pytest.mark.parametrize(
    ("opset", "target", "ok"),
    [
        (8, "10", False),
        (18, "10.0", True),
        (21, "10.0", False),
        (24, "10", True),
        (25, "10", False),
        (25, "11", True),
    ],
)
def test_opset_range(opset: int, target: str, ok: bool):
    report = check_onnx(_good(opset=opset) if opset >= 11 else _opset8_model(), target=target)
    assert report.ok is ok, report.format()
    assert report.opset == opset
    if not ok:
        assert "opset" in _rules(report)


def _opset8_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        opset=8,
    )


def test_unknown_target_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown TensorRT target"):
        check_onnx(_good(), target="9")


def test_op_added_after_target_is_unsupported():
    # RMSNormalization (opset 23) is in the 10.15 table but was added in 10.15.
    nodes = [helper.make_node("RMSNormalization", ["x", "s"], ["y"], name="rms", axis=-1)]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(np.ones(8, dtype=np.float32), "s")],
        opset=23,
    )
    assert check_onnx(model, target="10.15").ok
    report = check_onnx(model, target="11")
    assert report.ok
    # 10.0 fails twice over: opset 23 > 20 and the op itself.
    assert _rules(check_onnx(model, target="10.0")) == {"opset", "unsupported-op"}


def test_data_dependent_reshape_fails():
    # Reshape whose shape comes from tensor values (ArgMax of the data), not from Shape/constants.
    nodes = [
        helper.make_node("ArgMax", ["x"], ["am"], name="argmax", axis=1, keepdims=0),
        helper.make_node("Concat", ["m1", "am"], ["new_shape"], name="cat", axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["y"], name="reshape_dd"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([-1], dtype=np.int64), "m1")],
    )
    report = check_onnx(model)
    assert [(f.rule, f.node) for f in report.errors] == [("data-dependent-shape", "reshape_dd")]


def _int64(name: str, values: Sequence[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _operand_model(op: str, operand: str, source: str) -> onnx.ModelProto:
    """x [B, 8, 16] -> ``op`` whose axis/axes operand comes from ``source``: "init" (an initializer),
    "constant" (a Constant node), "folded" (Add of two initializers), "shape" (Shape -> Size - 2),
    "input" (a graph input)."""
    nodes: list[onnx.NodeProto] = []
    inits = [_int64("one_i", [1]), _int64("zero_i", [0])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 16])]
    if source == "init":
        inits.append(_int64(operand, [1]))
    elif source == "constant":
        nodes.append(helper.make_node("Constant", [], [operand], value=_int64("c", [1])))
    elif source == "folded":
        nodes.append(helper.make_node("Add", ["one_i", "zero_i"], [operand]))
    elif source == "shape":
        nodes += [
            helper.make_node("Shape", ["x"], ["shp"]),
            helper.make_node("Size", ["shp"], ["rank"]),
            helper.make_node("Sub", ["rank", "two"], ["rank_2"]),
            helper.make_node("Reshape", ["rank_2", "one_i"], [operand]),
        ]
        inits.append(_int64("two", []))
    else:
        inputs.append(helper.make_tensor_value_info(operand, TensorProto.INT64, [1]))
    if op == "CumSum":
        nodes.append(helper.make_node("CumSum", ["x", operand], ["y"], name="cumsum"))
        out = ["batch", 8, 16]
    elif op == "Slice":
        inits += [_int64("starts", [0]), _int64("ends", [4])]
        nodes.append(helper.make_node("Slice", ["x", "starts", "ends", operand], ["y"], name="slice"))
        out = ["batch", 4, 16]
    else:  # Pad (opset 18: data, pads, constant_value, axes)
        inits.append(_int64("pads", [1, 1]))
        nodes.append(helper.make_node("Pad", ["x", "pads", "", operand], ["y"], name="pad"))
        out = ["batch", 10, 16]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)]
    return _model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("op, operand", [("CumSum", "axis"), ("Slice", "axes"), ("Pad", "axes")])
@pytest.mark.parametrize(
    "source, ok, origin",
    [
        ("init", True, ""),
        ("constant", True, ""),
        ("folded", False, "computed from constants"),
        ("shape", False, "computed from a shape"),
        ("input", False, "a graph input"),
    ],
)
def test_operands_that_must_be_initializers(op: str, operand: str, source: str, ok: bool, origin: str):
    """operators.md: CumSum `axis`, Slice `axes`, Pad `axes` "must be an initializer"."""
    report = check_onnx(_operand_model(op, operand, source))
    if ok:
        assert report.ok, report.format()
        return
    assert _rules(report) == {"const-operand"}, report.format()
    (error,) = report.errors
    assert error.op == op and f"'{operand}'" in error.message and "must be an initializer" in error.message
    assert origin in error.message


def test_slice_without_axes_passes():
    model = _operand_model("Slice", "axes", "init")
    node = next(n for n in model.graph.node if n.op_type == "Slice")
    del node.input[3]
    assert check_onnx(model).ok


def test_saved_model_with_external_data(tmp_path):
    model = _good(k=3)
    big = numpy_helper.from_array(np.zeros((64, 64), dtype=np.float32), "w")
    model.graph.initializer.append(big)
    path = tmp_path / "m.onnx"
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "m.onnx.data").exists()
    report = check_onnx(path, dynamic_inputs=DYN)
    assert report.ok, report.format()
    assert report.path == str(path)
    # K itself lives in the external file; it is the one tensor read from there.
    assert topk_nodes(path) == [("topk_keep", 3), ("topk_sort", 3)]


# --- dynamo exports ------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


class _KeepTopK(torch.nn.Module):
    def forward(self, feats, input_ids):  # feats (B, N, D), input_ids (B, T)
        score = feats.mean(-1)  # (B, N)
        idx = torch.topk(score, 4, dim=-1).indices  # (B, 4)
        idx = torch.topk(idx, 4, dim=-1, largest=False).values  # ascending, K stays a literal
        kept = torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))  # (B, 4, D)
        return kept, input_ids + 1


class _NonZero(torch.nn.Module):
    def forward(self, x):
        return torch.nonzero(x > 0)


def _export(module, args, dynamic_shapes) -> onnx.ModelProto:
    program = torch.onnx.export(
        module.eval(), args, dynamo=True, opset_version=18, dynamic_shapes=dynamic_shapes, verbose=False
    )
    return program.model_proto


def test_dynamo_topk_export_passes():
    from torch.export import Dim

    batch, text = Dim("batch", min=1, max=8), Dim("text_len", min=2, max=64)
    model = _export(
        _KeepTopK(),
        (torch.randn(2, 16, 8), torch.ones(2, 5, dtype=torch.long)),
        {"feats": {0: batch}, "input_ids": {0: batch, 1: text}},
    )
    report = check_onnx(
        model, dynamic_inputs={"feats": {0: "batch"}, "input_ids": {0: "batch", 1: "text_len"}}
    )
    assert report.ok, report.format()
    assert report.op_counts["TopK"] == 2
    assert [k for _, k in topk_nodes(model)] == [4, 4]
    assert report.input_dims["feats"] == ["batch", 16, 8]


def test_dynamo_nonzero_export_fails():
    from torch.export import Dim

    model = _export(_NonZero(), (torch.randn(2, 16),), {"x": {0: Dim("batch", min=1, max=8)}})
    report = check_onnx(model, dynamic_inputs={"x": {0: "batch"}})
    assert not report.ok
    assert ("forbidden-op", "NonZero") in {(f.rule, f.op) for f in report.errors}
    # The data-dependent row count shows up in the reported output shape, as a symbol no input has.
    [out_dims] = report.output_dims.values()
    assert isinstance(out_dims[0], str) and out_dims[0] not in ("batch",)


@pytest.mark.parametrize(
    "name, args",
    [("llava-keep16", ("--keep", "16")), ("llava-keep16-fp16", ("--keep", "16", "--dtype", "fp16"))],
)
def test_the_projects_exports_pass(cli_export, name: str, args: tuple[str, ...]):
    """The tiny LLaVA's prefill/decode graphs (fp32 and fp16) pass every target, the stricter
    operand rules included; STAR's CumSum (original positions) runs on float32 with an initializer axis."""
    from star_export.contract import contract_from_dict

    out = cli_export(name, *args)
    manifest = json.loads((out / "manifest.json").read_text())
    for graph in ("prefill", "decode"):
        dynamic = contract_from_dict(manifest["graphs"][graph]).dynamic_axes()
        for target in ("10.0", "10", "11"):
            report = check_onnx(out / f"{graph}.onnx", target=target, dynamic_inputs=dynamic)
            assert report.ok, report.format()
    model = onnx.shape_inference.infer_shapes(onnx.load(out / "prefill.onnx", load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    inits = {t.name for t in model.graph.initializer}
    cumsums = [n for n in model.graph.node if n.op_type == "CumSum"]
    assert cumsums
    for node in cumsums:
        assert node.input[1] in inits and types[node.input[0]] == TensorProto.FLOAT
