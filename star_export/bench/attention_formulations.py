"""Decoder-attention formulations for the export, measured: onnxruntime CPU latency and graph ops.

One Llama attention block (q/k/v/o projections, RoPE, causal + padding mask) with the
recipe's decoder sizes, exported with torch.onnx (dynamo) at static shapes and timed in
onnxruntime (interleaved, median of ``--repeats``), at the unpruned length (T - 1 + N) and at
the keep-64 stage-2 length (T - 1 + 64):

* ``explicit``: what ``rewrite.decoder_attention`` exports: ``q @ repeat_kv(k)^T * scale + mask``,
  float32 softmax, ``@ repeat_kv(v)``: MatMul / Softmax / Expand, exposes the probabilities
  (stage 2 needs them at layer K-1), parsed by every TensorRT 10.x (which fuses the
  MatMul-Softmax-MatMul pattern itself).
* ``grouped``: the same without materialising the GQA copies: q viewed as
  (B, Hkv, G * L, hd) against the Hkv key/value heads.
* ``sdpa-opset18``: ``F.scaled_dot_product_attention`` exported at opset 18 (decomposed into the
  same primitive ops by the exporter; no probabilities).
* ``sdpa-opset23``: the same at opset 23: one ONNX ``Attention`` op per layer (no probabilities).

Usage: ``python -m star_export.bench.attention_formulations [--recipe llava-bench] [--repeats 20] [--out DIR]``
(the measurement behind ``rewrite.decoder_attention``'s choice; not part of ``python -m star_export bench``).
Writes ``attention_formulations.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _config(recipe: str):
    from transformers import LlamaConfig

    from star_export.recipes import load_recipe

    tc = dict(load_recipe(recipe).config["text_config"])
    tc.pop("model_type", None)
    return LlamaConfig(**tc)


class Block(nn.Module):
    """One attention block with a given formulation; x (B, L, D) -> (B, L, D)."""

    def __init__(self, attn: nn.Module, rotary: nn.Module, head_dim: int, formulation: str):
        super().__init__()
        self.attn, self.rotary, self.hd, self.formulation = attn, rotary, head_dim, formulation

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        from star_export.rewrite import decoder_attention

        cos, sin = self.rotary(x, pos)
        if self.formulation == "explicit":
            return decoder_attention(self.attn, x, cos, sin, mask, self.hd)[0]
        b, length, _ = x.shape
        a = self.attn
        q = a.q_proj(x).view(b, length, -1, self.hd).transpose(1, 2)  # (B, H, L, hd)
        k = a.k_proj(x).view(b, length, -1, self.hd).transpose(1, 2)  # (B, Hkv, L, hd)
        v = a.v_proj(x).view(b, length, -1, self.hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        hkv = k.shape[1]
        groups = q.shape[1] // hkv
        if self.formulation == "grouped":
            qg = q.reshape(b, hkv, groups * length, self.hd)  # (B, Hkv, G*L, hd): heads h = g + G * kv
            scores = (qg @ k.transpose(2, 3)) * a.scaling  # (B, Hkv, G*L, L)
            scores = scores.view(b, hkv, groups, length, length) + mask.unsqueeze(1)
            probs = torch.softmax(scores, dim=-1).view(b, hkv, groups * length, length)
            out = (probs @ v).view(b, hkv * groups, length, self.hd)
        else:
            out = F.scaled_dot_product_attention(
                q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask, scale=a.scaling
            )
        return a.o_proj(out.transpose(1, 2).reshape(b, length, -1))


def _export(module: nn.Module, args: tuple, path: Path, opset: int) -> None:
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, optimize=True)
        program.save(str(path), external_data=False)


def main(argv: list[str] | None = None) -> int:
    import onnx
    import onnxruntime as ort
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    from star_export import star

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="llava-bench")
    parser.add_argument("--text-len", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    config = _config(args.recipe)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = LlamaAttention(config, layer_idx=0).eval()
    rotary = LlamaRotaryEmbedding(config)
    hd = config.hidden_size // config.num_attention_heads
    formulations = [("explicit", 18), ("grouped", 18), ("sdpa-opset18", 18), ("sdpa-opset23", 23)]
    results = []
    for length in (args.text_len - 1 + 576, args.text_len - 1 + 64):
        x = torch.randn(1, length, config.hidden_size)
        pos = torch.arange(length)[None]
        valid = torch.ones(1, length, dtype=torch.bool)
        mask = star.additive_mask(valid, torch.float32)  # (1, 1, L, L)
        feeds = {}
        sessions = {}
        ref = None
        for name, opset in formulations:
            block = Block(attn, rotary, hd, "sdpa" if name.startswith("sdpa") else name).eval()
            with torch.no_grad():
                y = block(x, pos, mask)
            ref = y if ref is None else ref
            path = args.out / f"attention_{name}_{length}.onnx"
            _export(block, (x, pos, mask), path, opset)
            graph = onnx.load(str(path)).graph
            ops = sorted({n.op_type for n in graph.node})
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            names = [i.name for i in sess.get_inputs()]
            feeds[name] = dict(zip(names, (x.numpy(), pos.numpy(), mask.numpy()), strict=False))
            got = sess.run(None, feeds[name])[0]
            sessions[name] = (sess, ops, float(np.abs(got - ref.numpy()).max() / np.abs(ref.numpy()).max()))
            print(f"L={length} {name}: exported, ops {ops}", flush=True)
        times = {name: [] for name in sessions}
        for name, (sess, _, _) in sessions.items():
            sess.run(None, feeds[name])
        for r in range(args.repeats):
            order = list(sessions)
            order = order[r % len(order) :] + order[: r % len(order)]
            for name in order:
                t0 = time.perf_counter()
                sessions[name][0].run(None, feeds[name])
                times[name].append(time.perf_counter() - t0)
        for name, (_, ops, rel) in sessions.items():
            med = float(np.median(times[name]))
            base = float(np.median(times["explicit"]))
            results.append(
                {
                    "length": length,
                    "formulation": name,
                    "median_ms": med * 1000,
                    "p10_ms": float(np.percentile(times[name], 10)) * 1000,
                    "p90_ms": float(np.percentile(times[name], 90)) * 1000,
                    "speedup_vs_explicit": base / med,
                    "max_rel_diff_vs_explicit": rel,
                    "ops": ops,
                }
            )
            print(
                f"L={length:4d} {name:<14} {med * 1000:7.2f} ms  ({base / med:.2f}x vs explicit, rel diff {rel:.1e})"
            )
    (args.out / "attention_formulations.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
