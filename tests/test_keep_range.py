"""A keep range (issue #24): ``--keep MIN:MAX`` exports ONE prefill graph whose TopK K is the length of
its input ``keep_slots``; at every keep it equals the constant-K export of that keep (indices exact,
logits within fp32 rounding, greedy answers token for token), and ``check`` accepts K only when it is
derived from the keep input's shape."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from star_export.check import check_onnx
from star_export.cli import main
from star_export.comparison import make_inputs
from star_export.errors import UsageError
from star_export.geometry import Geometry

KEEPS = (8, 16, 32)  # the shared constant-K export "llava-levels" holds these three levels
RANGE = "8:16:32"


@pytest.fixture(scope="module")
def levels_export(cli_export):
    return cli_export("llava-levels", "--keep", ",".join(map(str, KEEPS)))  # shared with test_levels


@pytest.fixture(scope="module")
def range_export(cli_export):
    return cli_export("llava-range", "--keep", RANGE)


def _session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _run(session, feeds):
    names = {i.name for i in session.get_inputs()}
    outs = [o.name for o in session.get_outputs()]
    return dict(zip(outs, session.run(outs, {k: v for k, v in feeds.items() if k in names}), strict=True))


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_one_prefill_graph_with_a_keep_dimension(range_export):
    out = range_export
    assert sorted(p.name for p in out.glob("*.onnx")) == ["decode.onnx", "prefill.onnx"]
    manifest = json.loads((out / "manifest.json").read_text())
    (level,) = manifest["star"]["levels"]
    assert level["keep_range"] == {"min": 8, "opt": 16, "max": 32}
    assert (level["keep2"], level["keep1"], manifest["star"]["default_keep"]) == (16, 32, 16)
    assert level["span1_range"] == [16, 64] and level["span2_range"] == [8, 32]
    graph = manifest["graphs"]["prefill"]
    shapes = {t["name"]: t["shape"] for t in (*graph["inputs"], *graph["outputs"])}
    assert shapes["keep_slots"] == ["batch", "keep"]
    assert shapes["stage1_keep_idx"] == ["batch", "Min(576, 2*keep)"]
    assert shapes["stage2_keep_idx"] == ["batch", "keep"]
    assert shapes["present.0.key"][2] == "text_len + Min(576, 2*keep) - 1"  # layers < K: L1
    assert shapes["present.3.key"][2] == "keep + text_len - 1"  # layers >= K: L2
    dims = {d["name"]: d for d in graph["dynamic_dims"]}
    assert (dims["keep"]["min"], dims["keep"]["opt"], dims["keep"]["max"]) == (8, 16, 32)
    decode = {d["name"]: d for d in manifest["graphs"]["decode"]["dynamic_dims"]}
    assert decode["past_len_l1"]["min"] == 2 - 1 + 16 and decode["past_len_l2"]["min"] == 2 - 1 + 8
    # the scan: TopK's K follows keep_slots' shape, every other input dim as declared
    dyn = {t["name"]: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)} for t in graph["inputs"]}
    report = check_onnx(out / "prefill.onnx", dynamic_inputs=dyn)
    assert report.ok, report.format()
    assert report.op_counts["TopK"] >= 4 and "NonZero" not in report.op_counts
    # the C++ header states the range
    from star_export.deploy.cpp_header import cpp_header

    header = cpp_header(manifest)
    assert "constexpr int64_t kKeepMin = 8;" in header and "constexpr int64_t kKeepMax = 32;" in header


@pytest.mark.parametrize("keep", KEEPS)
def test_range_graph_equals_the_constant_k_export(range_export, levels_export, keep):
    """onnxruntime, same inputs (a left-padded batch): the range graph at keep_slots [B, keep] vs the
    constant-K graph prefill_k{keep}.onnx: indices exact, logits and caches within fp32 rounding."""
    geo = Geometry.from_dict(json.loads((range_export / "manifest.json").read_text())["model"]["geometry"])
    feeds = make_inputs(geo, batch=2, text_len=12, seed=keep, keep=keep)
    got = _run(_session(range_export / "prefill.onnx"), feeds)
    want = _run(_session(levels_export / f"prefill_k{keep}.onnx"), feeds)
    assert got["stage1_keep_idx"].shape == (2, 2 * keep) and got["stage2_keep_idx"].shape == (2, keep)
    for name in ("stage1_keep_idx", "stage2_keep_idx"):
        np.testing.assert_array_equal(got[name], want[name])
    assert set(got) == set(want)
    for name in want:
        if name.startswith(("logits", "present")):
            assert got[name].shape == want[name].shape, name
            assert _rel(got[name], want[name]) < 1e-5, (name, _rel(got[name], want[name]))


def test_greedy_answers_token_exact_per_request(range_export, levels_export, tmp_path):
    """load_export(...).generate(keep=k): the range export answers each keep in the range with the
    tokens of the constant-K export of that keep, from ONE prefill session; a keep outside is one line."""
    from PIL import Image

    from star_export.session import load_export

    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(image)
    prompts = ["What is in the image?", "Describe it"]
    ranged, fixed = load_export(range_export), load_export(levels_export)
    for keep in KEEPS:
        a = ranged.generate([image], prompts, max_new_tokens=6, keep=keep)
        b = fixed.generate([image], prompts, max_new_tokens=6, keep=keep)
        assert a.result.tokens == b.result.tokens, keep
        np.testing.assert_array_equal(a.result.stage2_keep_idx, b.result.stage2_keep_idx)
        assert (a.cfg.keep1, a.cfg.keep2) == (2 * keep, keep)
    mid = ranged.generate([image], prompts[:1], max_new_tokens=2, keep=20)  # no constant level has 20
    assert mid.result.stage2_keep_idx.shape == (1, 20) and mid.result.stage1_keep_idx.shape == (1, 40)
    assert ranged.backend(8) is ranged.backend(32)  # one graph (one session) for every keep
    assert ranged.keeps == [16, 8, 32]
    with pytest.raises(UsageError, match=r"holds keep levels 8:32"):
        ranged.generate([image], prompts[:1], keep=33)


def test_generate_command_takes_any_keep_in_the_range(range_export, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "img.png"
    Image.fromarray(np.full((30, 30, 3), 128, dtype=np.uint8)).save(image)
    argv = ["generate", "--from", str(range_export), "--keep", "24", "--max-new-tokens", "2"]
    assert main([*argv, "--image", str(image), "--prompt", "What is it?"]) == 0
    assert "-> 48 (stage 1) -> 24 (stage 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ("32:8", "1 <= min < max"),
        ("8:40:32", "outside the range"),
        ("8:600", "--keep must be in 1..576"),
        ("8:x", "MIN:MAX or MIN:OPT:MAX"),
    ],
)
def test_bad_ranges_are_one_line(keep, message, tmp_path, capsys):
    assert _exit_code(["llava", "--recipe", "llava-tiny", "--keep", keep, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own refusals
        return int(e.code)


def test_keep1_with_a_range_is_refused(tmp_path, capsys):
    assert (
        main(
            [
                "llava",
                "--recipe",
                "llava-tiny",
                "--keep",
                "8:32",
                "--keep1",
                "40",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "keep1 follows min(N, 2 * keep)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ check


def _topk_graph(k_from: str) -> onnx.ModelProto:
    """scores [B, 64] -> TopK whose K is computed ``k_from``: "keep-shape" (Shape(keep_slots)[1:2]
    doubled), "other-shape" (Shape(scores)[1:2], what torch.sort exports), "data" (ReduceMax of
    keep_slots' VALUES)."""
    nodes, inits = [], [helper.make_tensor("two", TensorProto.INT64, [1], [2])]
    if k_from == "data":
        nodes += [
            helper.make_node("ReduceMax", ["keep_slots"], ["kmax"], keepdims=0),
            helper.make_node("Reshape", ["kmax", "one"], ["k"]),
        ]
        inits.append(helper.make_tensor("one", TensorProto.INT64, [1], [1]))
    else:
        source = "keep_slots" if k_from == "keep-shape" else "scores"
        nodes += [
            helper.make_node("Shape", [source], ["len"], start=1, end=2),
            helper.make_node("Mul", ["len", "two"], ["k2"]),
            helper.make_node("Min", ["k2", "len"], ["k"]),
        ]
    nodes.append(helper.make_node("TopK", ["scores", "k"], ["values", "indices"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 64]),
            helper.make_tensor_value_info("keep_slots", TensorProto.INT64, ["batch", "keep"]),
        ],
        [
            helper.make_tensor_value_info("values", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("indices", TensorProto.INT64, None),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_check_takes_k_from_the_keep_input_shape_only():
    assert check_onnx(_topk_graph("keep-shape")).ok
    for k_from, says in (("other-shape", "shape of scores"), ("data", "tensor values (data-dependent)")):
        report = check_onnx(_topk_graph(k_from))
        assert not report.ok and [f.rule for f in report.errors] == ["topk-dynamic-k"], k_from
        assert says in report.errors[0].message
    # without a declared keep input even the keep-shape K is rejected (the constant-K policy)
    assert not check_onnx(_topk_graph("keep-shape"), shape_k_inputs=()).ok


def test_check_fails_the_range_graph_edited_to_a_data_dependent_k(range_export, tmp_path):
    """The exported range graph with one TopK's K replaced by a value read from keep_slots' DATA."""
    model = onnx.load(str(range_export / "prefill.onnx"), load_external_data=False)
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    model.graph.initializer.append(helper.make_tensor("edit_one", TensorProto.INT64, [1], [1]))
    model.graph.node.insert(
        list(model.graph.node).index(topk),
        helper.make_node("ReduceMax", ["keep_slots"], ["edit_kmax"], keepdims=0),
    )
    model.graph.node.insert(
        list(model.graph.node).index(topk), helper.make_node("Reshape", ["edit_kmax", "edit_one"], ["edit_k"])
    )
    topk.input[1] = "edit_k"
    edited = tmp_path / "prefill.onnx"
    onnx.save(model, str(edited))
    (tmp_path / "weights.onnx.data").symlink_to(range_export / "weights.onnx.data")
    report = check_onnx(edited)
    assert [f.rule for f in report.errors] == ["topk-dynamic-k"]
    assert "data-dependent" in report.errors[0].message
    assert main(["check", str(edited)]) == 1
    assert main(["check", str(range_export / "prefill.onnx")]) == 0


# ------------------------------------------------------------------------------------------ families

# recipe -> (its range, the shared constant-K export of keep 8 it is compared with)
FAMILIES = {
    "qwen2-vl-tiny": ("4:8:12", ("qwen2-vl-tiny-keep8", "--recipe", "qwen2-vl-tiny", "--keep", "8")),
    "gemma3-tiny": ("8:16", ("gemma3-tiny-keep8", "--recipe", "gemma3-tiny", "--keep", "8")),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_exports(request, cli_export):
    recipe = request.param
    rng, shared = FAMILIES[recipe]
    return cli_export(f"{recipe}-range", "--recipe", recipe, "--keep", rng), cli_export(*shared)


def test_family_range_equals_constant_k(family_exports):
    """Qwen2-VL (N = 16: keep1 = min(N, 2 * keep) caps at 12) and Gemma 3: at keep 8 the range graph
    equals the constant-K export in onnxruntime; at both ends of the range it equals the constant-K
    PyTorch rewrite of that keep; greedy answers token for token."""
    from star_export.families import family_of
    from star_export.load import load
    from star_export.manifest import levels
    from star_export.session import load_export

    ranged, fixed = family_exports
    manifest = json.loads((ranged / "manifest.json").read_text())
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    (level,) = levels(manifest, geo, "test")
    cfg = level.cfg
    session = _session(ranged / "prefill.onnx")
    feeds = make_inputs(geo, batch=2, text_len=12, seed=3, keep=8)
    got, want = _run(session, feeds), _run(_session(fixed / "prefill.onnx"), feeds)
    for name in ("stage1_keep_idx", "stage2_keep_idx"):
        np.testing.assert_array_equal(got[name], want[name])
    assert _rel(got["logits"], want["logits"]) < 1e-5
    model = load(manifest["model"]["directory"], options=manifest.get("layout") or {}).model
    import torch

    for keep in cfg.keep_range:
        at = cfg.at(keep)
        assert at.keep1 == min(geo.n_visual, 2 * keep)
        feeds = make_inputs(geo, batch=2, text_len=12, seed=keep, keep=keep)
        got = _run(session, feeds)
        module = family_of(geo).prefill_module(model, geo, at).eval()
        with torch.no_grad():
            ref = module(
                *(torch.from_numpy(feeds[k]) for k in ("pixel_values", "input_ids", "attention_mask"))
            )
        np.testing.assert_array_equal(got["stage1_keep_idx"], ref[1].numpy())
        np.testing.assert_array_equal(got["stage2_keep_idx"], ref[2].numpy())
        assert _rel(got["logits"], ref[0].numpy()) < 1e-4  # the export's onnxruntime-vs-torch tolerance
    images = [np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8)]
    from PIL import Image

    images = [Image.fromarray(images[0])]
    a = load_export(ranged).generate(images, ["What is it?"], max_new_tokens=5, keep=8)
    b = load_export(fixed).generate(images, ["What is it?"], max_new_tokens=5, keep=8)
    assert a.result.tokens == b.result.tokens
