"""Generation: prefill + decode with per-layer pasts; token-exact across runtimes and vs HF."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from star_export.cli import main
from star_export.contract import decode_contract, prefill_contract
from star_export.onnx_export import example_decode_inputs, export_onnx
from star_export.rewrite import StarDecode
from star_export.runtime import GenerationConfig, OnnxruntimeBackend, TorchBackend, generate
from star_export.star import StarConfig
from star_export.validate import make_inputs

STEPS = 32


def contracts(loaded, cfg):
    g = loaded.geometry
    return prefill_contract(g, cfg, (1, 2, 8), (2, 24, 128)), decode_contract(
        g, cfg, (1, 2, 8), (2, 24, 128), 64
    )


def resolve(loaded, keep, keep1, layer):
    g = loaded.geometry
    return StarConfig.resolve(
        keep=keep, keep1=keep1, layer=layer, n_visual=g.n_visual, num_layers=g.num_layers
    )


@pytest.mark.parametrize(("which", "keep", "keep1", "layer"), [("mha", 24, 60, 2), ("gqa", 8, None, 1)])
def test_onnxruntime_greedy_is_token_exact_with_the_torch_rewrite(
    request, tmp_path, which, keep, keep1, layer
):
    loaded = request.getfixturevalue(which)
    g = loaded.geometry
    cfg = resolve(loaded, keep, keep1, layer)
    pc, dc = contracts(loaded, cfg)
    export_onnx(
        loaded.family.prefill_module(loaded.model, g, cfg).eval(),
        pc,
        tmp_path / "prefill.onnx",
        g.image_token_id,
    )
    export_onnx(
        StarDecode(loaded.model, g, cfg).eval(),
        dc,
        tmp_path / "decode.onnx",
        example_args=example_decode_inputs(dc),
    )
    feeds = dict(make_inputs(g, batch=2, text_len=21, pad=6, seed=11))
    gen = GenerationConfig(max_new_tokens=STEPS)
    got = generate(
        OnnxruntimeBackend(tmp_path / "prefill.onnx", tmp_path / "decode.onnx"), feeds, g, cfg, gen, True
    )
    ref = generate(TorchBackend(loaded.model, g, cfg, pc, dc), feeds, g, cfg, gen, True)
    assert got.tokens == ref.tokens
    assert all(len(t) == STEPS for t in got.tokens)
    assert len(got.step_logits) == STEPS
    for a, b in zip(got.step_logits, ref.step_logits, strict=True):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    l1, l2 = 21 - 1 + cfg.keep1, 21 - 1 + cfg.keep2
    expect = [l1 if i < layer else l2 for i in range(g.num_layers)]
    assert got.prefill_present_lengths == expect == ref.prefill_present_lengths
    assert got.final_present_lengths == [n + STEPS - 1 for n in expect]


@pytest.mark.parametrize("which", ["mha", "gqa"])
def test_unpruned_rewrite_greedy_equals_hf_generate(request, which):
    """keep1 = keep2 = N: the rewrite's greedy tokens equal LlavaForConditionalGeneration.generate,
    batched with left padding (HF takes the expanded prompt)."""
    loaded = request.getfixturevalue(which)
    g = loaded.geometry
    cfg = resolve(loaded, g.n_visual, g.n_visual, 2)
    pc, dc = contracts(loaded, cfg)
    feeds = dict(make_inputs(g, batch=2, text_len=15, pad=4, seed=5))
    ours = generate(
        TorchBackend(loaded.model, g, cfg, pc, dc), feeds, g, cfg, GenerationConfig(max_new_tokens=STEPS)
    )

    # the same prompts, placeholder expanded to N, left padded to a common length
    rows = []
    for ids, mask in zip(feeds["input_ids"], feeds["attention_mask"], strict=True):
        real = ids[mask.astype(bool)].tolist()
        p = real.index(g.image_token_id)
        rows.append(real[:p] + [g.image_token_id] * g.n_visual + real[p + 1 :])
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = loaded.model.generate(
        pixel_values=torch.from_numpy(feeds["pixel_values"]),
        input_ids=input_ids,
        attention_mask=attn,
        max_new_tokens=STEPS,
        min_new_tokens=STEPS,
        do_sample=False,
        pad_token_id=0,
    )
    assert out[:, width:].tolist() == ours.tokens


def test_sampling_is_seeded_and_top_p_to_zero_is_greedy(gqa):
    g = gqa.geometry
    cfg = resolve(gqa, 16, None, 2)
    pc, dc = contracts(gqa, cfg)
    backend = TorchBackend(gqa.model, g, cfg, pc, dc)
    feeds = dict(make_inputs(g, batch=2, text_len=12, seed=2))
    greedy = generate(backend, feeds, g, cfg, GenerationConfig(max_new_tokens=8)).tokens
    a = generate(backend, feeds, g, cfg, GenerationConfig(max_new_tokens=8, temperature=1.5, seed=7)).tokens
    b = generate(backend, feeds, g, cfg, GenerationConfig(max_new_tokens=8, temperature=1.5, seed=7)).tokens
    c = generate(backend, feeds, g, cfg, GenerationConfig(max_new_tokens=8, temperature=1.5, seed=8)).tokens
    nucleus = generate(
        backend, feeds, g, cfg, GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=1e-9)
    ).tokens
    assert a == b and a != c and a != greedy
    assert nucleus == greedy


def test_stop_tokens_end_a_row_and_pad_is_not_reported(gqa):
    g = gqa.geometry
    cfg = resolve(gqa, 16, None, 2)
    pc, dc = contracts(gqa, cfg)
    backend = TorchBackend(gqa.model, g, cfg, pc, dc)
    feeds = dict(make_inputs(g, batch=2, text_len=12, seed=2))
    free = generate(backend, feeds, g, cfg, GenerationConfig(max_new_tokens=8)).tokens
    stop = free[0][2]
    cut = generate(backend, feeds, g, cfg, GenerationConfig(max_new_tokens=8, stop_token_ids=(stop,))).tokens
    assert cut[0] == free[0][: free[0].index(stop) + 1]
    row1 = free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert cut[1] == row1


# ---------------------------------------------------------------------------- the CLI


def run_main(capfd: pytest.CaptureFixture, *args: str) -> SimpleNamespace:
    """``main(args)`` in this process: exit code, and what reached file descriptors 1 and 2 (capfd:
    a library writing to stdout from C would break ``--json`` here as it would in a process)."""
    capfd.readouterr()
    code = main(list(args))
    captured = capfd.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "cat.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((300, 420, 3)) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture(scope="module")
def small_profile_export(tmp_path_factory, gqa_dir) -> Path:
    """An export whose text_len profile ends at 24, to test the prompt-length limit."""
    out = tmp_path_factory.mktemp("exp") / "out"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "llava-tiny.toml"
    text = recipe.read_text().replace("text_len = [2, 64, 512]", "text_len = [2, 16, 24]")
    text = text.replace("max_new_tokens = 256", "max_new_tokens = 12")
    custom = out.parent / "small.toml"
    custom.write_text(text)
    code = main(["llava", "--recipe", str(custom), "--keep", "16", "--out", str(out), "--text-len", "20"])
    assert code == 0
    return out


def test_generate_from_export_prints_answer_timings_and_counts(small_profile_export, image, capfd):
    r = run_main(
        capfd,
        "generate",
        "--from",
        str(small_profile_export),
        "--image",
        str(image),
        "--prompt",
        "What is it?",
        "--max-new-tokens",
        "6",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["runtime"] == "onnxruntime" and len(res["answers"]) == 1 and 1 <= len(res["tokens"][0]) <= 6
    assert res["visual_tokens"] == {"N": 576, "keep1": 32, "keep2": 16, "layer_K": 2}
    assert res["prefill_ms"] > 0
    # both stages' kept indices, and how close each cut was (the keep-th score minus the next)
    s1, s2 = np.array(res["stage1_keep_idx"]), np.array(res["stage2_keep_idx"])
    assert s1.shape == (1, 32) and s2.shape == (1, 16) and set(s2[0]) <= set(s1[0])
    assert len(res["stage1_margin"]) == 1 and 0 <= res["stage1_margin"][0] < 1
    assert len(res["stage2_margin"]) == 1 and 0 <= res["stage2_margin"][0] < 1
    # the same prompt through the PyTorch rewrite of the same checkpoint: same tokens
    r2 = run_main(
        capfd,
        "generate",
        "--from",
        str(small_profile_export),
        "--runtime",
        "torch",
        "--image",
        str(image),
        "--prompt",
        "What is it?",
        "--max-new-tokens",
        "6",
        "--json",
    )
    assert r2.returncode == 0, r2.stderr
    res2 = json.loads(r2.stdout)
    assert res2["tokens"] == res["tokens"] and res2["stage2_keep_idx"] == res["stage2_keep_idx"]
    assert np.allclose(res2["stage1_margin"], res["stage1_margin"], atol=1e-6)


def test_generate_default_model_human_output(image, capfd):
    r = run_main(
        capfd, "generate", "--image", str(image), "--prompt", "What is in the image?", "--max-new-tokens", "4"
    )
    assert r.returncode == 0, r.stderr
    # the default model is the shipped trained demo (N = 144), through the PyTorch rewrite
    assert "runtime: torch, PyTorch rewrite of demo:llava-demo" in r.stdout
    assert "visual tokens: 144 -> 128 (stage 1) -> 64 (stage 2, from layer 2)" in r.stdout
    assert "-> " in r.stdout and "prefill" in r.stdout and "ms/step" in r.stdout


def _bad_manifest(tmp_path: Path, src: Path, star: dict | None = None, drop: str | None = None) -> Path:
    """A copy of the export with an old manifest version, hand-edited STAR settings, or a file removed."""
    import shutil

    d = tmp_path / "old"
    if star is None and drop is None:
        d.mkdir(parents=True)
    else:
        shutil.copytree(src, d)
    m = json.loads((src / "manifest.json").read_text())
    if star is None and drop is None:
        m["manifest_version"] = 0
    m["star"] |= star or {}
    for lv in m["star"].get("levels", []):  # the per-level settings the session reads
        lv |= {k: v for k, v in (star or {}).items() if k in lv}
    (d / "manifest.json").write_text(json.dumps(m))
    if drop:
        (d / drop).unlink()
    return d


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image", "{tmp}/missing.png"], "no such file"),
        (["--image", "{textfile}"], "not an image"),
        (["--image", "{img}", "--prompt", "{long}"], "the exported profile allows at most 24"),
        (["--image", "{img}", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--image", "{img}", "--max-new-tokens", "40"], "exceeds the exported decode profile"),
        (["--image", "{img}", "--from", "{tmp}"], "no manifest.json"),
        (["--image", "{img}", "--from", "{old}"], "manifest version 0 is incompatible"),
        (["--image", "{img}", "--prompt", "two <image> here"], "<image>"),
        (["--image", "{img}", "--from", "{badk}"], "manifest.json: --layer must be in 1..3"),
        (["--image", "{img}", "--from", "{notok}"], "--from {notok}/processor: cannot encode prompts"),
        (["--image", "{img}", "--from", "NONE", "--keep", "0"], "--keep must be in 1..144"),
        (["--image", "{img}", "--from", "NONE", "--layer", "0"], "--layer must be in 1..3"),
    ],
)
def test_generate_bad_input_exits_2_with_one_line(
    tmp_path, image, small_profile_export, extra, message, capsys
):
    textfile = tmp_path / "fake.png"
    textfile.write_text("not a picture")
    old = _bad_manifest(tmp_path, small_profile_export)
    badk = _bad_manifest(tmp_path / "k", small_profile_export, star={"layer_K": 0})
    notok = _bad_manifest(tmp_path / "t", small_profile_export, drop="processor/tokenizer.json")
    fmt = {"tmp": tmp_path, "textfile": textfile, "img": image, "old": old, "long": "word " * 40}
    fmt |= {"badk": badk, "notok": notok}
    args = [a.format(**fmt) for a in extra]
    message = message.format(**fmt)
    if "--prompt" not in args:
        args += ["--prompt", "What is it?"]
    if "NONE" in args:  # the default model through the PyTorch rewrite: no --from
        i = args.index("--from")
        del args[i : i + 2]
    elif "--from" not in args:
        args += ["--from", str(small_profile_export)]
    from star_export.cli import main

    capsys.readouterr()
    try:
        code = main(["generate", *args])  # in process: an escaping exception fails the test like a traceback
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
