"""Triton model repositories (star_export.deploy): every config.pbtxt against Triton's own protobuf
schema, the repository layout (one prefill model per keep level, one decode model, the shared
weights hard-linked), usage errors, and a REAL tritonserver answering over HTTP and gRPC.

The server is the ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel (Triton 2.51,
Python backend only), started on loopback with the ``--backend python`` repository of a small
export. Its answers must equal ``star_export.runtime.generate`` over onnxruntime token for token;
for an export with three keep levels (``--keep 8,16,32``), one server answers requests at every level,
each equal to ``load_export(dir).generate(..., keep=k)``.

That binary's Python backend stub needs numpy < 2 in ITS Python environment (its pybind11
predates numpy 2: under numpy 2 every tensor reads as copies of its first byte). The project's
venv has numpy 2, so the test gives the stub a throw-away venv whose path puts a numpy 1.x
directory first, then this venv's site-packages. Install that directory once with::

    pip install --target .venv/triton-stub-site "numpy>=1.26,<2"

(or point STAR_EXPORT_TRITON_STUB_SITE at another one). Missing pieces skip locally and fail
under CI=true; a binary that cannot start at all skips.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from star_export import deploy
from star_export.deploy import server as triton_server
from star_export.errors import MissingComponent, UsageError

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed"
)
from google.protobuf import text_format  # noqa: E402  (after the importorskip)

KEEP = 16
MAX_NEW = 6  # the pipeline's default limit in the served repository
DTYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}  # the only dtypes a float32 export uses
PIPELINE_INPUTS = {  # name: (TYPE_*, dims, optional)
    "image": ("TYPE_STRING", [1], False),
    "prompt": ("TYPE_STRING", [1], False),
    "max_new_tokens": ("TYPE_INT32", [1], True),
    "stop_token_ids": ("TYPE_INT32", [-1], True),
    "keep": ("TYPE_INT32", [1], True),
}


# ---------------------------------------------------------------------------------------- helpers


def unavailable(reason: str):
    """A missing test prerequisite: skip locally, fail in CI (where it must be installed)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


def parse_config(path: Path):
    config = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), config)
    return config


def dtype_name(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


def expected_io(tensors: list[dict]) -> list[tuple[str, str, list[int]]]:
    """(name, TYPE_*, dims without the batch dim, symbolic -> -1), written independently of deploy."""
    out = []
    for t in tensors:
        assert t["shape"][0] == "batch"
        out.append((t["name"], DTYPES[t["dtype"]], [-1 if isinstance(d, str) else d for d in t["shape"][1:]]))
    return out


def served_io(entries) -> list[tuple[str, str, list[int]]]:
    """(name, TYPE_*, the dims the model sees): a [batch]-only tensor is served as dims [1] reshaped to []."""
    out = []
    for e in entries:
        if e.HasField("reshape"):
            assert list(e.dims) == [1] and list(e.reshape.shape) == []
            out.append((e.name, dtype_name(e.data_type), list(e.reshape.shape)))
        else:
            out.append((e.name, dtype_name(e.data_type), list(e.dims)))
    return out


def batch_max(manifest: dict, graph: str) -> int:
    return next(d["max"] for d in manifest["graphs"][graph]["dynamic_dims"] if d["name"] == "batch")


def with_fake_engines(export: Path, target: Path) -> Path:
    """A copy of the export whose manifest records 'engines' that are NOT engines: small files
    named as such (one per prefill graph, one for decode), for the pure file-layout / config check of
    the tensorrt repository."""
    shutil.copytree(export, target)
    manifest = json.loads((target / "manifest.json").read_text())
    engines = {}
    for g in graph_names(manifest):
        fake = target / f"FAKE-{g}-not-a-tensorrt-engine.plan"
        fake.write_bytes(b"layout test only: this file is not a TensorRT engine\n")
        graph = manifest["graphs"][g]
        dims = {d["name"]: d for d in graph["dynamic_dims"]}
        dims["batch"] = {**dims["batch"], "max": 4}  # a profile narrower than the export's range

        def corner(t, which, dims=dims):
            return [
                d if isinstance(d, int) else _eval(d, {k: v[which] for k, v in dims.items()})
                for d in t["shape"]
            ]

        profile = {t["name"]: {w: corner(t, w) for w in ("min", "opt", "max")} for t in graph["inputs"]}
        engines[g] = {
            "path": fake.name,
            "graph": g,
            "tensorrt": "none (fake)",
            "sha256": "0" * 64,
            "profiles": [{"inputs": profile}],
        }
    manifest["engines"] = engines
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def graph_names(manifest: dict) -> list[str]:
    """Every keep level's prefill graph, then decode (read from the manifest, not from deploy)."""
    return [lv["graph"] for lv in manifest["star"]["levels"]] + ["decode"]


def _eval(expr: str, sizes: dict[str, int]) -> int:
    return int(eval(expr, {"__builtins__": {}}, dict(sizes)))


@pytest.fixture(scope="module")
def export(cli_export) -> Path:
    """``python -m star_export llava --keep 16`` once per test session (shared with the C++/Triton tests)."""
    return cli_export(f"llava-keep{KEEP}", "--keep", str(KEEP))


@pytest.fixture(scope="module")
def manifest(export) -> dict:
    return json.loads((export / "manifest.json").read_text())


def repositories(export: Path, root: Path) -> dict[str, Path]:
    """One repository of ``export`` per backend under ``root`` (tensorrt from the fake-engine copy)."""
    fake = with_fake_engines(export, root / "export-with-fake-engines")
    out = {}
    for backend in deploy.BACKENDS:
        deploy.write_repository(fake if backend == "tensorrt" else export, root / backend, backend, 8)
        out[backend] = root / backend
    return out


@pytest.fixture(scope="module")
def repos(export, tmp_path_factory) -> dict[str, Path]:
    return repositories(export, tmp_path_factory.mktemp("repos"))


# ---------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("backend", deploy.BACKENDS)
def test_graph_configs_parse_with_tritons_schema_and_follow_the_manifest(repos, manifest, backend):
    for graph in ("prefill", "decode"):
        config = parse_config(repos[backend] / graph / "config.pbtxt")
        g = manifest["graphs"][graph]
        assert config.name == graph
        if backend == "tensorrt":
            assert (config.platform, config.backend) == ("tensorrt_plan", "")
            assert config.max_batch_size == 4  # the (fake) engine profile's max batch
        elif backend == "onnxruntime":
            assert (config.platform, config.backend) == ("onnxruntime_onnx", "")
            assert config.max_batch_size == batch_max(manifest, graph)
        else:
            assert (config.platform, config.backend) == ("", "python")
            assert config.max_batch_size == batch_max(manifest, graph)
        assert config.max_batch_size > 0
        assert served_io(config.input) == expected_io(g["inputs"])
        assert served_io(config.output) == expected_io(g["outputs"])
        assert not any(t.optional for t in config.input)
        (group,) = config.instance_group
        kind = model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind)
        assert kind == ("KIND_GPU" if backend == "tensorrt" else "KIND_CPU")
        assert list(group.profile) == (["0"] if backend == "tensorrt" else [])
        assert group.count == 1


