"""Bad input a new user hit (issue #20, items 6 and 7): each ends in ONE line on stderr and exit 2
(130 for Ctrl-C), with nothing half-written; and the export's profile flags set the exported profile.
The commands run in process (``main(argv)``); an exception escaping ``main`` fails the test as a
traceback would."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from star_export.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PROFILE_FLAGS = ("--max-batch", "4", "--max-text-len", "64", "--max-new-tokens", "16")


def run_main(capsys: pytest.CaptureFixture, *args: str) -> SimpleNamespace:
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own errors exit 2 from inside main
        code = e.code
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def one_line(r: SimpleNamespace, code: int = 2) -> str:
    """The single stderr line of a run that exited ``code``."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def export(cli_export) -> Path:
    return cli_export("llava-keep16", "--keep", "16")  # shared with test_cli, test_deploy, test_triton


@pytest.fixture(scope="module")
def small_export(cli_export) -> Path:
    """llava-tiny exported with the profile flags: batch <= 4, prompts <= 64 tokens, 16 new tokens."""
    return cli_export("llava-keep16-flags", "--keep", "16", *PROFILE_FLAGS)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "cat.png"
    Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype("uint8")).save(path)
    return path


# ------------------------------------------------------------------------------------ 6: recipes


def _recipe(tmp_path: Path, edit) -> Path:
    text = (RECIPES / "llava-tiny.toml").read_text()
    path = tmp_path / "mine.toml"
    path.write_text(edit(text))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('architecture = "LlavaForConditionalGeneration"\n', ""), "key 'architecture'"),
        (lambda t: t.replace('name = "llava-tiny"\n', ""), "key 'name'"),
        (lambda t: t.replace("[config", "[unused"), "key 'config'"),
        (
            lambda t: t.replace("batch = [1, 2, 8]", "batch = [1, 8]"),
            "[profile] batch must be [min, opt, max]",
        ),
        (lambda t: t.replace("keep = 64", 'keep = "64"'), "[star] keep must be an integer"),
        (lambda t: t.replace("seed = 0", 'seed = "zero"'), "'seed' must be an integer, got 'zero'"),
    ],
)
def test_a_recipe_without_a_required_key_names_the_file_and_the_key(tmp_path, capsys, edit, message):
    recipe = _recipe(tmp_path, edit)
    out = tmp_path / "out"
    line = one_line(run_main(capsys, "llava", "--recipe", str(recipe), "--out", str(out)))
    assert line.startswith(f"star_export: error: recipe {recipe}: ") and message in line, line
    assert not out.exists()


# ---------------------------------------------------------------- 6: the export's profile flags


