"""examples/cpp: the tensors the C++ example binds are the manifest's, name for name and dtype for dtype.

TensorRT and CUDA headers are not obtainable on the development machines, so the example is
never compiled against them, linked with them or run with an engine here. What IS checked: the
tensor table in main.cpp against fresh ``python -m star_export llava`` exports (one keep level, and
several: ``--keep 8,16,32``, every level's prefill graph), every name main.cpp passes to set_shape/bind,
the generated star_model.h (its keep levels and two past lengths), ``g++ -fsyntax-only`` of
main.cpp against the STUB headers below (declarations of the TensorRT 10 / CUDA runtime subset the
example calls, transcribed from the TensorRT 10 API documentation), and main.cpp's command line
(--keep) linked against STUB definitions that abort if called: the stubs prove the C++ is
well-formed and consistent with those declarations, not that it builds against the real headers.
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


STUB_DEFINITIONS = """\
// STUB definitions for a link test of main.cpp's command line only: every call aborts. NOT TensorRT.
#include <NvInferRuntime.h>
#include <cstdlib>
namespace nvinfer1 {
bool IExecutionContext::setInputShape(char const*, Dims const&) noexcept { std::abort(); }
bool IExecutionContext::setTensorAddress(char const*, void*) noexcept { std::abort(); }
bool IExecutionContext::allInputDimensionsSpecified() const noexcept { std::abort(); }
bool IExecutionContext::enqueueV3(cudaStream_t) noexcept { std::abort(); }
int32_t ICudaEngine::getNbIOTensors() const noexcept { std::abort(); }
char const* ICudaEngine::getIOTensorName(int32_t) const noexcept { std::abort(); }
TensorIOMode ICudaEngine::getTensorIOMode(char const*) const noexcept { std::abort(); }
DataType ICudaEngine::getTensorDataType(char const*) const noexcept { std::abort(); }
IExecutionContext* ICudaEngine::createExecutionContext() noexcept { std::abort(); }
ICudaEngine* IRuntime::deserializeCudaEngine(void const*, std::size_t) noexcept { std::abort(); }
IRuntime* createInferRuntime(ILogger&) noexcept { std::abort(); }
}  // namespace nvinfer1
cudaError_t cudaMalloc(void**, size_t) { std::abort(); }
cudaError_t cudaFree(void*) { std::abort(); }
cudaError_t cudaMemcpyAsync(void*, const void*, size_t, cudaMemcpyKind, cudaStream_t) { std::abort(); }
cudaError_t cudaStreamCreate(cudaStream_t*) { std::abort(); }
cudaError_t cudaStreamSynchronize(cudaStream_t) { std::abort(); }
cudaError_t cudaStreamDestroy(cudaStream_t) { std::abort(); }
const char* cudaGetErrorString(cudaError_t) { std::abort(); }
"""


@pytest.fixture(scope="module")
def export(cli_export) -> Path:
    """``python -m star_export llava --keep 16`` once per test session (shared with the C++/Triton tests)."""
    return cli_export(f"llava-keep{KEEP}", "--keep", str(KEEP))


@pytest.fixture(scope="module")
def levels_export(cli_export) -> Path:
    """``python -m star_export llava --keep 8,16,32``: three keep levels, once per test session (shared
    with the Triton, levels, eval and TensorRT-parity tests: same name and arguments)."""
    return cli_export("llava-levels", "--keep", "8,16,32")


@pytest.fixture(scope="module")
def manifest(export) -> dict:
    return json.loads((export / "manifest.json").read_text())


@pytest.fixture(scope="module")
def gemma_export(cli_export) -> Path:
    """gemma3-tiny at keep 8, whose graphs carry slot positions (shared with the Gemma 3, ties and
    Triton tests: same name and arguments)."""
    return cli_export("gemma3-tiny-keep8", "--recipe", "gemma3-tiny", "--keep", "8")


@pytest.fixture(scope="module", params=["one level", "two levels", "slot positions"])
def any_export(request) -> Path:
    names = {"one level": "export", "two levels": "levels_export", "slot positions": "gemma_export"}
    return request.getfixturevalue(names[request.param])


def slot_positions(manifest: dict) -> bool:
    return any(t["name"] == "past_positions_l1" for t in manifest["graphs"]["decode"]["inputs"])


def source() -> str:
    """main.cpp without comments (string literals kept)."""
    text = MAIN.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def table(block: str = "TENSORS") -> list[tuple[str, str, str, str]]:
    """(graph, input|output, name pattern, dtype) rows between STAR_TENSORS_BEGIN / _END (``block``
    "SLOT_POSITIONS": the rows main.cpp adds where star_model::kSlotPositions)."""
    text = MAIN.read_text()
    body = text[text.index(f"// STAR_{block}_BEGIN") : text.index(f"// STAR_{block}_END")]
    rows = re.findall(r'\{Graph::k(\w+), Mode::k(\w+), "([^"]+)", DType::k(\w+)\}', body)
    assert rows, "no tensor table in main.cpp"
    return [(g.lower(), m.lower(), name, CPP_DTYPES[d]) for g, m, name, d in rows]


def expand(name: str, layers: int) -> list[str]:
    return [name.replace("{i}", str(i)) for i in range(layers)] if "{i}" in name else [name]


def test_tensor_table_is_exactly_the_manifest(any_export):
    """The table's prefill rows are EVERY keep level's prefill graph (they differ in shapes only);
    its decode rows are the one decode graph."""
    manifest = json.loads((any_export / "manifest.json").read_text())
    layers = manifest["model"]["geometry"]["num_layers"]
    rows = table() + (table("SLOT_POSITIONS") if slot_positions(manifest) else [])
    in_cpp = {(g, m, n, d) for g, m, pattern, d in rows for n in expand(pattern, layers)}
    graphs = [(lv["graph"], "prefill") for lv in manifest["star"]["levels"]] + [("decode", "decode")]
    assert len(graphs) == len(manifest["graphs"])
    for graph, role in graphs:
        in_manifest = {
            (role, side[:-1], t["name"], t["dtype"])
            for side in ("inputs", "outputs")
            for t in manifest["graphs"][graph][side]
        }
        in_table = {row for row in in_cpp if row[0] == role}
        assert in_table == in_manifest, (
            graph,
            sorted(in_table - in_manifest),
            sorted(in_manifest - in_table),
        )


def test_every_name_main_binds_is_in_the_table_and_every_tensor_is_bound():
    code = source()
    calls = re.findall(r'\b(prefill|decode)\.(set_shape|bind)\((?:layer_name\()?"([^"]+)"', code)
    assert len(calls) == len(re.findall(r"\b(?:prefill|decode)\.(?:set_shape|bind)\(", code)), (
        "a set_shape/bind call whose tensor name is not a literal"
    )
    rows = {(g, n): m for g, m, n, _ in table() + table("SLOT_POSITIONS")}
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


def header_levels(text: str) -> list[tuple[int, int, int, int, str]]:
    """(keep1, keep2, span1, span2, engine file) rows of kLevels."""
    body = text[text.index("kLevels[] = {") : text.index("};", text.index("kLevels[] = {"))]
    rows = re.findall(r'\{(\d+), (\d+), (\d+), (\d+), "([^"]+)"\}', body)
    return [(int(a), int(b), int(c), int(d), e) for a, b, c, d, e in rows]


def test_generated_header_matches_the_manifest(any_export, tmp_path):
    manifest = json.loads((any_export / "manifest.json").read_text())
    path = deploy.write_cpp_header(any_export, tmp_path / "star_model.h")
    text = path.read_text()
    consts = header_constants(text)
    geo, star, graphs = manifest["model"]["geometry"], manifest["star"], manifest["graphs"]
    decode = {d["name"]: d["max"] for d in graphs["decode"]["dynamic_dims"]}
    levels = star["levels"]
    prefill = {d["name"]: d["max"] for d in graphs[levels[0]["graph"]]["dynamic_dims"]}
    assert consts == {
        "kNumLayers": geo["num_layers"],
        "kLayerK": star["layer_K"],
        "kNVisual": star["N"],
        "kImageSize": geo["image_size"],
        "kVocab": geo["vocab_size"],
        "kKvHeads": geo["num_kv_heads"],
        "kHeadDim": geo["head_dim"],
        "kSlotPositions": int(slot_positions(manifest)),
        "kImageTokenId": manifest["image_token_id"],
        "kMaxBatch": min(prefill["batch"], decode["batch"]),
        "kMaxTextLen": prefill["text_len"],
        "kMaxPastLenL1": decode["past_len_l1"],
        "kMaxPastLenL2": decode["past_len_l2"],
        "kDefaultKeep": star["default_keep"],
        "kNumLevels": len(levels),
        # a keep range's ends (0 / 0: these exports hold fixed levels only)
        "kKeepMin": levels[0].get("keep_range", {}).get("min", 0),
        "kKeepMax": levels[0].get("keep_range", {}).get("max", 0),
    }
    # one row per level, the default first; the engine names `build --from DIR` writes by default
    several = len(levels) > 1
    assert header_levels(text) == [
        (
            lv["keep1"],
            lv["keep2"],
            lv["span1"],
            lv["span2"],
            f"prefill.k{lv['keep2']}.plan" if several else "prefill.plan",
        )
        for lv in levels
    ]
    assert header_levels(text)[0][1] == consts["kDefaultKeep"]
    assert 'kDecodeEngine = "prefill.decode.plan";' in text
    committed = header_constants((EXAMPLE / "star_model.h").read_text())
    assert set(committed) == set(consts)  # the committed header (default export) has every constant
    assert len(header_levels((EXAMPLE / "star_model.h").read_text())) == committed["kNumLevels"]
    used = set(re.findall(r"star_model::(k\w+)", source())) | set(
        re.findall(r"using star_model::(k\w+)", source())
    )
    assert used <= set(consts) | {"kLevels", "kDecodeEngine"}
    assert {"kLevels", "kDecodeEngine", "kMaxPastLenL1", "kMaxPastLenL2", "kDefaultKeep"} <= used


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


def test_header_names_the_engines_build_recorded(levels_export):
    manifest = json.loads((levels_export / "manifest.json").read_text())
    manifest["engines"] = {
        "prefill_k8": {"path": "/gpu/engines/star.k8.plan"},
        "prefill_k16": {"path": "star.k16.plan"},
        "prefill_k32": {"path": "k32/star.plan"},
        "decode": {"path": "/gpu/engines/star.decode.plan"},
    }
    text = deploy.cpp_header(manifest)
    assert [row[4] for row in header_levels(text)] == ["star.k8.plan", "star.k16.plan", "star.plan"]
    assert 'kDecodeEngine = "star.decode.plan";' in text


def test_header_limits_are_the_built_engines_profiles(levels_export, tmp_path, monkeypatch):
    """`build --max-batch 4 --max-text-len 256 --max-new-tokens 64` records profiles narrower than the
    export's ONNX ranges; the header must carry the engines' limits (TensorRT rejects anything
    beyond them), not the ONNX's. run_build's real plumbing, with build_engine replaced by a recorder
    that records the profile as build_engine does (NO engine is built)."""
    import argparse
    import shutil

    from star_export.engines import add_build_arguments, command, profile_json, run_build, status

    export = tmp_path / "export"
    shutil.copytree(levels_export, export)
    before = header_constants(deploy.cpp_header(json.loads((export / "manifest.json").read_text())))

    def recorder(onnx_path, engine_path, contract, settings, log=print, *, finish=None):
        return {"path": str(engine_path), "bytes": 1, "sha256": "0" * 64, "tensorrt": "stand-in"} | {
            "profiles": [{"inputs": profile_json(p)} for p in settings.profiles]
        }

    monkeypatch.setattr(status, "trt_status", lambda: (True, "TensorRT (stand-in)"))
    monkeypatch.setattr(command, "build_engine", recorder)
    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    flags = ["--max-batch", "4", "--max-text-len", "256", "--max-new-tokens", "64"]
    assert run_build(parser.parse_args(flags), export) == 0
    manifest = json.loads((export / "manifest.json").read_text())
    profile = manifest["engines"]["decode"]["profiles"][0]["inputs"]
    l1 = profile["attention_mask_l1"]["max"][1] - 1  # attention_mask_l1 [batch, past_len_l1 + 1]
    l2 = profile["attention_mask_l2"]["max"][1] - 1
    text = deploy.cpp_header(manifest)
    got = header_constants(text)
    assert (got["kMaxBatch"], got["kMaxTextLen"]) == (4, 256)
    assert (got["kMaxPastLenL1"], got["kMaxPastLenL2"]) == (l1, l2)
    geo, levels = manifest["model"]["geometry"], manifest["star"]["levels"]
    assert l1 == 256 - 1 + max(lv["span1"] for lv in levels) + 64 - 1  # the longest level's span
    assert (before["kMaxBatch"], before["kMaxTextLen"]) == (8, 512)  # the export's ONNX ranges
    assert before["kMaxPastLenL1"] > l1 and before["kMaxPastLenL2"] > l2 and geo
    assert "maxima of the engines' optimization profile 0" in text
    # a graph without a recorded engine: the export's ranges, and the header says so
    del manifest["engines"]["decode"]
    text = deploy.cpp_header(manifest)
    assert header_constants(text) == before and "the export's ONNX ranges (no engines recorded)" in text


def _sources(tmp_path: Path, header: str, export: Path | None) -> Path:
    """main.cpp beside the star_model.h to compile it with (``#include "star_model.h"`` looks in the
    source file's own directory first, so the generated header must sit next to a copy of main.cpp)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    (stubs / "NvInferRuntime.h").write_text(STUB_NVINFER)
    (stubs / "cuda_runtime_api.h").write_text(STUB_CUDA)
    if export is None:
        return MAIN
    src = tmp_path / header
    deploy.write_cpp_header(export, src / "star_model.h")
    shutil.copy2(MAIN, src / "main.cpp")
    return src / "main.cpp"


GXX = ["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror"]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
@pytest.mark.parametrize("header", ["committed", "generated", "generated-levels", "generated-slot-positions"])
def test_main_cpp_is_well_formed_against_stub_headers(request, tmp_path, header):
    export = {
        "committed": None,
        "generated": "export",
        "generated-levels": "levels_export",
        "generated-slot-positions": "gemma_export",
    }[header]
    main = _sources(tmp_path, header, request.getfixturevalue(export) if export else None)
    proc = subprocess.run(
        [*GXX, "-fsyntax-only", f"-I{tmp_path / 'stubs'}", str(main)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_main_cpp_keep_flag_picks_the_level_or_exits_2(levels_export, tmp_path):
    """main.cpp's command line, linked against STUB definitions that abort if called (no TensorRT
    call is reached: the run stops at the missing input files). --keep picks the level's prefill
    engine (default: the default level); a keep the header lacks is one line and exit code 2."""
    main = _sources(tmp_path, "levels", levels_export)
    (tmp_path / "stub_definitions.cpp").write_text(STUB_DEFINITIONS)
    binary = tmp_path / "star_greedy"
    stubs = f"-I{tmp_path / 'stubs'}"
    proc = subprocess.run(
        [*GXX, stubs, str(main), str(tmp_path / "stub_definitions.cpp"), "-o", str(binary)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    inputs = ["--pixels", str(tmp_path / "none.f32"), "--ids", "i", "--mask", "m", "--text-len", "20"]

    def star_greedy(*flags: str) -> tuple[int, list[str]]:
        r = subprocess.run([str(binary), *flags, *inputs], capture_output=True, text=True, timeout=60)
        return r.returncode, r.stderr.strip().splitlines()

    code, err = star_greedy("--keep", "12")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("star_greedy: --keep 12: the engines hold keep levels 8, 16"), err
    code, err = star_greedy("--keep", "16", "--engine-dir", "/engines")
    assert code == 1, err  # past the command line: the (missing) pixels file stops it
    assert (
        err[0]
        == "star_greedy: keep1=32 keep2=16: prefill /engines/prefill.k16.plan, decode /engines/prefill.decode.plan"
    )
    assert err[1] == f"star_greedy: {tmp_path / 'none.f32'}: cannot open"
    code, err = star_greedy()
    assert code == 1 and err[0].startswith("star_greedy: keep1=16 keep2=8: prefill prefill.k8.plan, decode ")
    code, err = star_greedy("--max-new-tokens", "100000")
    assert code == 2 and len(err) == 1 and "--max-new-tokens must be in 1.." in err[0]


def test_cmake_project_names_the_source_and_tensorrt():
    text = (EXAMPLE / "CMakeLists.txt").read_text()
    assert "add_executable(star_greedy main.cpp)" in text
    assert "nvinfer" in text and "CUDA::cudart" in text