def test_tensorrt_config_documents_the_optimization_profile(repos):
    text = (repos["tensorrt"] / "decode" / "config.pbtxt").read_text()
    assert "Optimization profile 0" in text and "past.0.key:" in text and "max_batch_size 4" in text


def test_pipeline_config_parses_and_declares_the_bls_interface(repos, manifest):
    for backend, repo in repos.items():
        config = parse_config(repo / "pipeline" / "config.pbtxt")
        assert (config.name, config.backend, config.platform) == ("pipeline", "python", "")
        assert config.max_batch_size > 0
        inputs = {t.name: (dtype_name(t.data_type), list(t.dims), t.optional) for t in config.input}
        assert inputs == PIPELINE_INPUTS
        outputs = {t.name: (dtype_name(t.data_type), list(t.dims)) for t in config.output}
        assert outputs == {"text": ("TYPE_STRING", [1]), "token_ids": ("TYPE_INT64", [-1])}
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params["prefill_model"] == "prefill" and params["decode_model"] == "decode"
        assert json.loads(params["prefill_models"]) == {str(KEEP): "prefill"}
        assert params["default_keep"] == str(KEEP)
        assert params["max_new_tokens"] == "8"
        text_max = next(
            d["max"] for d in manifest["graphs"]["prefill"]["dynamic_dims"] if d["name"] == "text_len"
        )
        assert int(params["text_len_max"]) == text_max
        decode = {d["name"]: d["max"] for d in manifest["graphs"]["decode"]["dynamic_dims"]}
        assert "past_len_max" not in params
        assert int(params["past_len_l1_max"]) == decode["past_len_l1"]
        assert int(params["past_len_l2_max"]) == decode["past_len_l2"]
        if backend == "tensorrt":
            assert config.max_batch_size == 4


def test_pipeline_max_batch_one_turns_batching_across_requests_off(export, tmp_path, manifest):
    """``--pipeline-max-batch 1``: both pipeline models take one row per execution (the dynamic batcher
    then hands each execute one request); the default is the profile's max batch; negative is refused."""
    profile_batch = next(
        d["max"] for d in manifest["graphs"]["prefill"]["dynamic_dims"] if d["name"] == "batch"
    )
    assert profile_batch > 1  # else the two repositories below could not differ
    for flag, want in (("0", profile_batch), ("1", 1)):
        repo = tmp_path / f"r{flag}"
        deploy.run_triton(cli_args("--from", str(export), "--repo", str(repo), "--pipeline-max-batch", flag))
        for model in ("pipeline", "pipeline_stream"):
            text = (repo / model / "config.pbtxt").read_text()
            assert parse_config(repo / model / "config.pbtxt").max_batch_size == want, (model, flag)
            assert ("Batching: off" in text) == (want == 1)
        # the graph models keep the profile's batch: only the pipeline stops grouping requests
        assert parse_config(repo / "prefill" / "config.pbtxt").max_batch_size == profile_batch
        readme = (repo / "README.md").read_text()
        assert ("Batching across requests is off" in readme) == (want == 1)
        assert (f"(at most {profile_batch} rows)" in readme) == (want > 1)
    with pytest.raises(UsageError, match="--pipeline-max-batch must be >= 0"):
        deploy.run_triton(
            cli_args("--from", str(export), "--repo", str(tmp_path / "r"), "--pipeline-max-batch", "-1")
        )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("mode", "prefill", "decode"), [("decode-packed", "1", "0"), ("shared", "1", "1"), ("packed", "0", "0")]
)
def test_weights_mode_sets_which_graph_models_map_the_shared_file(export, tmp_path, mode, prefill, decode):
    """``--weights``: the python backend's graph models map the one weights file (``share_weights``
    "1", pre-packing off) or load and pre-pack their own copy ("0"); decode-packed (the default) pre-packs
    the decode model only, whose batched steps pre-packing makes cheap."""
    repo = tmp_path / "r"
    deploy.run_triton(cli_args("--from", str(export), "--repo", str(repo), "--weights", mode))
    for model, want in (("prefill", prefill), ("decode", decode)):
        params = parse_config(repo / model / "config.pbtxt").parameters
        assert params["share_weights"].string_value == want, (mode, model)
    assert f"(`--weights {mode}`)" in (repo / "README.md").read_text()
    if mode == "decode-packed":
        default = tmp_path / "default"
        deploy.run_triton(cli_args("--from", str(export), "--repo", str(default)))
        assert (default / "decode" / "config.pbtxt").read_text() == (
            repo / "decode" / "config.pbtxt"
        ).read_text()
        with pytest.raises(UsageError, match="--weights must be one of decode-packed, shared, packed"):
            deploy.write_repository(export, tmp_path / "bad", "python", 8, weights="once")
        assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------- layout
