"""Parity on the device: the rewrite in fp16/bf16 vs the same weights in fp32, on the first
``--parity-layers`` decoder layers of the benchmarked model (shared, not copied) and an fp32 copy of them,
by ``selection``/``validate``'s rules (``comparison.check_side``, ``precision_noise``)."""

from __future__ import annotations

import copy
import dataclasses
import gc
from typing import Any

import torch

from star_export.families.llava import FAMILY
from star_export.geometry import Geometry
from star_export.parity import ParityReport
from star_export.star import StarConfig


def truncated(model: Any, layers: int) -> Any:
    """The same model with its first ``layers`` decoder layers: every tensor shared, none copied."""
    from transformers import LlavaForConditionalGeneration

    config = copy.deepcopy(model.config)
    config.text_config.num_hidden_layers = layers
    with torch.device("meta"):
        small = LlavaForConditionalGeneration(config)
    state = model.state_dict()
    small.load_state_dict({k: state[k] for k in small.state_dict()}, assign=True, strict=True)
    buffers = dict(model.named_buffers())
    for name, buf in list(small.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (rotary inv_freq, CLIP position ids) are not in the state
            parent, _, leaf = name.rpartition(".")
            small.get_submodule(parent)._buffers[leaf] = buffers[name]
    return small.eval().requires_grad_(False)


def run_parity(
    model: Any, geo: Geometry, cfgs: dict[str, StarConfig], layers: int, dtype: str, seed: int, log: Any
) -> ParityReport:
    """The rewrite in ``dtype`` on the device vs the same weights in fp32 there, every config: the
    selection-with-margin rule, then logits and caches (forced selections where they differ)."""
    from star_export import precision_noise, selection
    from star_export.comparison import Rewrite, check_side, make_inputs

    device = next(model.parameters()).device
    small = truncated(model, layers)
    small32 = copy.deepcopy(small).float()
    pgeo = dataclasses.replace(geo, num_layers=layers)
    feeds = make_inputs(pgeo, batch=2, text_len=24, seed=seed)
    report = ParityReport()
    report.inputs = {"layers": layers, "batch": 2, "text_len": 24, "seed": seed, "score_noise": {}}
    tolerance = selection.logits_tolerance(dtype, 0.0)
    short = {"float16": "fp16", "bfloat16": "bf16"}[dtype]
    for tag, cfg in cfgs.items():
        low = Rewrite(FAMILY.prefill_module(small, pgeo, cfg).eval(), dtype, device)
        full = Rewrite(FAMILY.prefill_module(small32, pgeo, cfg).eval(), "float32", device)
        noise = precision_noise.measure(low, full, feeds, (cfg.keep1, cfg.keep2))
        rlow = noise.pop("runs")["low"]
        report.inputs["score_noise"][tag] = noise
        check = f"torch {short} vs fp32, {device.type}, {tag}"
        check_side(report, check, rlow, full, feeds, tuple(noise["margins"]), tolerance)
        precision_noise.add_rows(report, noise, check)
        log(f"      parity {tag}: {'ok' if all(r.passed for r in report.rows) else 'FAIL'}")
    del small32
    gc.collect()
    return report
