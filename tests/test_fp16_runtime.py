"""fp16 exports in use (issue #20, item 0): every family's fp16 export answers through ``generate --from``,
``eval --from`` and ``load_export(dir).generate`` on onnxruntime, because every runtime casts its inputs
to the dtypes the graph declares (``encoding.cast_inputs``: float32 pixels -> fp16). Without the cast
onnxruntime refuses the float32 pixels (shown on a broken copy of the runtime).

Greedy tokens against the PyTorch rewrite in fp16: the tiny random models' cuts are near-ties (stage
margins 1e-8..1e-3 of the score), so the rewrite is forced to onnxruntime's selection and fed its tokens;
every step's logits must lie within the fp16 tolerance (32 epsilons, 3.1e-2 relative; measured at most
5.4e-3) and every token must be the rewrite's argmax except at a near-tie (the rewrite's best logit less
than the tolerance above it). Measured on these inputs: 24/24 tokens the rewrite's argmax for five
families; Qwen2.5-VL 23/24 (step 2 of row 2: the rewrite's top two logits 4.7e-4 apart, the two sides'
logits 1.3e-3 apart). Without forcing, LLaVA-NeXT and Qwen2.5-VL also select differently at cuts 1e-6 wide.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from star_export import selection
from star_export.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "eval"
DATA = EXAMPLES / "questions.jsonl"
ROWS = [json.loads(line) for line in DATA.read_text().splitlines()[:2]]  # the 2-row set eval runs
IMAGES = [EXAMPLES / r["image"] for r in ROWS]
PROMPTS = [r["text"] for r in ROWS]
MAX_NEW = 6
STEPS = 12  # greedy steps against the rewrite
TOL = selection.logits_tolerance("float16", 0.0)
FAMILIES = {  # recipe: (shared export name, its arguments): one fp16 export per family
    "llava-tiny": ("llava-keep16-fp16", ("--keep", "16", "--dtype", "fp16")),  # also test_half, test_check
    **{
        r: (f"{r}-keep8-fp16", ("--recipe", r, "--keep", "8", "--dtype", "fp16"))
        for r in ("llava-next-tiny", "qwen2-vl-tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny", "gemma3-tiny")
    },
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def fp16_export(request, cli_export) -> Path:
    name, args = FAMILIES[request.param]
    return cli_export(name, *args)


@pytest.fixture(scope="module")
def alone(fp16_export) -> list[list[int]]:
    """``load_export(dir).generate`` tokens of each row asked alone (as ``generate`` and ``eval`` ask)."""
    from star_export import load_export

    pipe = load_export(fp16_export)
    assert json.loads((fp16_export / "manifest.json").read_text())["graphs"]["prefill"]["dtype"] == "float16"
    tokens = [
        pipe.generate([i], [p], max_new_tokens=MAX_NEW).result.tokens[0]
        for i, p in zip(IMAGES, PROMPTS, strict=True)
    ]
    assert all(1 <= len(t) <= MAX_NEW for t in tokens), tokens
    return tokens


def test_generate_cli_answers_an_fp16_export(fp16_export, alone, capsys):
    for image, prompt, expect in zip(IMAGES, PROMPTS, alone, strict=True):
        argv = ["generate", "--from", str(fp16_export), "--image", str(image), "--prompt", prompt]
        assert main([*argv, "--max-new-tokens", str(MAX_NEW), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["runtime"] == "onnxruntime" and out["tokens"] == [expect]


def test_eval_answers_an_fp16_export(fp16_export, alone, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--from", str(fp16_export), "--data", str(DATA), "--limit", "2", "--out", str(out)]
    assert main([*argv, "--max-new-tokens", str(MAX_NEW)]) == 0, capsys.readouterr()
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()[1:]]
    keep = json.loads((fp16_export / "manifest.json").read_text())["star"]["keep2"]
    assert [r["levels"][str(keep)]["tokens"] for r in rows] == alone
    assert json.loads((out / "eval.json").read_text())["examples"] == 2


def test_api_greedy_tokens_follow_the_fp16_rewrite(fp16_export):
    """A batch of both rows (left padding) through ``load_export(dir).generate`` against the PyTorch
    rewrite in fp16, forced to onnxruntime's selection and fed its tokens (see the module docstring)."""
    from star_export import load_export
    from star_export.contract import contract_from_dict
    from star_export.load import load
    from star_export.runtime import GenerationConfig, TorchBackend, generate
    from star_export.session import _layout_options

    pipe = load_export(fp16_export)
    got = pipe.generate(IMAGES, PROMPTS, max_new_tokens=STEPS, stop=(), keep_logits=True).result
    manifest = json.loads((fp16_export / "manifest.json").read_text())
    geo, cfg, graphs = pipe.geo, pipe.cfg, manifest["graphs"]
    model = load(manifest["model"]["directory"], dtype=torch.float16, options=_layout_options(geo, manifest))
    ref = TorchBackend(
        model.model, geo, cfg, contract_from_dict(graphs["prefill"]), contract_from_dict(graphs["decode"])
    )
    ref.forced = (got.stage1_keep_idx, got.stage2_keep_idx)
    feeds = pipe.pre.encode(IMAGES, PROMPTS)
    steps = len(got.step_logits)
    gen = GenerationConfig(max_new_tokens=steps, pad_token_id=pipe.pre.pad_token_id)
    teacher = np.array([t + [pipe.pre.pad_token_id] * (steps - len(t)) for t in got.tokens])
    want = generate(ref, feeds, geo, cfg, gen, keep_logits=True, teacher=teacher)
    r = np.stack(want.step_logits).astype(np.float64)  # (steps, B, V)
    g = np.stack(got.step_logits).astype(np.float64)
    live = np.array([[s < len(t) for t in got.tokens] for s in range(steps)])  # (steps, B) before a stop
    scale = np.abs(r).max(axis=-1)
    rel = np.abs(g - r).max(axis=-1) / scale
    assert rel[live].max() <= TOL, rel.max()
    chosen = np.take_along_axis(r, teacher.T[:, :, None], axis=-1)[..., 0]
    shortfall = (r.max(axis=-1) - chosen) / scale  # 0 where onnxruntime chose the rewrite's argmax
    assert shortfall[live].max() <= TOL, shortfall.max()
    exact = float((shortfall[live] == 0).mean())
    assert exact >= 0.9, f"{exact:.2f} of the tokens are the rewrite's argmax"


