"""Export to ONNX and prove it: onnxruntime vs PyTorch vs reference, graph scans, dynamic dims."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from star_export.check import check_onnx, topk_nodes
from star_export.contract import prefill_contract
from star_export.onnx_export import export_onnx
from star_export.star import StarConfig
from star_export.validate import make_inputs, validate


def export(loaded, tmp_path, keep, keep1, layer, **kw):
    g = loaded.geometry
    cfg = StarConfig.resolve(
        keep=keep, keep1=keep1, layer=layer, n_visual=g.n_visual, num_layers=g.num_layers
    )
    contract = prefill_contract(g, cfg, (1, 2, 8), (2, 24, 512))
    path = export_onnx(
        loaded.family.prefill_module(loaded.model, g, cfg).eval(),
        contract,
        tmp_path / "prefill.onnx",
        g.image_token_id,
        **kw,
    )
    return cfg, contract, path


# (model fixture, keep, keep1, layer) -> export options; each graph is exported once for this module's
# tests (an export is some 15 s): the MHA one with its weights as external data
SETTINGS = {("mha", 64, None, 2): {"external_data": True}, ("gqa", 10, 300, 1): {}}


@pytest.fixture(scope="module")
def exported(mha, gqa, tmp_path_factory):
    """settings -> (loaded model, cfg, contract, path), exported on first use."""
    models, cache = {"mha": mha, "gqa": gqa}, {}

    def get(settings):
        if settings not in cache:
            loaded = models[settings[0]]
            out = tmp_path_factory.mktemp("-".join(map(str, settings)))
            cache[settings] = (loaded, *export(loaded, out, *settings[1:], **SETTINGS[settings]))
        return cache[settings]

    return get


@pytest.mark.parametrize("settings", list(SETTINGS), ids=lambda s: "-".join(map(str, s)))
def test_exported_prefill_passes_every_parity_check(exported, settings):
    loaded, cfg, contract, path = exported(settings)
    keep = settings[1]
    report = validate(loaded.model, loaded.geometry, cfg, contract, str(path), seed=keep)
    assert report.passed, report.format()
    ort_rows = [r for r in report.rows if r.check.startswith("onnxruntime vs torch")]
    assert len(ort_rows) == 8
    logits = next(r for r in ort_rows if r.output == "logits")
    assert logits.max_rel <= 1e-4

    # the graph: TopK with literal K only, no data-dependent ops, symbolic batch/text dims
    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"NonZero", "NonMaxSuppression", "Unique", "Compress", "Loop", "Scan", "If"}
    ks = sorted(k for _, k in topk_nodes(model))
    assert ks == sorted([cfg.keep1, cfg.keep2, cfg.keep1 + 1, cfg.keep2 + 1])  # + the cut margins
    scan = check_onnx(path, dynamic_inputs=contract.dynamic_axes())
    assert scan.ok, scan.format()
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert dims == {
        "pixel_values": ["batch", 3, 336, 336],
        "input_ids": ["batch", "text_len"],
        "attention_mask": ["batch", "text_len"],
    }
    outs = [o.name for o in model.graph.output]
    assert outs == contract.output_names


def test_one_graph_serves_other_batch_sizes_and_lengths(exported):
    gqa, cfg, _, path = exported(("gqa", 10, 300, 1))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rewrite = gqa.family.prefill_module(gqa.model, gqa.geometry, cfg).eval()
    for batch, text_len in [(1, 7), (3, 41)]:
        feeds = make_inputs(gqa.geometry, batch=batch, text_len=text_len, seed=batch)
        got = sess.run(None, dict(feeds))
        with torch.no_grad():
            ref = rewrite(*(torch.from_numpy(v) for v in feeds.values()))
        assert np.array_equal(got[1], ref[1].numpy()) and np.array_equal(got[2], ref[2].numpy())
        assert np.abs(got[0] - ref[0].numpy()).max() <= 1e-4 * np.abs(ref[0].numpy()).max()
        for i in range(gqa.geometry.num_layers):
            expect = text_len - 1 + (cfg.keep1 if i < cfg.layer else cfg.keep2)
            assert got[5 + 2 * i].shape == (batch, gqa.geometry.num_kv_heads, expect, gqa.geometry.head_dim)


def test_external_data_is_written_and_loads(exported):
    mha, cfg, _, path = exported(("mha", 64, None, 2))
    data = path.parent / "prefill.onnx.data"
    assert (
        data.is_file()
        and data.stat().st_size
        > 0.9 * sum(p.numel() * 4 for p in mha.model.parameters() if p.dim() > 1) * 0.5
    )
    assert path.stat().st_size < data.stat().st_size
    feeds = make_inputs(mha.geometry, batch=2, text_len=9)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["stage2_keep_idx"], dict(feeds)
    )
    assert out[0].shape == (2, cfg.keep2) and cfg.keep2 == 64
