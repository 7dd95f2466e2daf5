"""examples/cpp: the tensors the C++ example binds are the manifest's, name for name and dtype for dtype.

TensorRT and CUDA headers are not obtainable on the development machines, so the example is
never compiled for real, linked or run here. What IS checked: the tensor table in main.cpp
against a fresh ``python -m star_export llava`` export, every name main.cpp passes to
set_shape/bind, the generated star_model.h, and ``g++ -fsyntax-only`` of main.cpp against the
STUB headers below (declarations of the TensorRT 10 / CUDA runtime subset the example calls,
transcribed from the TensorRT 10 API documentation). The stub proves the C++ is well-formed and
consistent with those declarations, not that it builds against the real headers.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from star_export import deploy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cpp"
MAIN = EXAMPLE / "main.cpp"
KEEP = 16
CPP_DTYPES = {"Float32": "float32", "Int64": "int64"}

STUB_NVINFER = """\
// STUB for a syntax check only: NOT TensorRT. Declarations of the TensorRT 10 runtime API subset
// used by examples/cpp/main.cpp, as documented for NvInferRuntime.h (TensorRT 10.x).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>
namespace nvinfer1 {
using AsciiChar = char;
class Dims64 {
 public:
  static constexpr int32_t MAX_DIMS{8};
  int32_t nbDims;
  int64_t d[MAX_DIMS];
};
using Dims = Dims64;
enum class DataType : int32_t { kFLOAT = 0, kHALF = 1, kINT8 = 2, kINT32 = 3, kBOOL = 4, kUINT8 = 5,
                                kFP8 = 6, kBF16 = 7, kINT64 = 8, kINT4 = 9 };
enum class TensorIOMode : int32_t { kNONE = 0, kINPUT = 1, kOUTPUT = 2 };
class ILogger {
 public:
  enum class Severity : int32_t { kINTERNAL_ERROR = 0, kERROR = 1, kWARNING = 2, kINFO = 3, kVERBOSE = 4 };
  virtual void log(Severity severity, AsciiChar const* msg) noexcept = 0;
  virtual ~ILogger() = default;
};
class IExecutionContext {
 public:
  virtual ~IExecutionContext() noexcept = default;
  bool setInputShape(char const* tensorName, Dims const& dims) noexcept;
  bool setTensorAddress(char const* tensorName, void* data) noexcept;
  bool allInputDimensionsSpecified() const noexcept;
  bool enqueueV3(cudaStream_t stream) noexcept;
};
class ICudaEngine {
 public:
  virtual ~ICudaEngine() noexcept = default;
  int32_t getNbIOTensors() const noexcept;
  char const* getIOTensorName(int32_t index) const noexcept;
  TensorIOMode getTensorIOMode(char const* tensorName) const noexcept;
  DataType getTensorDataType(char const* tensorName) const noexcept;
  IExecutionContext* createExecutionContext() noexcept;
};
class IRuntime {
 public:
  virtual ~IRuntime() noexcept = default;
  ICudaEngine* deserializeCudaEngine(void const* blob, std::size_t size) noexcept;
};
IRuntime* createInferRuntime(ILogger& logger) noexcept;
}  // namespace nvinfer1
"""

STUB_CUDA = """\
// STUB for a syntax check only: NOT the CUDA runtime. The subset examples/cpp/main.cpp calls.
#pragma once
#include <cstddef>
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
cudaError_t cudaMalloc(void** devPtr, size_t size);
cudaError_t cudaFree(void* devPtr);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind, cudaStream_t stream);
cudaError_t cudaStreamCreate(cudaStream_t* pStream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
const char* cudaGetErrorString(cudaError_t error);
"""


@pytest.fixture(scope="module")
def export(cli_export) -> Path:
    """``python -m star_export llava --keep 16`` once per test session (shared with the C++/Triton tests)."""
    return cli_export(f"llava-keep{KEEP}", "--keep", str(KEEP))


@pytest.fixture(scope="module")
def manifest(export) -> dict:
    return json.loads((export / "manifest.json").read_text())


def source() -> str:
    """main.cpp without comments (string literals kept)."""
    text = MAIN.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def table() -> list[tuple[str, str, str, str]]:
    """(graph, input|output, name pattern, dtype) rows between STAR_TENSORS_BEGIN / _END."""
    text = MAIN.read_text()
    body = text[text.index("// STAR_TENSORS_BEGIN") : text.index("// STAR_TENSORS_END")]
    rows = re.findall(r'\{Graph::k(\w+), Mode::k(\w+), "([^"]+)", DType::k(\w+)\}', body)
    assert rows, "no tensor table in main.cpp"
    return [(g.lower(), m.lower(), name, CPP_DTYPES[d]) for g, m, name, d in rows]


def expand(name: str, layers: int) -> list[str]:
    return [name.replace("{i}", str(i)) for i in range(layers)] if "{i}" in name else [name]


def test_tensor_table_is_exactly_the_manifest(manifest):
    layers = manifest["model"]["geometry"]["num_layers"]
    in_cpp = {(g, m, n, d) for g, m, pattern, d in table() for n in expand(pattern, layers)}
    in_manifest = {
        (graph, side[:-1], t["name"], t["dtype"])
        for graph in ("prefill", "decode")
        for side in ("inputs", "outputs")
        for t in manifest["graphs"][graph][side]
    }
    assert in_cpp == in_manifest, (sorted(in_cpp - in_manifest), sorted(in_manifest - in_cpp))


def test_every_name_main_binds_is_in_the_table_and_every_tensor_is_bound():
    code = source()
    calls = re.findall(r'\b(prefill|decode)\.(set_shape|bind)\((?:layer_name\()?"([^"]+)"', code)
    assert len(calls) == len(re.findall(r"\b(?:prefill|decode)\.(?:set_shape|bind)\(", code)), (
        "a set_shape/bind call whose tensor name is not a literal"
    )
    rows = {(g, n): m for g, m, n, _ in table()}
    for graph, call, name in calls:
        assert (graph, name) in rows, f"{graph}.{call}({name!r}) is not in the tensor table"
        if call == "set_shape":
            assert rows[graph, name] == "input", f"{graph}.set_shape on output {name}"
    bound = {(g, n) for g, c, n in calls if c == "bind"}
    shaped = {(g, n) for g, c, n in calls if c == "set_shape"}
    assert bound == set(rows), sorted(set(rows) - bound)
    assert shaped == {k for k, m in rows.items() if m == "input"}


def header_constants(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"constexpr int(?:32|64)_t (k\w+) = (-?\d+);", text)}


def test_generated_header_matches_the_manifest(export, manifest, tmp_path):
    path = deploy.write_cpp_header(export, tmp_path / "star_model.h")
    consts = header_constants(path.read_text())
    geo, star = manifest["model"]["geometry"], manifest["star"]
    dims = {d["name"]: d["max"] for g in manifest["graphs"].values() for d in g["dynamic_dims"]}
    assert consts == {
        "kNumLayers": geo["num_layers"],
        "kLayerK": star["layer_K"],
        "kNVisual": star["N"],
        "kKeep1": star["keep1"],
        "kKeep2": star["keep2"],
        "kImageSize": geo["image_size"],
        "kVocab": geo["vocab_size"],
        "kKvHeads": geo["num_kv_heads"],
        "kHeadDim": geo["head_dim"],
        "kImageTokenId": manifest["image_token_id"],
        "kMaxBatch": dims["batch"],
        "kMaxTextLen": dims["text_len"],
        "kMaxPastLen": dims["past_len"],
    }
    committed = header_constants((EXAMPLE / "star_model.h").read_text())
    assert set(committed) == set(consts)  # the committed header (default export) has every constant
    used = set(re.findall(r"star_model::(k\w+)", source())) | set(
        re.findall(r"using star_model::(k\w+)", source())
    )
    assert used <= set(consts)


def _with(manifest: dict, graph: str = "", tensor: str = "", shape: list | None = None, **geometry) -> dict:
    """A copy of ``manifest`` with one input shape and/or geometry fields replaced."""
    out = copy.deepcopy(manifest)
    out["model"]["geometry"].update(geometry)
    for t in out["graphs"][graph]["inputs"] if graph else ():
        if t["name"] == tensor:
            t["shape"] = shape
    return out


@pytest.mark.parametrize(
    "change, why",
    [
        (dict(graph="prefill", tensor="pixel_values", shape=["batch", 5, 3, 112, 112]), "pixel_values"),
        (dict(graph="prefill", tensor="pixel_values", shape=["batch", 64, 1176]), "pixel_values"),
        (dict(graph="prefill", tensor="pixel_values", shape=["batch", 3, 32, 48]), "pixel_values"),
        (dict(n_fixed=4), "4 fixed"),
        (dict(n_positions=8), "occupying 8 positions"),
        (dict(graph="decode", tensor="position_ids", shape=[3, "batch", 1]), "position_ids"),
    ],
)
def test_header_refuses_layouts_main_cpp_does_not_drive(manifest, change, why):
    """The refusal reads generic manifest fields (layout), never the model family."""
    from star_export.errors import UsageError

    assert deploy.cpp_header(manifest).startswith("// Generated by star_export")
    with pytest.raises(UsageError) as e:
        deploy.cpp_header(_with(manifest, **change))
    msg = str(e.value)
    assert msg.startswith("--cpp-header: examples/cpp drives LLaVA-1.5 exports") and "\n" not in msg
    assert why in msg, msg
    # the family name alone decides nothing: a layout main.cpp drives passes whatever "arch" says
    assert deploy.cpp_header(_with(manifest, arch="some_other_family")) == deploy.cpp_header(manifest)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
@pytest.mark.parametrize("header", ["committed", "generated"])
def test_main_cpp_is_well_formed_against_stub_headers(export, tmp_path, header):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "NvInferRuntime.h").write_text(STUB_NVINFER)
    (stubs / "cuda_runtime_api.h").write_text(STUB_CUDA)
    include = EXAMPLE
    if header == "generated":
        include = tmp_path / "generated"
        deploy.write_cpp_header(export, include / "star_model.h")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror"]
    proc = subprocess.run(
        [*cmd, f"-I{stubs}", f"-I{include}", str(MAIN)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_cmake_project_names_the_source_and_tensorrt():
    text = (EXAMPLE / "CMakeLists.txt").read_text()
    assert "add_executable(star_greedy main.cpp)" in text
    assert "nvinfer" in text and "CUDA::cudart" in text