def test_without_the_cast_onnxruntime_refuses_the_float32_pixels(cli_export, monkeypatch):
    """The broken runtime (inputs passed as given): the fp16 export fails as it did before the fix."""
    from star_export import load_export, runtime

    name, args = FAMILIES["llava-tiny"]
    pipe = load_export(cli_export(name, *args))
    monkeypatch.setattr(runtime, "cast_inputs", lambda feeds, declared, bfloat16=None: dict(feeds))
    with pytest.raises(Exception, match=r"expected: \(tensor\(float16\)\)"):
        pipe.generate(IMAGES[:1], PROMPTS[:1], max_new_tokens=2)


def test_cast_inputs_follows_the_declared_dtypes():
    from star_export.encoding import cast_inputs, declared_dtypes

    declared = declared_dtypes(
        [{"name": "pixel_values", "dtype": "float16"}, {"name": "input_ids", "dtype": "int64"}]
    )
    fed = cast_inputs(
        {
            "pixel_values": np.ones((1, 3), np.float32),
            "input_ids": np.ones((1, 2), np.int32),
            "extra": np.ones(1, np.float32),
        },
        declared,
    )
    assert {k: v.dtype for k, v in fed.items()} == {
        "pixel_values": np.float16,
        "input_ids": np.int64,
        "extra": np.float32,  # not declared: as given
    }
    wrong_kind = cast_inputs({"input_ids": np.ones(2, np.float32)}, declared)  # a float for an int: as given
    assert wrong_kind["input_ids"].dtype == np.float32
    with pytest.raises(TypeError, match="input pixel_values: the graph declares bfloat16"):
        cast_inputs({"pixel_values": np.ones(2, np.float32)}, {"pixel_values": "bfloat16"})
    from star_export.runtime import as_bfloat16

    bf16 = cast_inputs({"pixel_values": np.ones(2, np.float32)}, {"pixel_values": "bfloat16"}, as_bfloat16)
    assert bf16["pixel_values"].dtype == torch.bfloat16
    again = cast_inputs(bf16, {"pixel_values": "bfloat16"}, as_bfloat16)  # twice: still one tensor
    assert again["pixel_values"].dtype == torch.bfloat16


class _Arg:  # an onnxruntime NodeArg
    def __init__(self, name: str, type_: str):
        self.name, self.type = name, type_


def test_declared_dtypes_reads_onnxruntime_types():
    from star_export.encoding import declared_dtypes

    args = [_Arg("pixel_values", "tensor(float16)"), _Arg("input_ids", "tensor(int64)")]
    assert declared_dtypes(args) == {"pixel_values": "float16", "input_ids": "int64"}


def test_a_bf16_export_on_onnxruntime_is_refused_in_one_line(cli_export, tmp_path, capsys):
    """onnxruntime's CPU provider has no bfloat16 kernels: ``generate --from`` a bf16 export (here a
    copy of the fp16 one declared bfloat16 in its manifest and graphs) exits 2 with one line naming the way out."""
    from conftest import as_bf16_copy

    name, args = FAMILIES["llava-tiny"]
    source = as_bf16_copy(cli_export(name, *args), tmp_path / "bf16")
    argv = ["generate", "--from", str(source), "--image", str(IMAGES[0]), "--prompt", PROMPTS[0]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a bf16 export cannot run in onnxruntime's CPU provider" in err[0], err
    assert "--runtime torch" in err[0]
