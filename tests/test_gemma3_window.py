"""Gemma 3 decoding past its sliding window: exact at any length.

gemma3-tiny with a sliding window of 20, shorter than every prompt (T - 1 + N >= 78 positions) and
than the answer (24 new tokens), exported with two keep levels (8 and N = 64) under the generic
profile (831 positions: admitted). For every level, onnxruntime and the PyTorch rewrite decode the
prefill and every step: at keep = N token for token and logit for logit like transformers'
``Gemma3ForConditionalGeneration.generate`` with its own window; at keep < N like the windowed prefill
rewrite run on the prompt plus the answer so far (teacher-forced, its selection forced to the
decode's kept indices). Deliberately broken decodes fail the same checks: the PyTorch decode without
its window mask, the onnxruntime graph fed slot positions that never leave the window, and the window
counted in cache slots instead of original positions (wrong wherever tokens were pruned). The
PyTorch path without an export (``load_model``) is checked the same way on processor prompts.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from star_export.cli import main
from star_export.contract import decode_contract, prefill_contract
from star_export.families.gemma3 import Gemma3Prefill
from star_export.runtime import GenerationConfig, TorchBackend, generate
from star_export.validate import make_inputs

N = 64  # 8 x 8 pooled tokens
WINDOW = 20  # shorter than every prompt and than the answer
STEPS = 24  # new tokens per row
LEVELS = (8, N)  # one pruned level, one unpruned (compared with transformers' generate)
TOL = {"onnxruntime": 1e-4, "torch": 1e-5}  # step logits, max|diff| / max|reference|


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def windowed_dir(_isolated_cache):
    from star_export.load import materialise
    from star_export.recipes import load_recipe

    return materialise(load_recipe("gemma3-tiny"), {"text_config": {"sliding_window": WINDOW}})


@pytest.fixture(scope="module")
def windowed(windowed_dir):
    from star_export.load import load

    return load(windowed_dir)


@pytest.fixture(scope="module")
def export(windowed_dir, tmp_path_factory):
    """Two keep levels of the window-20 checkpoint; the generic profile (text_len up to 512, 256 new
    tokens: 831 positions) lies far beyond the window and is admitted."""
    out = tmp_path_factory.mktemp("gemma-window") / "export"
    keeps = ",".join(map(str, LEVELS))
    code = main(
        ["llava", "--model", str(windowed_dir), "--keep", keeps, "--skip-validation", "--out", str(out)]
    )
    assert code == 0
    return out


def prompts(geo) -> dict[str, np.ndarray]:
    """Row 0: 15 real tokens, 6 after the image; row 1: left padded by 4, 3 after the image (its first
    new tokens reach back into the image's last offsets through the window, pruned or not)."""
    return dict(make_inputs(geo, batch=2, text_len=15, pad=4, seed=4))


def hf_generate(model, geo, feeds, steps: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """Gemma3ForConditionalGeneration.generate, greedy, with its own sliding window, on the expanded
    prompts (left padded, token_type_ids): its new tokens per row and its logits per step."""
    rows = []
    for ids, mask in zip(feeds["input_ids"], feeds["attention_mask"], strict=True):
        real = ids[mask.astype(bool)].tolist()
        p = real.index(geo.image_token_id)
        rows.append(real[:p] + [geo.image_token_id] * N + real[p + 1 :])
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    hf = model.generate(
        pixel_values=torch.from_numpy(feeds["pixel_values"]),
        input_ids=input_ids,
        attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        token_type_ids=(input_ids == geo.image_token_id).long(),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return hf.sequences[:, width:].tolist(), [x.float().numpy() for x in hf.logits]


def rewrite_steps(model, geo, cfg, feeds, run) -> list[np.ndarray]:
    """The windowed prefill rewrite's logits at every step of ``run``: the prompt plus the answer's
    first t tokens (teacher-forced), the selection forced to the run's kept indices."""
    pre = Gemma3Prefill(model, geo, cfg).eval()
    tokens = np.array(run.tokens)
    force = [torch.from_numpy(run.stage1_keep_idx), torch.from_numpy(run.stage2_keep_idx)]
    out = []
    for t in range(tokens.shape[1]):
        ids = np.concatenate([feeds["input_ids"], tokens[:, :t]], axis=1)
        mask = np.concatenate([feeds["attention_mask"], np.ones_like(tokens[:, :t])], axis=1)
        args = [torch.from_numpy(x) for x in (feeds["pixel_values"], ids, mask)]
        with torch.no_grad():
            out.append(pre.run(*args, force1=force[0], force2=force[1])["logits"].numpy())
    return out


class WrongPositions:
    """A backend whose decode steps get wrong slot positions (a deliberately broken window).
    ``ignored``: every past slot at the new token's position (the window never bites); ``slots``: the
    window counted in cache slots, not original positions (equal only where nothing was pruned)."""

    def __init__(self, backend, mode: str):
        self.backend, self.mode, self.name = backend, mode, backend.name

    def prefill(self, feeds):
        return self.backend.prefill(feeds)

    def decode(self, feeds):
        feeds, new = dict(feeds), feeds["position_ids"]  # (B, 1)
        for group in ("l1", "l2"):
            past = feeds[f"past_positions_{group}"]  # (B, P), -1 at padding
            slots = np.arange(past.shape[1])[None]
            fake = new + 0 * slots if self.mode == "ignored" else new - past.shape[1] + slots
            feeds[f"past_positions_{group}"] = np.where(past < 0, past, fake)
        return self.backend.decode(feeds)


@pytest.fixture(scope="module")
def runs(windowed, export):
    """Per keep level: its config, the references of every run and the runs (onnxruntime, PyTorch,
    and the broken decodes), STEPS greedy tokens each."""
    from star_export import load_export

    model, geo = windowed.model, windowed.geometry
    feeds = prompts(geo)
    pipe = load_export(export)
    assert pipe.keeps == list(LEVELS)
    dc = decode_contract(geo, pipe.levels, (1, 2, 8), (2, 64, 512), 256)
    gen = GenerationConfig(max_new_tokens=STEPS)
    hf = hf_generate(model, geo, feeds, STEPS)
    out = {}
    for cfg in pipe.levels:
        pc = prefill_contract(geo, cfg, (1, 2, 8), (2, 64, 512))
        blind = TorchBackend(model, geo, cfg, pc, dc)
        blind._decode.window = None  # the decode mask ignores the window (the state before slot positions)
        backends = {
            "onnxruntime": pipe.backend(cfg.keep2),
            "torch": TorchBackend(model, geo, cfg, pc, dc),
            "torch, window ignored": blind,
            "onnxruntime, window ignored": WrongPositions(pipe.backend(cfg.keep2), "ignored"),
            "onnxruntime, window in slots": WrongPositions(pipe.backend(cfg.keep2), "slots"),
        }
        results = {k: generate(b, feeds, geo, cfg, gen, keep_logits=True) for k, b in backends.items()}
        forced = TorchBackend(model, geo, cfg, pc, dc)  # the forced-selection path of half-precision checks
        forced.forced = (results["onnxruntime"].stage1_keep_idx, results["onnxruntime"].stage2_keep_idx)
        results["torch, forced"] = generate(forced, feeds, geo, cfg, gen, keep_logits=True)
        checks = {}
        for name, run in results.items():
            if cfg.keep2 == N:  # transformers' own generate: the tokens must match too
                checks[name] = (hf[0] == run.tokens, max(map(rel, run.step_logits, hf[1])))
            else:  # the rewrite teacher-forced on the run's own tokens
                ref = rewrite_steps(model, geo, cfg, feeds, run)
                checks[name] = (True, max(map(rel, run.step_logits, ref)))
        out[cfg.keep2] = (results, checks)
    return feeds, out


def test_the_export_admits_the_profile_and_carries_slot_positions(export):
    """The profile (831 positions) exceeds the window (20): admitted. Each prefill graph outputs its
    cached slots' original positions; the decode graph takes them and returns them with the new one."""
    manifest = json.loads((export / "manifest.json").read_text())
    decode = manifest["graphs"]["decode"]
    ins = {t["name"]: (t["dtype"], t["shape"]) for t in decode["inputs"]}
    outs = {t["name"]: (t["dtype"], t["shape"]) for t in decode["outputs"]}
    assert ins["past_positions_l1"] == ("int64", ["batch", "past_len_l1"])
    assert ins["past_positions_l2"] == ("int64", ["batch", "past_len_l2"])
    assert outs["present_positions_l2"] == ("int64", ["batch", "past_len_l2 + 1"])
    assert {d["name"]: d["max"] for d in decode["dynamic_dims"]}["past_len_l1"] == 512 - 1 + N + 256 - 1
    for lv in manifest["star"]["levels"]:
        outputs = manifest["graphs"][lv["graph"]]["outputs"]
        assert [t["name"] for t in outputs][-2:] == ["present_positions_l1", "present_positions_l2"]
    graph = onnx.load(str(export / "decode.onnx"), load_external_data=False)
    assert [i.name for i in graph.graph.input][-2:] == ["past_positions_l1", "past_positions_l2"]
    assert [o.name for o in graph.graph.output][-2:] == ["present_positions_l1", "present_positions_l2"]


@pytest.mark.parametrize("keep", LEVELS)
def test_decode_past_the_window_is_exact_at_every_level(windowed, runs, keep):
    """The prefill and every decode step of a 24-token answer after 78- and 74-position prompts,
    window 20: at keep = N onnxruntime and PyTorch give transformers' generate token for token, logits
    within 1e-4 / 1e-5; at keep < N the windowed rewrite's logits, within the same tolerances. The
    PyTorch decode forced to onnxruntime's selection (the half-precision checks' path) agrees too."""
    feeds, out = runs
    results, checks = out[keep]
    for name, tol in (*TOL.items(), ("torch, forced", TOL["torch"])):
        same, worst = checks[name]
        assert same and worst <= tol, (name, same, worst)
    assert results["torch"].tokens == results["onnxruntime"].tokens
    assert all(len(t) == STEPS for t in results["onnxruntime"].tokens)
    last = feeds["attention_mask"].sum(axis=1) - 1 + N + STEPS - 1  # the last answer token's position
    assert last.tolist() == [101, 97]  # far past the window of 20, in original positions


@pytest.mark.parametrize("keep", LEVELS)
def test_a_decode_that_ignores_the_window_fails_these_checks(runs, keep):
    """The same checks on deliberately broken decodes: the PyTorch decode without its window mask and
    the onnxruntime graph fed positions that never leave the window miss by orders of magnitude; the
    window counted in cache slots misses wherever tokens were pruned (keep < N)."""
    _, out = runs
    _, checks = out[keep]
    for name in ("torch, window ignored", "onnxruntime, window ignored"):
        same, worst = checks[name]
        assert worst > 100 * TOL["onnxruntime"], (name, worst)
    same, worst = checks["onnxruntime, window in slots"]
    if keep < N:
        assert worst > 100 * TOL["onnxruntime"], worst
    else:  # nothing pruned: slot distance is position distance, the mutation is harmless here
        assert same and worst <= TOL["onnxruntime"], worst


def test_load_model_generates_past_the_window_like_transformers(windowed_dir):
    """The PyTorch path without an export (``load_model``: ``generate`` without ``--from``, eval's
    reference) on real processor prompts: 24 new tokens past the window, transformers' tokens and
    logits (up to a stop token, where a row meets one); with the window ignored in decode it fails."""
    from PIL import Image

    from star_export import load_model

    pipe = load_model(windowed_dir, keep=N, keep1=N)
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray((rng.random((48, 80, 3)) * 255).astype("uint8")),
        Image.new("RGB", (64, 64), "red"),
    ]
    questions = ["What is in the picture, and what colour is it?", "colour?"]
    got = pipe.generate(images, questions, max_new_tokens=STEPS, keep_logits=True).result
    feeds = pipe.pre.encode(images, questions)
    assert int(feeds["attention_mask"].sum(axis=1).min()) - 1 + N > WINDOW
    tokens, logits = hf_generate(pipe.model, pipe.geo, feeds, STEPS)

    def worst(run) -> float:
        return max(
            rel(run.step_logits[t][b], logits[t][b])
            for b, row in enumerate(run.tokens)
            for t in range(len(row))
        )

    assert all(row == tokens[b][: len(row)] for b, row in enumerate(got.tokens))
    assert worst(got) <= TOL["torch"] and max(map(len, got.tokens)) > WINDOW
    pipe.backend(N)._decode.window = None  # broken: the decode mask ignores the window
    blind = pipe.generate(images, questions, max_new_tokens=STEPS, keep_logits=True).result
    assert worst(blind) > 100 * TOL["onnxruntime"]
