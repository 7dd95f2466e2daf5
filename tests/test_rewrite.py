"""The static rewrite against the dynamic reference and the unmodified model (PyTorch only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from star_export.contract import prefill_contract
from star_export.star import StarConfig
from star_export.validate import make_inputs, validate

SETTINGS = [(64, None, 2), (10, 300, 1), (32, 32, 3), (576, 576, 2)]


def resolve(loaded, keep, keep1, layer):
    g = loaded.geometry
    return StarConfig.resolve(
        keep=keep, keep1=keep1, layer=layer, n_visual=g.n_visual, num_layers=g.num_layers
    )


def contract_for(loaded, cfg):
    return prefill_contract(loaded.geometry, cfg, (1, 2, 8), (2, 24, 512))


@pytest.mark.parametrize("which", ["mha", "gqa"])
@pytest.mark.parametrize(("keep", "keep1", "layer"), SETTINGS)
def test_rewrite_matches_reference_and_unmodified_model(request, which, keep, keep1, layer):
    loaded = request.getfixturevalue(which)
    cfg = resolve(loaded, keep, keep1, layer)
    report = validate(
        loaded.model, loaded.geometry, cfg, contract_for(loaded, cfg), onnx_path=None, seed=layer
    )
    failed = [r for r in report.rows if not r.passed]
    assert not failed, report.format()
    checks = {r.check for r in report.rows}
    assert {
        "torch rewrite vs reference",
        "torch rewrite (keep=N) vs HF",
        "padded row vs alone (torch)",
    } <= checks


@pytest.mark.parametrize("which", ["mistral", "qwen2"])
def test_other_llama_family_decoders_match_reference_and_unmodified_model(request, which):
    loaded = request.getfixturevalue(which)
    cfg = resolve(loaded, 16, 48, 2)
    report = validate(loaded.model, loaded.geometry, cfg, contract_for(loaded, cfg), onnx_path=None, seed=4)
    assert report.passed, report.format()


def test_sliding_window_attention_is_refused(recipe):
    from star_export.errors import UsageError
    from star_export.families.llava import FAMILY as LLAVA

    config = __import__("transformers").LlavaConfig(
        **{
            **recipe.config,
            "text_config": {**recipe.config["text_config"], "model_type": "mistral", "sliding_window": 64},
        }
    )
    with pytest.raises(UsageError, match="sliding-window attention"):
        LLAVA.geometry(config)


@pytest.mark.parametrize("which", ["mha", "gqa"])
def test_present_lengths_are_l1_before_k_and_l2_from_k(request, which):
    loaded = request.getfixturevalue(which)
    g = loaded.geometry
    cfg = resolve(loaded, 20, 100, 2)
    feeds = make_inputs(g, batch=3, text_len=17, seed=1)
    with torch.no_grad():
        out = loaded.family.prefill_module(loaded.model, g, cfg)(
            *(torch.from_numpy(v) for v in feeds.values())
        )
    assert out[0].shape == (3, g.vocab_size) and out[0].dtype == torch.float32
    assert out[1].shape == (3, 100) and out[2].shape == (3, 20)
    for i in range(g.num_layers):
        length = 17 - 1 + (100 if i < cfg.layer else 20)
        assert out[5 + 2 * i].shape == (3, g.num_kv_heads, length, g.head_dim)
        assert out[6 + 2 * i].shape == (3, g.num_kv_heads, length, g.head_dim)
    # kept indices ascending, stage 2 a subset of stage 1
    s1, s2 = out[1].numpy(), out[2].numpy()
    assert (np.diff(s1, axis=1) > 0).all() and (np.diff(s2, axis=1) > 0).all()
    assert all(set(s2[b]) <= set(s1[b]) for b in range(3))


def test_pruning_changes_the_logits(mha):
    """Guard against a rewrite that silently ignores pruning: keep=8 differs from keep=N."""
    g = mha.geometry
    feeds = make_inputs(g, batch=2, text_len=12, seed=3)
    args = [torch.from_numpy(v) for v in feeds.values()]
    with torch.no_grad():
        pruned = mha.family.prefill_module(mha.model, g, resolve(mha, 8, 16, 2))(*args)[0]
        full = mha.family.prefill_module(mha.model, g, resolve(mha, 576, 576, 2))(*args)[0]
    assert (pruned - full).abs().max() > 1e-3 * full.abs().max()
