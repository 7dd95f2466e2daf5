"""Shared fixtures: tiny LLaVA checkpoints saved to disk (MHA and GQA) and loaded back."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import sys
from pathlib import Path

import pytest

from star_export.load import load, materialise
from star_export.recipes import load_recipe

MHA = {"text_config": {"num_key_value_heads": 4}}
GQA = {"text_config": {"num_key_value_heads": 2}}
MISTRAL = {"text_config": {"model_type": "mistral", "sliding_window": None}}
QWEN2 = {"text_config": {"model_type": "qwen2"}}  # q/k/v projections with bias


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests materialise checkpoints in a temporary cache, never in the user's."""
    old = os.environ.get("STAR_EXPORT_CACHE")
    os.environ["STAR_EXPORT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("STAR_EXPORT_CACHE", None)
    else:
        os.environ["STAR_EXPORT_CACHE"] = old


@pytest.fixture(scope="module")
def tool(request):
    """The script named by the test module's ``TOOL`` (a path under tools/) imported as a module,
    registered in sys.modules while the module's tests run (dataclasses look their module up there)."""
    path = Path(request.module.TOOL)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="session")
def recipe():
    return load_recipe("llava-tiny")


@pytest.fixture(scope="session")
def mha_dir(recipe, _isolated_cache):
    return materialise(recipe, MHA)


@pytest.fixture(scope="session")
def gqa_dir(recipe, _isolated_cache):
    return materialise(recipe, GQA)


@pytest.fixture(scope="session")
def mha(mha_dir):
    return load(mha_dir)


@pytest.fixture(scope="session")
def gqa(gqa_dir):
    return load(gqa_dir)


@pytest.fixture(scope="session")
def mistral(recipe, _isolated_cache):
    return load(materialise(recipe, MISTRAL))


@pytest.fixture(scope="session")
def qwen2(recipe, _isolated_cache):
    return load(materialise(recipe, QWEN2))


# LLaVA-NeXT (anyres 2x2 grid, row newlines): a Vicuna/Llama decoder and a Mistral one
NEXT_MISTRAL = {"text_config": {"model_type": "mistral", "sliding_window": None}}


@pytest.fixture(scope="session")
def next_recipe():
    return load_recipe("llava-next-tiny")


@pytest.fixture(scope="session")
def next_dir(next_recipe, _isolated_cache):
    return materialise(next_recipe)


@pytest.fixture(scope="session")
def next_llama(next_dir):
    return load(next_dir)


@pytest.fixture(scope="session")
def next_mistral(next_recipe, _isolated_cache):
    return load(materialise(next_recipe, NEXT_MISTRAL))


@pytest.fixture(scope="session")
def cli_export(_isolated_cache, tmp_path_factory):
    """``python -m star_export llava ARGS --skip-validation``, once per name and test run.

    Under pytest-xdist (``-n 2``) the workers share one export directory (the run's base temp, above
    each worker's own) and take a file lock per name, so an export several test modules use is made
    once, by whichever worker needs it first; a name must always come with the same arguments."""
    from filelock import FileLock

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker else base) / "shared-exports"
    root.mkdir(exist_ok=True)

    def run(name: str, *args: str) -> Path:
        out = root / name
        with FileLock(str(root / f"{name}.lock")):
            if not (out / "manifest.json").is_file():
                _export(out, args)
        return out

    def _export(out: Path, args: tuple[str, ...]) -> None:
        # In this process (the worker has torch, transformers and onnx imported already: a fresh
        # ``python -m star_export`` spent about 6 s importing them, for each of some 30 exports).
        from star_export.cli import main

        if not {"--recipe", "--model"} & set(args):  # the fast tests' model, not the shipped demo
            args = ("--recipe", "llava-tiny", *args)
        import torch

        sink = io.StringIO()
        # fork_rng: materialising a recipe seeds torch's global generator; the worker's stays as it was
        with torch.random.fork_rng(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            code = main(["llava", *args, "--skip-validation", "--out", str(out)])
        torch._dynamo.reset()  # the tracing caches of this export: nothing later reuses them
        assert code == 0, sink.getvalue()[-4000:]

    return run


def as_bf16_copy(export: Path, target: Path) -> Path:
    """A copy of an fp16 export declared bfloat16 throughout: the manifest, and every graph's inputs
    and outputs (edited in the ONNX files, weights untouched and shared by a hard link), so that the
    manifest checks on load see a consistent bf16 export. Only for refusals: the graphs do not run."""
    import onnx

    shutil.copytree(export, target, copy_function=os.link)
    path = target / "manifest.json"
    path.unlink()
    path.write_text((export / "manifest.json").read_text().replace('"float16"', '"bfloat16"'))
    for graph in target.glob("*.onnx"):
        model = onnx.load(graph, load_external_data=False)
        for value in (*model.graph.input, *model.graph.output):
            if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
                value.type.tensor_type.elem_type = onnx.TensorProto.BFLOAT16
        graph.unlink()
        onnx.save(model, graph)
    return target