MODEL_FILES = {  # the export's weights (weights.onnx.data) beside each graph: it refers to them by that name
    "python": {"model.py", "model.onnx", "weights.onnx.data"},
    "onnxruntime": {"model.onnx", "weights.onnx.data"},
    "tensorrt": {"model.plan"},
}


@pytest.mark.parametrize("backend", deploy.BACKENDS)
def test_repository_layout(repos, export, backend):
    """Pure file-layout check (for tensorrt the copied 'engines' are the fake files above)."""
    repo = repos[backend]
    models = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert models == ["decode", "pipeline", "pipeline_stream", "prefill"]  # every directory is a model
    for graph in ("prefill", "decode"):
        assert (repo / graph / "config.pbtxt").is_file()
        assert {p.name for p in (repo / graph / "1").iterdir()} == MODEL_FILES[backend]
        if backend != "tensorrt":
            copied = (repo / graph / "1" / "model.onnx").read_bytes()
            assert (
                hashlib.sha256(copied).digest()
                == hashlib.sha256((export / f"{graph}.onnx").read_bytes()).digest()
            )
        if backend != "tensorrt":  # the export's one weights file, hard-linked (same filesystem here)
            weights = repo / graph / "1" / "weights.onnx.data"
            assert os.path.samefile(weights, export / "weights.onnx.data")
    if backend == "tensorrt":
        assert (repo / "prefill/1/model.plan").read_bytes().startswith(b"layout test only")
    pipeline = repo / "pipeline" / "1"
    assert {"model.py", "manifest.json", "processor"} <= {p.name for p in pipeline.iterdir()}
    assert (pipeline / "processor" / "tokenizer.json").is_file()
    readme = (repo / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "tritonclient" in readme
    marker = json.loads((repo / deploy.MARKER).read_text())
    assert marker["backend"] == backend and marker["models"]["pipeline"] == "pipeline"
    assert [lv["model"] for lv in marker["levels"]] == ["prefill"]
    if backend != "tensorrt":
        assert marker["linked"] == ["decode/1/weights.onnx.data", "prefill/1/weights.onnx.data"]


def test_external_data_is_copied_under_the_name_the_graph_uses(export, tmp_path):
    import onnx
    import onnxruntime as ort

    source = tmp_path / "export"
    shutil.copytree(export, source)
    model = onnx.load(str(source / "decode.onnx"))
    onnx.save_model(
        model,
        str(source / "decode.onnx"),
        save_as_external_data=True,
        location="decode.onnx.data",
        size_threshold=1024,
    )
    deploy.write_repository(source, tmp_path / "repo", "onnxruntime")
    version = tmp_path / "repo" / "decode" / "1"
    assert {p.name for p in version.iterdir()} == {"model.onnx", "decode.onnx.data"}
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "input_ids"


def test_prefix_names_models_and_wires_the_pipeline(export, tmp_path):
    deploy.write_repository(export, tmp_path / "repo", "python", prefix="llava_")
    assert sorted(p.name for p in (tmp_path / "repo").iterdir() if p.is_dir()) == [
        "llava_decode",
        "llava_pipeline",
        "llava_pipeline_stream",
        "llava_prefill",
    ]
    for name in ("llava_pipeline", "llava_pipeline_stream"):
        config = parse_config(tmp_path / "repo" / name / "config.pbtxt")
        assert config.name == name
        assert config.parameters["decode_model"].string_value == "llava_decode"


# ------------------------------------------------------------------------------ several keep levels
LEVEL_KEEPS = (
    8,
    16,
    32,
)  # `llava --keep 8,16,32`: prefill_k8 (the default), prefill_k16, prefill_k32, one decode


@pytest.fixture(scope="module")
def levels_export(cli_export) -> Path:
    """``python -m star_export llava --keep 8,16,32`` once per test session (shared with the C++, levels,
    eval and TensorRT-parity tests: same name and arguments)."""
    return cli_export("llava-levels", "--keep", ",".join(map(str, LEVEL_KEEPS)))


@pytest.fixture(scope="module")
def levels_manifest(levels_export) -> dict:
    return json.loads((levels_export / "manifest.json").read_text())


@pytest.fixture(scope="module")
def level_repos(levels_export, tmp_path_factory) -> dict[str, Path]:
    return repositories(levels_export, tmp_path_factory.mktemp("level-repos"))


@pytest.mark.parametrize("backend", deploy.BACKENDS)
def test_several_levels_one_prefill_model_each_and_one_decode(
    level_repos, levels_manifest, levels_export, backend
):
    repo = level_repos[backend]
    models = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert models == ["decode", "pipeline", "pipeline_stream", "prefill_k16", "prefill_k32", "prefill_k8"]
    for graph in graph_names(levels_manifest):
        config = parse_config(repo / graph / "config.pbtxt")
        g = levels_manifest["graphs"][graph]
        assert config.name == graph
        assert served_io(config.input) == expected_io(g["inputs"])
        assert served_io(config.output) == expected_io(g["outputs"])
        assert {p.name for p in (repo / graph / "1").iterdir()} == MODEL_FILES[backend]
        if backend == "tensorrt":  # the fake "engine" recorded for this graph
            assert (repo / graph / "1" / "model.plan").read_bytes().startswith(b"layout test only")
        else:
            copied = (repo / graph / "1" / "model.onnx").read_bytes()
            assert copied == (levels_export / f"{graph}.onnx").read_bytes()
            assert os.path.samefile(
                repo / graph / "1" / "weights.onnx.data", levels_export / "weights.onnx.data"
            )
    decode = parse_config(repo / "decode" / "config.pbtxt")
    dims = {e.name: list(e.dims) for e in decode.input}
    assert dims["attention_mask_l1"] == [-1] and dims["past.0.key"] == [2, -1, 16]  # past_len_l1, dynamic
    assert "past_len_l1 " in (repo / "decode" / "config.pbtxt").read_text()  # the ranges, as comments
    pipeline = parse_config(repo / "pipeline" / "config.pbtxt")
    inputs = {t.name: (dtype_name(t.data_type), list(t.dims), t.optional) for t in pipeline.input}
    assert inputs == PIPELINE_INPUTS
    params = {k: v.string_value for k, v in pipeline.parameters.items()}
    assert json.loads(params["prefill_models"]) == {
        "8": "prefill_k8",
        "16": "prefill_k16",
        "32": "prefill_k32",
    }
    assert (params["default_keep"], params["prefill_model"]) == ("8", "prefill_k8")
    decode_max = {d["name"]: d["max"] for d in levels_manifest["graphs"]["decode"]["dynamic_dims"]}
    if backend != "tensorrt":
        assert int(params["past_len_l1_max"]) == decode_max["past_len_l1"]
        assert int(params["past_len_l2_max"]) == decode_max["past_len_l2"]
    marker = json.loads((repo / deploy.MARKER).read_text())
    assert [(lv["keep2"], lv["model"]) for lv in marker["levels"]] == [
        (8, "prefill_k8"),
        (16, "prefill_k16"),
        (32, "prefill_k32"),
    ]
    readme = (repo / "README.md").read_text()
    assert "## Keep levels" in readme and 'InferInput("keep"' in readme and "prefill_k16" in readme


def test_several_levels_tensorrt_repository_takes_each_levels_engine(level_repos, tmp_path, levels_export):
    repo = level_repos["tensorrt"]
    for graph in ("prefill_k8", "prefill_k16", "decode"):
        text = (repo / graph / "config.pbtxt").read_text()
        assert f"FAKE-{graph}-not-a-tensorrt-engine.plan" in text and "Optimization profile 0" in text
        assert parse_config(repo / graph / "config.pbtxt").max_batch_size == 4
    source = with_fake_engines(levels_export, tmp_path / "export")
    manifest = json.loads((source / "manifest.json").read_text())
    del manifest["engines"]["prefill_k16"]
    (source / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="no TensorRT engine for prefill_k16;"):
        deploy.write_repository(source, tmp_path / "repo", "tensorrt")


def test_several_levels_prefix_and_copies_without_hard_links(levels_export, tmp_path, monkeypatch):
    import star_export.deploy.files as files

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(files.os, "link", no_links)
    result = deploy.write_repository(levels_export, tmp_path / "repo", "onnxruntime", prefix="llava_")
    repo = tmp_path / "repo"
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == [
        "llava_decode",
        "llava_pipeline",
        "llava_pipeline_stream",
        "llava_prefill_k16",
        "llava_prefill_k32",
        "llava_prefill_k8",
    ]
    params = parse_config(repo / "llava_pipeline" / "config.pbtxt").parameters
    assert json.loads(params["prefill_models"].string_value) == {
        "8": "llava_prefill_k8",
        "16": "llava_prefill_k16",
        "32": "llava_prefill_k32",
    }
    assert params["decode_model"].string_value == "llava_decode"
    assert result.linked == []
    weights = repo / "llava_prefill_k16" / "1" / "weights.onnx.data"
    assert not os.path.samefile(weights, levels_export / "weights.onnx.data")
    assert weights.read_bytes() == (levels_export / "weights.onnx.data").read_bytes()


def test_several_levels_max_new_tokens_fits_every_level(levels_export, levels_manifest, tmp_path):
    """The default answer length must fit the tightest level at the shortest prompt
    (contract.max_new_tokens: the tighter of the two past lengths)."""
    from star_export.contract import max_new_tokens

    dims = {d["name"]: d for d in levels_manifest["graphs"]["decode"]["dynamic_dims"]}
    allowed = min(
        max_new_tokens(dims, 2, lv["span1"], lv["span2"]) for lv in levels_manifest["star"]["levels"]
    )
    deploy.write_repository(levels_export, tmp_path / "ok", "python", allowed)
    with pytest.raises(UsageError) as e:
        deploy.write_repository(levels_export, tmp_path / "r", "python", allowed + 1)
    assert f"allows at most {allowed} new tokens at keep" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------- errors
def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    deploy.add_triton_arguments(parser)
    return parser.parse_args(argv)


def test_usage_errors_are_one_line(export, tmp_path):
    cases = [
        (cli_args("--from", str(tmp_path / "nothing"), "--repo", str(tmp_path / "r")), "no such directory"),
        (cli_args("--from", str(tmp_path), "--repo", str(tmp_path / "r")), "no manifest.json"),
    ]
    afile = tmp_path / "a_file"
    afile.write_text("x")
    cases.append((cli_args("--from", str(export), "--repo", str(afile)), "exists and is not a directory"))
    cases.append(
        (
            cli_args("--from", str(export), "--repo", str(tmp_path / "r"), "--backend", "tensorrt"),
            "no TensorRT engine",
        )
    )
    cases.append((cli_args("--from", str(export)), "--repo"))
    cases.append(
        (
            cli_args("--from", str(export), "--repo", str(tmp_path / "r"), "--max-new-tokens", "100000"),
            "at most",
        )
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    cases.append((cli_args("--from", str(export), "--repo", str(foreign)), "not written by star_export"))
    for args, needle in cases:
        with pytest.raises(UsageError) as e:
            deploy.run_triton(args)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert (foreign / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "r").exists()


def test_rewrite_replaces_atomically_and_failures_leave_nothing(export, tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    assert deploy.run_triton(cli_args("--from", str(export), "--repo", str(repo))) == 0
    assert "tritonserver --model-repository" in capsys.readouterr().out
    (repo / "prefill" / "stale.txt").write_text("old")
    deploy.write_repository(export, repo, "onnxruntime")
    assert not (repo / "prefill" / "stale.txt").exists()
    assert parse_config(repo / "prefill" / "config.pbtxt").platform == "onnxruntime_onnx"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(deploy, "_write_pipeline", boom)
    with pytest.raises(RuntimeError):
        deploy.write_repository(export, repo, "python")
    assert parse_config(repo / "prefill" / "config.pbtxt").platform == "onnxruntime_onnx"  # untouched
    with pytest.raises(RuntimeError):
        deploy.write_repository(export, tmp_path / "new", "python")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging leftovers


# ---------------------------------------------------------------------------------------- server
free_port = triton_server.free_port


def stub_bin(tmp_path_factory) -> Path:
    """The bin/ whose python3 the Python backend stub uses: numpy < 2 first, then this venv
    (:func:`star_export.deploy.server.stub_bin`, the code ``python -m star_export serve`` runs)."""
    try:
        triton_server.stub_site()
    except MissingComponent as e:
        unavailable(str(e))
    return triton_server.stub_bin(tmp_path_factory.mktemp("stub"))  # a failing probe fails the test


class Server(triton_server.TritonServer):
    """tritonserver from the nvidia-pytriton wheel (the package's set-up, as ``serve`` runs it), on
    loopback, on free ports; missing pieces skip locally and fail in CI."""

    def __init__(self, repo: Path, work: Path, stub: Path):
        try:
            install = triton_server.find_tritonserver()
        except MissingComponent as e:
            unavailable(str(e))
        super().__init__(repo, work, stub, install)

    def start(self, timeout: float = 150.0) -> None:
        for _attempt in range(2):  # a port taken between free_port() and bind: retry once
            try:
                super().start({k: free_port() for k in ("http", "grpc", "metrics")}, timeout)
                return
            except triton_server.ServerError as e:
                if e.kind == "ports":
                    continue
                if e.kind == "libraries":
                    pytest.skip(str(e))
                pytest.fail(str(e))
        pytest.fail("tritonserver: no free ports after 2 attempts")


@contextlib.contextmanager
def serving(export: Path, tmp_path_factory, name: str, pipeline_instances: int = 2, **settings):
    """A real tritonserver on the ``--backend python`` repository of ``export``, stopped on exit;
    ``settings``: more of write_repository's (pipeline_stream only where asked: stream=True)."""
    stub = stub_bin(tmp_path_factory)
    work = tmp_path_factory.mktemp(name)
    repo = work / "model_repository"
    settings = {"intra_op_threads": 1, "stream": False} | settings
    deploy.write_repository(
        export, repo, "python", MAX_NEW, pipeline_instances=pipeline_instances, **settings
    )
    srv = Server(repo, work, stub)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    with serving(export, tmp_path_factory, "triton") as srv:
        yield srv


@pytest.fixture(scope="module")
def local(export, manifest):
    """The reference: star_export's own pre-processing and generate() over onnxruntime."""
    from star_export.geometry import Geometry
    from star_export.preprocess import Preprocessor
    from star_export.runtime import GenerationConfig, OnnxruntimeBackend, generate
    from star_export.star import StarConfig

    pre = Preprocessor.from_dir(export / "processor")
    backend = OnnxruntimeBackend(export / "prefill.onnx", export / "decode.onnx", threads=1)
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    star = manifest["star"]
    cfg = StarConfig(keep2=star["keep2"], keep1=star["keep1"], layer=star["layer_K"])

    def run(images: list[Path], prompts: list[str], max_new: int = MAX_NEW, stops=()) -> list[list[int]]:
        feeds = pre.encode(images, prompts)
        gen = GenerationConfig(
            max_new_tokens=max_new,
            stop_token_ids=(pre.eos_token_id, *stops),
            pad_token_id=pre.pad_token_id,
        )
        return generate(backend, feeds, geo, cfg, gen).tokens

    run.pre, run.backend = pre, backend
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    noise.save(root / "noise.png")
    y, x = np.mgrid[0:336, 0:336]
    gradient = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(gradient).save(root / "gradient.jpg", quality=90)
    rgba = rng.integers(0, 256, (100, 200, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
    return [root / "noise.png", root / "gradient.jpg", root / "alpha.png"]


PROMPTS = [
    "What is in the image?",
    "Describe the colours you can see in this picture, please.",
    "Count the windows.",
]


def pipeline_inputs(module, images: list[Path], prompts: list[str], max_new=None, stops=None, keep=None):
    rows = len(prompts)
    data = {
        "image": (np.array([[p.read_bytes()] for p in images], dtype=np.object_), "BYTES"),
        "prompt": (np.array([[t.encode()] for t in prompts], dtype=np.object_), "BYTES"),
    }
    if max_new is not None:
        data["max_new_tokens"] = (np.full((rows, 1), max_new, dtype=np.int32), "INT32")
    if stops is not None:
        data["stop_token_ids"] = (np.array([stops] * rows, dtype=np.int32), "INT32")
    if keep is not None:  # one value, or one per row
        values = [keep] * rows if isinstance(keep, int) else list(keep)
        data["keep"] = (np.array(values, dtype=np.int32).reshape(rows, 1), "INT32")
    inputs = []
    for name, (array, dtype) in data.items():
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def answer(result) -> tuple[list[list[int]], list[str]]:
    ids = result.as_numpy("token_ids")
    tokens = [[int(t) for t in row if t >= 0] for row in ids]
    return tokens, [t[0].decode() for t in result.as_numpy("text")]


def http_client(server):
    import tritonclient.http as httpclient

    return httpclient, httpclient.InferenceServerClient(f"127.0.0.1:{server.ports['http']}")


def grpc_client(server):
    import tritonclient.grpc as grpcclient

    return grpcclient, grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports['grpc']}")


@pytest.fixture
def http(server):
    module, client = http_client(server)
    yield module, client
    client.close()


@pytest.fixture
def grpc(server):
    module, client = grpc_client(server)
    yield module, client
    client.close()


def test_server_serves_the_configs_as_generated(grpc, manifest):
    _, client = grpc
    for graph in ("prefill", "decode"):
        config = client.get_model_config(graph).config
        assert config.max_batch_size == batch_max(manifest, graph)
        assert served_io(config.input) == expected_io(manifest["graphs"][graph]["inputs"])
        assert served_io(config.output) == expected_io(manifest["graphs"][graph]["outputs"])
    assert client.is_model_ready("pipeline")


def test_http_answer_equals_local_generate(http, local, images):
    module, client = http
    result = client.infer("pipeline", pipeline_inputs(module, images[:1], PROMPTS[:1]))
    tokens, texts = answer(result)
    assert tokens == local(images[:1], PROMPTS[:1])
    assert len(tokens[0]) == MAX_NEW  # the config's default limit (no EOS from random weights here)
    assert texts == [local.pre.decode(tokens[0])]


def test_grpc_batch_with_left_padding_equals_local_generate(grpc, local, images):
    module, client = grpc
    rows, prompts = images[1:3], PROMPTS[1:3]  # different prompt lengths: the shorter row is left-padded
    result = client.infer("pipeline", pipeline_inputs(module, rows, prompts, max_new=4))
    tokens, texts = answer(result)
    assert tokens == local(rows, prompts, max_new=4)
    assert texts == [local.pre.decode(t) for t in tokens]


def test_concurrent_http_and_grpc_requests(server, local, images):
    cases = [(images[i % 3], PROMPTS[(i + 1) % 3]) for i in range(6)]
    expected = [local([img], [prompt]) for img, prompt in cases]

    def ask(i: int):
        module, client = (http_client if i % 2 else grpc_client)(server)
        try:
            start = time.perf_counter()
            result = client.infer("pipeline", pipeline_inputs(module, [cases[i][0]], [cases[i][1]]))
            return answer(result)[0], time.perf_counter() - start
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(ask, range(6)))
    assert [r[0] for r in results] == expected
    assert all(r[1] < 60 for r in results)  # answered, not stuck behind a dead stub


def test_max_new_tokens_and_stop_tokens(http, local, images):
    module, client = http
    reference = local(images[:1], PROMPTS[:1])[0]
    stop_at = next(i for i in range(1, len(reference)) if reference[i] not in reference[:i])
    result = client.infer(
        "pipeline", pipeline_inputs(module, images[:1], PROMPTS[:1], stops=[reference[stop_at], -1])
    )
    assert answer(result)[0] == [reference[: stop_at + 1]]
    assert [reference[: stop_at + 1]] == local(images[:1], PROMPTS[:1], stops=(reference[stop_at],))
    result = client.infer("pipeline", pipeline_inputs(module, images[:1], PROMPTS[:1], max_new=2))
    assert answer(result)[0] == [reference[:2]]


def test_bad_requests_get_an_error_and_the_server_keeps_serving(grpc, local, images, tmp_path):
    from tritonclient.utils import InferenceServerException

    module, client = grpc
    with pytest.raises(InferenceServerException, match="image placeholder"):
        client.infer("pipeline", pipeline_inputs(module, images[:1], ["look: <image>"]))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(InferenceServerException, match="not a readable image"):
        client.infer("pipeline", pipeline_inputs(module, [junk], PROMPTS[:1]))
    with pytest.raises(InferenceServerException, match="exceeds the exported decode profile"):
        client.infer("pipeline", pipeline_inputs(module, images[:1], PROMPTS[:1], max_new=100000))
    result = client.infer("pipeline", pipeline_inputs(module, images[:1], PROMPTS[:1], max_new=2))
    assert answer(result)[0] == [local(images[:1], PROMPTS[:1], max_new=2)[0]]


def test_prefill_model_answers_like_onnxruntime(http, local, images):
    module, client = http
    feeds = local.pre.encode(images[:2], PROMPTS[:2])
    inputs = []
    for name in ("pixel_values", "input_ids", "attention_mask"):
        tensor = module.InferInput(
            name, list(feeds[name].shape), "FP32" if name == "pixel_values" else "INT64"
        )
        tensor.set_data_from_numpy(feeds[name])
        inputs.append(tensor)
    result = client.infer("prefill", inputs)
    expected = local.backend.prefill(feeds)
    np.testing.assert_array_equal(result.as_numpy("stage2_keep_idx"), expected["stage2_keep_idx"])
    np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        result.as_numpy("present.3.value"), expected["present.3.value"], rtol=1e-5, atol=1e-6
    )


OTHER_FAMILIES = {  # recipe -> the pixel_values of a batch of two images, as the export lays them out
    "llava-next-tiny": (5, 3, 112, 112),
    "qwen2-vl-tiny": (196, 384),
    "qwen3-vl-tiny": (196, 384),
    "gemma3-tiny": (3, 64, 64),
    "qwen2.5-vl-tiny": (196, 384),
}


def family_prefix(recipe: str) -> str:
    return recipe.replace(".", "_") + "_"  # qwen2.5-vl-tiny -> qwen2_5-vl-tiny_pipeline, ...


SHARED_SERVER = {  # model name prefix -> the shared export it serves
    **{family_prefix(r): (f"{r}-keep8", "--recipe", r, "--keep", "8") for r in OTHER_FAMILIES},
    "fp16_": ("llava-keep16-fp16", "--keep", "16", "--dtype", "fp16"),  # shared with test_half
    "levels_": ("llava-levels", "--keep", ",".join(map(str, LEVEL_KEEPS))),
    "range_": ("llava-range", "--keep", "8:16:32"),  # shared with tests/test_keep_range.py
}


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory, cli_export):
    """ONE tritonserver for the five other families, an fp16 export, keep levels and a keep range:
    each export's ``--backend python`` repository is written under its own model name prefix
    (``triton --prefix``) and its models moved into one repository, so one server start and stop
    serves all eight (each took some 10 s of start, stop and waiting when served apiece).
    Yields (server, {prefix: export})."""
    stub = stub_bin(tmp_path_factory)
    work = tmp_path_factory.mktemp("shared")
    repo = work / "model_repository"
    repo.mkdir()
    exports = {}
    for prefix, args in SHARED_SERVER.items():
        exports[prefix] = cli_export(*args)
        part = work / prefix
        deploy.write_repository(
            exports[prefix], part, "python", MAX_NEW, pipeline_instances=1, intra_op_threads=1, stream=False,
            prefix=prefix,
        )  # fmt: skip
        for model in part.iterdir():
            if model.is_dir():
                model.rename(repo / model.name)
    srv = Server(repo, work, stub)
    try:
        srv.start()
        yield srv, exports
    finally:
        srv.stop()


@pytest.mark.parametrize(("recipe", "pixel_shape"), list(OTHER_FAMILIES.items()))
def test_other_architectures_pipeline_on_a_real_server_equals_local_generate(
    shared_server, images, recipe, pixel_shape
):
    """LLaVA-NeXT (anyres 2x2 grid, row newlines), Qwen2-VL, Qwen2.5-VL, Qwen3-VL (static resolution,
    patches) and Gemma 3 exports served by one tritonserver: each pipeline's own pre-processing lays
    every image out as its export expects, and its answers equal the local onnxruntime generate token
    for token (a batch of images with different aspect ratios)."""
    from star_export.geometry import Geometry
    from star_export.preprocess import Preprocessor
    from star_export.runtime import GenerationConfig, OnnxruntimeBackend, generate
    from star_export.star import StarConfig

    srv, exports = shared_server
    export = exports[family_prefix(recipe)]
    manifest = json.loads((export / "manifest.json").read_text())
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    star = manifest["star"]
    cfg = StarConfig(keep2=star["keep2"], keep1=star["keep1"], layer=star["layer_K"])
    pre = Preprocessor.from_dir(export / "processor", geometry=geo)
    rows, prompts = [images[0], images[2]], PROMPTS[:2]  # 400x300 and 200x100 images
    feeds = pre.encode(rows, prompts)
    assert feeds["pixel_values"].shape == (2, *pixel_shape)
    gen = GenerationConfig(
        max_new_tokens=4, stop_token_ids=(pre.eos_token_id,), pad_token_id=pre.pad_token_id
    )
    backend = OnnxruntimeBackend(export / "prefill.onnx", export / "decode.onnx", threads=1)
    expected = generate(backend, feeds, geo, cfg, gen)

    module, client = http_client(srv)
    try:
        result = client.infer(
            f"{family_prefix(recipe)}pipeline", pipeline_inputs(module, rows, prompts, max_new=4)
        )
    finally:
        client.close()
    tokens, texts = answer(result)
    assert tokens == expected.tokens
    assert texts == [pre.decode(t) for t in tokens]


def test_an_fp16_export_on_a_real_server_equals_load_export(shared_server, images):
    """An fp16 export served by tritonserver: the pipeline casts its float32 pixels to the graphs'
    declared fp16 (``star_encoding.cast_inputs``, as every runtime) and answers as
    ``load_export(dir).generate`` does, token for token (issue #20)."""
    from star_export.session import load_export

    srv, exports = shared_server
    export = exports["fp16_"]
    rows, prompts = images[:2], PROMPTS[:2]
    expected = load_export(export).generate(rows, prompts, max_new_tokens=4)
    module, client = http_client(srv)
    try:
        assert client.get_model_config("fp16_prefill")["input"][0]["data_type"] == "TYPE_FP16"
        result = client.infer("fp16_pipeline", pipeline_inputs(module, rows, prompts, max_new=4))
    finally:
        client.close()
    tokens, texts = answer(result)
    assert tokens == expected.result.tokens and texts == expected.answers


# ------------------------------------------------------------------- several keep levels, one server
@pytest.fixture(scope="module")
def levels_server(shared_server, levels_export):
    """The shared server, whose ``levels_`` models serve ``levels_export``."""
    srv, exports = shared_server
    assert exports["levels_"] == levels_export
    return srv


def _executions(client, model: str) -> int:
    """How many times tritonserver ran ``model`` (its statistics), e.g. a prefill model called by BLS."""
    stats = client.get_inference_statistics(model)["model_stats"]
    return int(stats[0]["inference_count"])


def test_one_server_answers_every_keep_level_like_load_export(levels_server, levels_export, images):
    """One tritonserver run, requests at keep 8, keep 16 and no keep (the default, 8): each answer equals
    ``load_export(dir).generate(..., keep=k)`` token for token, and each ran that level's prefill model
    (the server's statistics) and the one decode model."""
    from star_export.session import load_export

    pipe = load_export(levels_export)
    module, client = http_client(levels_server)
    try:
        rows, prompts = images[:2], PROMPTS[:2]  # two rows, different lengths: one is left-padded
        answers = {}
        for keep, model in (
            (16, "levels_prefill_k16"),
            (8, "levels_prefill_k8"),
            (None, "levels_prefill_k8"),
        ):
            before = {m: _executions(client, m) for m in ("levels_prefill_k8", "levels_prefill_k16")}
            result = client.infer(
                "levels_pipeline", pipeline_inputs(module, rows, prompts, max_new=MAX_NEW, keep=keep)
            )
            tokens, texts = answer(result)
            expected = pipe.generate(rows, prompts, max_new_tokens=MAX_NEW, keep=keep)
            assert expected.cfg.keep2 == (keep or 8)
            assert tokens == expected.result.tokens, keep
            assert texts == expected.answers
            after = {m: _executions(client, m) for m in ("levels_prefill_k8", "levels_prefill_k16")}
            assert {m: after[m] - before[m] for m in after} == {
                m: 2 if m == model else 0 for m in after
            }  # batch 2: two inferences of that level's prefill model, none of the other's
            answers[keep] = tokens
        assert answers[None] == answers[8]
        assert _executions(client, "levels_decode") > 0
    finally:
        client.close()


def test_keep_errors_name_the_levels_and_the_server_keeps_serving(levels_server, levels_export, images):
    from tritonclient.utils import InferenceServerException

    from star_export.session import load_export

    module, client = grpc_client(levels_server)
    try:
        with pytest.raises(
            InferenceServerException, match=r"keep 12: this export holds keep levels 8, 16, 32 \(default 8\)"
        ):
            client.infer("levels_pipeline", pipeline_inputs(module, images[:1], PROMPTS[:1], keep=12))
        with pytest.raises(InferenceServerException, match="the same for every row of a request"):
            client.infer("levels_pipeline", pipeline_inputs(module, images[:2], PROMPTS[:2], keep=[8, 16]))
        with pytest.raises(InferenceServerException, match="exceeds the exported decode profile"):
            client.infer(
                "levels_pipeline", pipeline_inputs(module, images[:1], PROMPTS[:1], max_new=100000, keep=16)
            )
        result = client.infer(
            "levels_pipeline", pipeline_inputs(module, images[2:3], PROMPTS[2:3], max_new=3, keep=16)
        )
        expected = load_export(levels_export).generate(images[2:3], PROMPTS[2:3], max_new_tokens=3, keep=16)
        assert answer(result)[0] == expected.result.tokens
    finally:
        client.close()


# ------------------------------------------------------------------------- a keep range, one server
def test_one_server_answers_any_keep_of_a_range(shared_server, images):
    """``llava --keep 8:16:32`` served by tritonserver (issue #24): ONE prefill model answers keep 8,
    20 and 32, each token for token as ``load_export(dir).generate(..., keep=k)`` (which equals the
    constant-K export of that keep: tests/test_keep_range.py); a keep outside the range names it."""
    from tritonclient.utils import InferenceServerException

    from star_export.session import load_export

    srv, exports = shared_server
    ranged = exports["range_"]
    pipe = load_export(ranged)
    rows, prompts = images[:2], PROMPTS[:2]
    module, client = http_client(srv)
    try:
        for keep in (8, 20, 32, None):
            before = _executions(client, "range_prefill")
            inputs = pipeline_inputs(module, rows, prompts, max_new=MAX_NEW, keep=keep)
            tokens, texts = answer(client.infer("range_pipeline", inputs))
            expected = pipe.generate(rows, prompts, max_new_tokens=MAX_NEW, keep=keep)
            assert expected.cfg.keep2 == (keep or 16) and expected.cfg.keep1 == 2 * expected.cfg.keep2
            assert tokens == expected.result.tokens and texts == expected.answers, keep
            assert _executions(client, "range_prefill") - before == 2  # the one prefill model, batch 2
        with pytest.raises(InferenceServerException, match=r"keep 40: this export holds keep levels 8:32"):
            client.infer("range_pipeline", pipeline_inputs(module, rows[:1], prompts[:1], keep=40))
    finally:
        client.close()