def test_the_profile_flags_set_the_exported_profile(small_export, export, image, tmp_path, capsys):
    """``--max-batch 4 --max-text-len 64 --max-new-tokens 16`` reach the manifest (every graph's
    ranges, the decode graph's past lengths, the decoding limit), Triton's limits and the requests'
    checks; without them the recipe's 8 / 512 / 256 hold."""
    from star_export.contract import decode_contract
    from star_export.geometry import Geometry
    from star_export.manifest import star_config

    def ranges(directory: Path) -> tuple[dict, dict]:
        m = json.loads((directory / "manifest.json").read_text())
        return m, {
            g: {d["name"]: [d["min"], d["opt"], d["max"]] for d in e["dynamic_dims"]}
            for g, e in m["graphs"].items()
        }

    m, dims = ranges(small_export)
    assert dims["prefill"] == {"batch": [1, 2, 4], "text_len": [2, 64, 64]}
    geo = Geometry.from_dict(m["model"]["geometry"])
    want = decode_contract(geo, star_config(m, geo, "test"), (1, 2, 4), (2, 64, 64), 16)
    assert dims["decode"] == {d.name: [d.min, d.opt, d.max] for d in want.dims}
    assert dims["decode"]["past_len_l1"][2] == 64 - 1 + 32 + 16 - 1  # T - 1 + keep1 + new - 1
    assert m["decoding"]["max_new_tokens"] == 16
    base, base_dims = ranges(export)  # the same recipe without the flags
    assert base_dims["prefill"] == {"batch": [1, 2, 8], "text_len": [2, 64, 512]}
    assert base["decoding"]["max_new_tokens"] == 256

    # Triton serves the exported profile
    repo = tmp_path / "repo"
    r = run_main(capsys, "triton", "--from", str(small_export), "--repo", str(repo), "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "limits: batch <= 4, prompt <= 64 tokens, past lengths <= 110 (layers < K) / 94" in r.stdout
    assert "max_batch_size: 4" in (repo / "prefill" / "config.pbtxt").read_text()
    line = one_line(
        run_main(
            capsys,
            "triton",
            "--from",
            str(small_export),
            "--repo",
            str(tmp_path / "r2"),
            "--max-new-tokens",
            "100",
        )
    )
    assert "--max-new-tokens 100: the decode profile allows at most 78 new tokens" in line

    # generate: more prompts than the profile's max batch, or a longer answer, is refused
    five = [a for _ in range(5) for a in ("--prompt", "What is it?")]
    line = one_line(run_main(capsys, "generate", "--from", str(small_export), "--image", str(image), *five))
    assert "5 prompts in one request: the exported profile allows at most 4 (batch)" in line
    four = five[:8]
    r = run_main(
        capsys, "generate", "--from", str(small_export), "--image", str(image), *four, "--max-new-tokens", "2"
    )
    assert r.returncode == 0 and r.stdout.count("[cat.png] What is it?\n  -> ") == 4, r.stderr
    r = run_main(
        capsys, "generate", "--from", str(export), "--image", str(image), *five, "--max-new-tokens", "2"
    )
    assert r.returncode == 0, r.stderr  # the recipe's profile holds 8
    line = one_line(
        run_main(
            capsys,
            "generate",
            "--from",
            str(small_export),
            "--image",
            str(image),
            "--prompt",
            "Hi?",
            "--max-new-tokens",
            "90",
        )
    )
    assert "--max-new-tokens 90 exceeds the exported decode profile" in line


def test_export_profile_rules():
    from star_export.api import export_profile
    from star_export.errors import UsageError

    recipe = {"batch": [1, 2, 8], "text_len": [2, 64, 512], "max_new_tokens": 256}
    assert export_profile(recipe, {}, 2) == ((1, 2, 8), (2, 64, 512), 256)
    assert export_profile(recipe, {}, 12) == ((1, 12, 12), (2, 64, 512), 256)  # the validation batch fits
    flags = {"batch": (None, None, 4), "text_len": (None, None, 32), "max_new_tokens": 16}
    assert export_profile(recipe, flags, 2) == ((1, 2, 4), (2, 32, 32), 16)  # opt follows a lower max
    assert export_profile({}, {"text_len": (4, 8, None)}, 2) == ((1, 2, 8), (4, 8, 512), 256)
    with pytest.raises(UsageError, match="min <= opt <= max"):
        export_profile(recipe, {"text_len": (None, 100, 32)}, 2)
    with pytest.raises(UsageError, match="text_len: min must be >= 2"):
        export_profile(recipe, {"text_len": (1, None, None)}, 2)


# --------------------------------------------------------------------- 7: hand-edited manifests


def _edited(src: Path, tmp_path: Path, edit) -> Path:
    d = tmp_path / "edited"
    shutil.copytree(src, d)
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def _keep2(value: int):
    def edit(m: dict) -> None:
        m["star"]["keep2"] = m["star"]["default_keep"] = value
        m["star"]["levels"][0]["keep2"] = value

    return edit


def _relabel(m: dict) -> None:
    m["star"]["levels"][0]["keep2"] = 20


def _shape(graph: str, tensor: str, shape: list) -> callable:
    def edit(m: dict) -> None:
        for t in (*m["graphs"][graph]["inputs"], *m["graphs"][graph]["outputs"]):
            if t["name"] == tensor:
                t["shape"] = shape

    return edit


def _layer(m: dict) -> None:
    m["star"]["layer_K"] = m["star"]["levels"][0]["layer_K"] = 3


MANIFEST_EDITS = {
    "keep2 24 (the graph holds 16)": (
        _keep2(24),
        "stage2_keep_idx is ['batch', 16], keep2 24 needs ['batch', 24]",
    ),
    "a level relabelled 20": (
        _relabel,
        "keep level 20 (keep1 32, K 2) does not match its graph prefill.onnx",
    ),
    "no graphs": (lambda m: m.pop("graphs"), "manifest.json has no 'graphs'"),
    "no image": (lambda m: m.pop("image"), "manifest.json has no 'image'"),
    "no star.levels": (lambda m: m["star"].pop("levels"), "manifest.json has no 'star.levels'"),
    "no decode graph": (lambda m: m["graphs"].pop("decode"), "'graphs' has no 'decode' graph"),
    "logits of another vocabulary": (
        _shape("prefill", "logits", ["batch", 1000]),
        "says prefill's logits is float32 ['batch', 1000], prefill.onnx holds float32 ['batch', 1024]",
    ),
    "pixel_values of another size": (
        _shape("prefill", "pixel_values", ["batch", 3, 224, 224]),
        "prefill.onnx holds float32 ['batch', 3, 336, 336]",
    ),
    "stage1_keep_idx and keep1 edited together": (
        lambda m: (
            _shape("prefill", "stage1_keep_idx", ["batch", 24])(m),
            m["star"]["levels"][0].update(keep1=24),
        ),
        "manifest.json says prefill's stage1_keep_idx is int64 ['batch', 24], prefill.onnx holds int64 ['batch', 32]",
    ),
    "layer_K 3 (the graphs hold K 2)": (
        _layer,
        "present.2.key is ['batch', 2, 'text_len + 15', 16], the level needs text_len + 31",
    ),
    "flat keep2 only": (
        lambda m: m["star"].update(keep2=48),
        "says star.keep2 48, its default (first) keep level has 16",
    ),
}


@pytest.mark.parametrize("case", list(MANIFEST_EDITS))
def test_a_hand_edited_manifest_is_one_line_at_generate_and_triton(export, image, tmp_path, capsys, case):
    edit, message = MANIFEST_EDITS[case]
    d = _edited(export, tmp_path, edit)
    line = one_line(run_main(capsys, "generate", "--from", str(d), "--image", str(image), "--prompt", "Hi?"))
    assert line.startswith(f"star_export: error: --from {d}: ") and message in line, line
    repo = tmp_path / "repo"
    line = one_line(run_main(capsys, "triton", "--from", str(d), "--repo", str(repo)))
    assert message in line and not repo.exists()
    # the same directory with its own manifest back answers (the edit alone was wrong)
    shutil.copy2(export / "manifest.json", d / "manifest.json")
    r = run_main(
        capsys,
        "generate",
        "--from",
        str(d),
        "--image",
        str(image),
        "--prompt",
        "Hi?",
        "--max-new-tokens",
        "2",
    )
    assert r.returncode == 0, r.stderr


def test_a_graph_edited_behind_its_manifest_is_one_line(export, image, tmp_path, capsys):
    """The check reads the ONNX file (no weights): a graph whose declared output differs from the
    manifest (here renamed) is named, whatever the manifest says."""
    import onnx

    d = tmp_path / "edited"
    shutil.copytree(export, d)
    model = onnx.load(str(d / "prefill.onnx"), load_external_data=False)
    model.graph.output[1].type.tensor_type.shape.dim[1].dim_value = 48  # stage1_keep_idx [batch, 48]
    onnx.save(model, str(d / "prefill.onnx"))
    line = one_line(run_main(capsys, "generate", "--from", str(d), "--image", str(image), "--prompt", "Hi?"))
    assert "stage1_keep_idx is int64 ['batch', 32], prefill.onnx holds int64 ['batch', 48]" in line


# ------------------------------------------------------------------- 7: generate, Ctrl-C, flags


@pytest.mark.parametrize("stop", ["99999", "1024", "-1"])
def test_a_stop_id_outside_the_vocabulary_is_refused(export, image, capsys, stop):
    line = one_line(
        run_main(
            capsys,
            "generate",
            "--from",
            str(export),
            "--image",
            str(image),
            "--prompt",
            "Hi?",
            "--stop",
            stop,
        )
    )
    assert f"--stop {stop}: not a token id of this model (0..1023)" in line


def test_stop_ids_inside_the_vocabulary_run(export, image, capsys):
    r = run_main(
        capsys,
        "generate",
        "--from",
        str(export),
        "--image",
        str(image),
        "--prompt",
        "Hi?",
        "--stop",
        "1023",
        "--max-new-tokens",
        "2",
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("where", ["export._takers", "check.run"])
def test_ctrl_c_at_any_time_is_one_line_and_exit_130(monkeypatch, capsys, tmp_path, where):
    """While the parser is built (it imports the families, hence torch: the first seconds) and while
    a command runs."""
    import importlib

    module, name = where.split(".")

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"star_export.commands.{module}"), name, interrupted)
    r = run_main(capsys, "check", str(tmp_path / "x.onnx"))
    assert one_line(r, 130) == "star_export: interrupted"


@pytest.mark.parametrize("value", ["abc", "336x", "2x3x4", "x"])
def test_image_size_names_both_forms(capsys, tmp_path, value):
    line = one_line(run_main(capsys, "llava", "--image-size", value, "--out", str(tmp_path / "o")))
    assert f"expected PX or HxW such as 336 or 336x448, got {value!r}" in line


def test_image_size_parses_both_forms():
    from star_export.commands.argtypes import image_size

    assert image_size("448") == 448 and image_size("336x448") == (336, 448)
    assert image_size("336X448") == (336, 448)


def test_export_help_names_the_files_it_always_writes():
    from star_export.commands.export import EPILOG

    assert "weights.onnx.data" in EPILOG and "large models" not in EPILOG


# ------------------------------------------------------------------------------- 7: triton paths


def test_triton_prints_the_repository_real_path(export, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run_main(capsys, "triton", "--from", str(export), "--repo", "sub/repo")
    assert r.returncode == 0, r.stderr
    real = (tmp_path / "sub" / "repo").resolve()
    assert f"tritonserver --model-repository={real}   " in r.stdout and "$PWD" not in r.stdout
    assert f"--model-repository={real} " in (real / "README.md").read_text()


@pytest.mark.parametrize("flag", ["--cpp-header", "--repo"])
def test_triton_target_under_a_file_is_one_line(export, tmp_path, capsys, flag):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    target = afile / "sub" / "star_model.h"
    other = ["--repo", str(tmp_path / "repo")] if flag == "--cpp-header" else []
    line = one_line(run_main(capsys, "triton", "--from", str(export), flag, str(target), *other))
    assert f"{flag} {target}: {afile} is a file, not a directory" in line
    assert afile.read_text() == "mine" and not (tmp_path / "repo").exists()


# ------------------------------------------------------------------------------- 7: a full disk


def _full_disk(written: list[Path]):
    """A stand-in writer: writes part of its file, then fails as a full disk does."""

    def write(*args, **_kwargs):
        path = Path(next(a for a in args if isinstance(a, (str, Path)) and "/" in str(a)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 1000)  # half-written
        written.append(path)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    return write


def _leftovers(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if ".star_export-" in str(p) or "staging" in str(p) or p.name.endswith(".tmp")
    )


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import star_export.onnx_export as export_mod

    written: list[Path] = []
    monkeypatch.setattr(
        export_mod, "export_onnx", lambda module, contract, path, *a, **k: _full_disk(written)(path)
    )
    out = tmp_path / "out"
    line = one_line(
        run_main(
            capsys, "llava", "--recipe", "llava-tiny", "--keep", "8", "--skip-validation", "--out", str(out)
        )
    )
    assert line.startswith(f"star_export: error: --out {out}: no space left on device writing ")
    assert "free, up to" in line and "MiB needed)" in line
    assert written and not written[0].exists()  # the half-written graph went with the staging directory
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_full_disk_during_triton_is_one_line_and_leaves_nothing(export, tmp_path, capsys, monkeypatch):
    import star_export.deploy.models as models

    written: list[Path] = []
    monkeypatch.setattr(models, "link_or_copy", lambda src, dst: _full_disk(written)(dst))
    repo = tmp_path / "repo"
    line = one_line(run_main(capsys, "triton", "--from", str(export), "--repo", str(repo)))
    assert line.startswith(f"star_export: error: --repo {repo}: no space left on device writing ")
    assert "needed)" in line
    assert written and not written[0].exists()
    assert not repo.exists() and _leftovers(tmp_path) == []


def test_a_full_disk_writing_the_cpp_header_keeps_the_old_one(export, tmp_path, capsys, monkeypatch):
    header = tmp_path / "star_model.h"
    header.write_text("// the previous header\n")
    real_write = Path.write_text

    def full(self, data, *a, **k):
        if self.name.startswith(".star_model.h"):
            real_write(self, data[: len(data) // 2], *a, **k)  # half of it, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    line = one_line(run_main(capsys, "triton", "--from", str(export), "--cpp-header", str(header)))
    assert line.startswith(f"star_export: error: --cpp-header {header}: no space left on device (")
    assert header.read_text() == "// the previous header\n" and sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["star_model.h"]


def test_disk_guard_finds_a_full_disk_behind_a_wrapping_error(tmp_path):
    from star_export.atomic import atomic_write, disk_guard
    from star_export.errors import DiskFull

    with pytest.raises(
        DiskFull, match=rf"^--out {tmp_path}: no space left on device \(.* free, up to 2.0 GiB needed\)$"
    ):
        with disk_guard(tmp_path, "--out", needed=2 << 30):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as e:
                raise RuntimeError("the exporter wrapped it") from e
    with pytest.raises(RuntimeError, match="not a disk"):  # anything else passes through unchanged
        with disk_guard(tmp_path, "--out"):
            raise RuntimeError("not a disk")
    atomic_write(tmp_path / "a.txt", "done")
    assert (tmp_path / "a.txt").read_text() == "done" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_shipped_demo_by_name(capsys, tmp_path):
    """``--model demo:NAME`` is a shipped demo checkpoint; an unknown name is one line naming them."""
    from star_export.load import demo_checkpoint, resolve_model, shipped_demos

    assert {"llava-demo", "qwen3-vl-demo"} <= set(shipped_demos())
    assert resolve_model("demo:qwen3-vl-demo") == (demo_checkpoint("qwen3-vl-demo"), "demo:qwen3-vl-demo")
    line = one_line(run_main(capsys, "llava", "--model", "demo:nope", "--out", str(tmp_path / "o")))
    assert "--model demo:nope: no such demo checkpoint; shipped: llava-demo, qwen3-vl-demo" in line
    assert not (tmp_path / "o").exists()
