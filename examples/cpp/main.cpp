// Greedy generation with the STAR-pruned LLaVA engines (TensorRT 10 runtime API).
//
//   prefill engine (one per keep level, --keep picks it): pixel_values, input_ids, attention_mask ->
//                  logits, kept indices, margins, present.{i}.*
//   decode engine (one for every level): one token + position + two masks + past.{i}.* -> logits,
//                  present.{i}.*; its two past lengths (past_len_l1 for layers < K, past_len_l2 for
//                  layers >= K) are dynamic, so no keep count is baked into it.
//
// The loop is star_export/runtime.py's `generate` (greedy), written out for C++:
//   1. prefill; layers < K return L1 = T - 1 + span1 cache slots, layers >= K return L2 = T - 1 + span2
//      (span1/span2: the chosen level's, from star_model.h's kLevels);
//   2. masks of the cached slots: padding is on the left, so slot j of row b is valid iff j >= pad_b
//      (pad_b = T - real_b), in both layouts, and every new token appends a 1;
//   3. the first new token sits at the ORIGINAL position real_b - 1 + N (the unpruned count), +1 per step;
//   4. each decode step feeds the chosen token, its position, both masks and past.{i}.* = the previous
//      present.{i}.*: every layer's cache grows by one (ping-pong buffers, no copies); where the graphs
//      carry each cached slot's original position (star_model::kSlotPositions: Gemma 3's sliding
//      window), past_positions_l1/_l2 = the previous present_positions_l1/_l2 the same way.
//
// Input is pre-tokenised (raw little-endian files, see README.md): pixel_values float32
// [B, 3, S, S], input_ids and attention_mask int64 [B, T] (left padded, ONE image placeholder per row).
// Model constants and the keep levels (engine file names included) come from star_model.h, generated
// from the export's manifest.json.

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "star_model.h"

namespace {

static_assert(star_model::kNumLevels == static_cast<int32_t>(std::size(star_model::kLevels)), "star_model.h");

// A bad command line: one line on stderr, exit code 2 (as `python -m star_export`).
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

enum class Graph { kPrefill, kDecode };
enum class Mode { kInput, kOutput };
enum class DType { kFloat32, kInt64 };

struct TensorSpec {
    Graph graph;
    Mode mode;
    const char* name;  // "{i}": the decoder layer index, expanded for i < star_model::kNumLayers
    DType dtype;
};

// The exported graphs' I/O, as manifest.json ("graphs") lists it. Every tensor this program binds is
// taken from this table, and load_engine() checks each engine's I/O against it.
// tests/test_cpp_example.py checks the table against a fresh `python -m star_export llava` export.
// A float16/bfloat16 export would need that dtype for pixel_values and the caches.
// STAR_TENSORS_BEGIN
constexpr TensorSpec kTensors[] = {
    {Graph::kPrefill, Mode::kInput, "pixel_values", DType::kFloat32},
    {Graph::kPrefill, Mode::kInput, "input_ids", DType::kInt64},
    {Graph::kPrefill, Mode::kInput, "attention_mask", DType::kInt64},
    {Graph::kPrefill, Mode::kOutput, "logits", DType::kFloat32},
    {Graph::kPrefill, Mode::kOutput, "stage1_keep_idx", DType::kInt64},
    {Graph::kPrefill, Mode::kOutput, "stage2_keep_idx", DType::kInt64},
    {Graph::kPrefill, Mode::kOutput, "stage1_margin", DType::kFloat32},
    {Graph::kPrefill, Mode::kOutput, "stage2_margin", DType::kFloat32},
    {Graph::kPrefill, Mode::kOutput, "present.{i}.key", DType::kFloat32},
    {Graph::kPrefill, Mode::kOutput, "present.{i}.value", DType::kFloat32},
    {Graph::kDecode, Mode::kInput, "input_ids", DType::kInt64},
    {Graph::kDecode, Mode::kInput, "position_ids", DType::kInt64},
    {Graph::kDecode, Mode::kInput, "attention_mask_l1", DType::kInt64},
    {Graph::kDecode, Mode::kInput, "attention_mask_l2", DType::kInt64},
    {Graph::kDecode, Mode::kInput, "past.{i}.key", DType::kFloat32},
    {Graph::kDecode, Mode::kInput, "past.{i}.value", DType::kFloat32},
    {Graph::kDecode, Mode::kOutput, "logits", DType::kFloat32},
    {Graph::kDecode, Mode::kOutput, "present.{i}.key", DType::kFloat32},
    {Graph::kDecode, Mode::kOutput, "present.{i}.value", DType::kFloat32},
};
// STAR_TENSORS_END

// Only where star_model::kSlotPositions (the export's decode graph takes past_positions_l1/_l2): each
// cached slot's original position, output by the prefill and carried by every decode step.
// STAR_SLOT_POSITIONS_BEGIN
constexpr TensorSpec kSlotPositionTensors[] = {
    {Graph::kPrefill, Mode::kOutput, "present_positions_l1", DType::kInt64},
    {Graph::kPrefill, Mode::kOutput, "present_positions_l2", DType::kInt64},
    {Graph::kDecode, Mode::kInput, "past_positions_l1", DType::kInt64},
    {Graph::kDecode, Mode::kInput, "past_positions_l2", DType::kInt64},
    {Graph::kDecode, Mode::kOutput, "present_positions_l1", DType::kInt64},
    {Graph::kDecode, Mode::kOutput, "present_positions_l2", DType::kInt64},
};
// STAR_SLOT_POSITIONS_END

const char* graph_name(Graph g) { return g == Graph::kPrefill ? "prefill" : "decode"; }

std::string layer_name(const std::string& pattern, int layer) {
    std::string out = pattern;
    const auto at = out.find("{i}");
    if (at != std::string::npos) out.replace(at, 3, std::to_string(layer));
    return out;
}

// {name: spec} of one graph, with the per-layer patterns expanded.
std::map<std::string, TensorSpec> expanded(Graph graph) {
    std::map<std::string, TensorSpec> out;
    for (const TensorSpec& t : kTensors) {
        if (t.graph != graph) continue;
        const std::string pattern = t.name;
        if (pattern.find("{i}") == std::string::npos) {
            out.emplace(pattern, t);
        } else {
            for (int i = 0; i < star_model::kNumLayers; ++i) out.emplace(layer_name(pattern, i), t);
        }
    }
    for (const TensorSpec& t : kSlotPositionTensors) {
        if (star_model::kSlotPositions && t.graph == graph) out.emplace(t.name, t);
    }
    return out;
}

void check_cuda(cudaError_t status, const char* what) {
    if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

class Logger : public nvinfer1::ILogger {
   public:
    void log(Severity severity, char const* msg) noexcept override {
        if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << msg << "\n";
    }
};

// One device allocation, freed on destruction.
class DeviceBuffer {
   public:
    explicit DeviceBuffer(size_t bytes) : bytes_(bytes) { check_cuda(cudaMalloc(&ptr_, bytes), "cudaMalloc"); }
    ~DeviceBuffer() { cudaFree(ptr_); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    void* get() const { return ptr_; }
    size_t bytes() const { return bytes_; }

   private:
    void* ptr_ = nullptr;
    size_t bytes_ = 0;
};

nvinfer1::Dims dims(std::initializer_list<int64_t> sizes) {
    nvinfer1::Dims d{};
    d.nbDims = static_cast<int32_t>(sizes.size());
    int32_t k = 0;
    for (int64_t s : sizes) d.d[k++] = s;
    return d;
}

std::vector<char> read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error(path + ": cannot open");
    return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

template <typename T>
std::vector<T> read_array(const std::string& path, size_t count) {
    const std::vector<char> bytes = read_file(path);
    if (bytes.size() != count * sizeof(T)) {
        throw std::runtime_error(path + ": " + std::to_string(bytes.size()) + " bytes, expected " +
                                 std::to_string(count * sizeof(T)));
    }
    std::vector<T> out(count);
    std::memcpy(out.data(), bytes.data(), bytes.size());
    return out;
}

// One engine and its execution context, its I/O checked against kTensors.
struct Engine {
    Graph graph;
    std::unique_ptr<nvinfer1::ICudaEngine> engine;
    std::unique_ptr<nvinfer1::IExecutionContext> context;
    std::map<std::string, TensorSpec> tensors;

    void set_shape(const std::string& name, const nvinfer1::Dims& shape) {
        require(name, Mode::kInput);
        if (!context->setInputShape(name.c_str(), shape)) {
            throw std::runtime_error(std::string(graph_name(graph)) + ": setInputShape(" + name +
                                     ") rejected (outside the engine's optimization profile?)");
        }
    }
    void bind(const std::string& name, void* address) {
        require(name, tensors.count(name) ? tensors.at(name).mode : Mode::kInput);
        if (!context->setTensorAddress(name.c_str(), address)) {
            throw std::runtime_error(std::string(graph_name(graph)) + ": setTensorAddress(" + name + ") failed");
        }
    }
    void require(const std::string& name, Mode mode) const {
        auto it = tensors.find(name);
        if (it == tensors.end() || it->second.mode != mode) {
            throw std::runtime_error(std::string(graph_name(graph)) + ": " + name + " is not an " +
                                     (mode == Mode::kInput ? "input" : "output") + " of the table");
        }
    }
};

Engine load_engine(nvinfer1::IRuntime& runtime, const std::string& path, Graph graph) {
    const std::vector<char> plan = read_file(path);
    Engine e{graph, nullptr, nullptr, expanded(graph)};
    e.engine.reset(runtime.deserializeCudaEngine(plan.data(), plan.size()));
    if (!e.engine) throw std::runtime_error(path + ": deserializeCudaEngine failed (TensorRT version / GPU?)");
    const int32_t n = e.engine->getNbIOTensors();
    std::set<std::string> seen;
    for (int32_t k = 0; k < n; ++k) {
        const std::string name = e.engine->getIOTensorName(k);
        auto it = e.tensors.find(name);
        if (it == e.tensors.end()) throw std::runtime_error(path + ": unexpected tensor " + name);
        const bool input = e.engine->getTensorIOMode(name.c_str()) == nvinfer1::TensorIOMode::kINPUT;
        const nvinfer1::DataType want =
            it->second.dtype == DType::kFloat32 ? nvinfer1::DataType::kFLOAT : nvinfer1::DataType::kINT64;
        if (input != (it->second.mode == Mode::kInput) || e.engine->getTensorDataType(name.c_str()) != want) {
            throw std::runtime_error(path + ": " + name + " differs from the table (direction or dtype)");
        }
        seen.insert(name);
    }
    if (seen.size() != e.tensors.size()) {
        throw std::runtime_error(path + ": " + std::to_string(e.tensors.size() - seen.size()) +
                                 " tensors of the table are missing (another export? regenerate star_model.h)");
    }
    e.context.reset(e.engine->createExecutionContext());
    if (!e.context) throw std::runtime_error(path + ": createExecutionContext failed");
    return e;
}

struct Args {
    std::string prefill, decode, engine_dir = ".", pixels, ids, mask;
    int64_t keep = star_model::kDefaultKeep;
    int64_t batch = 1, text_len = 0, max_new_tokens = 32, pad_id = 0;
    std::vector<int64_t> stops;
    star_model::Level level{};  // the kLevels row of --keep
};

int64_t integer(const std::string& flag, const std::string& value) {
    size_t used = 0;
    int64_t out = 0;
    try {
        out = std::stoll(value, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    if (used == 0 || used != value.size()) throw UsageError(flag + ": expected an integer, got '" + value + "'");
    return out;
}

std::string held_levels() {
    std::string out;
    for (const star_model::Level& lv : star_model::kLevels) out += (out.empty() ? "" : ", ") + std::to_string(lv.keep2);
    return out;
}

std::string in_dir(const std::string& dir, const std::string& name) {
    return dir.empty() || dir == "." ? name : dir + "/" + name;
}

Args parse_args(int argc, char** argv) {
    Args a;
    for (int k = 1; k < argc; ++k) {
        const std::string flag = argv[k];
        if (k + 1 >= argc) throw UsageError("missing value for " + flag);
        const std::string value = argv[++k];
        if (flag == "--prefill") a.prefill = value;
        else if (flag == "--decode") a.decode = value;
        else if (flag == "--engine-dir") a.engine_dir = value;
        else if (flag == "--keep") a.keep = integer(flag, value);
        else if (flag == "--pixels") a.pixels = value;
        else if (flag == "--ids") a.ids = value;
        else if (flag == "--mask") a.mask = value;
        else if (flag == "--batch") a.batch = integer(flag, value);
        else if (flag == "--text-len") a.text_len = integer(flag, value);
        else if (flag == "--max-new-tokens") a.max_new_tokens = integer(flag, value);
        else if (flag == "--pad-id") a.pad_id = integer(flag, value);
        else if (flag == "--stop") a.stops.push_back(integer(flag, value));
        else throw UsageError("unknown flag " + flag);
    }
    if (a.pixels.empty() || a.ids.empty() || a.mask.empty() || a.text_len < 2) {
        throw UsageError(
            "usage: star_greedy [--engine-dir DIR] [--keep K2] [--prefill PLAN] [--decode PLAN] --pixels "
            "pixels.f32 --ids ids.i64 --mask mask.i64 --batch B --text-len T [--max-new-tokens N] [--stop ID]... "
            "[--pad-id ID]");
    }
    // --keep picks the level (its prefill engine and spans); a keep the engines lack is an error, never a fallback
    const star_model::Level* level = nullptr;
    for (const star_model::Level& lv : star_model::kLevels) {
        if (lv.keep2 == a.keep) level = &lv;
    }
    if (level == nullptr) {
        throw UsageError("--keep " + std::to_string(a.keep) + ": the engines hold keep levels " + held_levels() +
                         " (star_model.h); re-export and rebuild with that level to use it");
    }
    a.level = *level;
    if (a.prefill.empty()) a.prefill = in_dir(a.engine_dir, a.level.engine);
    if (a.decode.empty()) a.decode = in_dir(a.engine_dir, star_model::kDecodeEngine);
    if (a.batch < 1 || a.batch > star_model::kMaxBatch) throw UsageError("--batch outside the profile");
    if (a.text_len > star_model::kMaxTextLen) throw UsageError("--text-len outside the profile");
    // the longest answer: the tighter of the two past lengths (contract.max_new_tokens)
    const int64_t room1 = star_model::kMaxPastLenL1 - (a.text_len - 1 + a.level.span1) + 1;
    const int64_t room2 = star_model::kMaxPastLenL2 - (a.text_len - 1 + a.level.span2) + 1;
    if (a.max_new_tokens < 1 || a.max_new_tokens > std::min(room1, room2)) {
        throw UsageError("--max-new-tokens must be in 1.." + std::to_string(std::min(room1, room2)) +
                         " for this prompt and keep (the decode profile)");
    }
    return a;
}

int run(const Args& a) {
    using star_model::kHeadDim;
    using star_model::kKvHeads;
    using star_model::kLayerK;
    using star_model::kNumLayers;
    using star_model::kVocab;
    const int64_t B = a.batch, T = a.text_len, S = star_model::kImageSize;
    const int64_t keep1 = a.level.keep1, keep2 = a.level.keep2;
    // cache slots after prefill: past_len_l1 (layers < K) and past_len_l2 (layers >= K) of the first step
    const int64_t L1 = T - 1 + a.level.span1, L2 = T - 1 + a.level.span2;
    std::cerr << "star_greedy: keep1=" << keep1 << " keep2=" << keep2 << ": prefill " << a.prefill << ", decode "
              << a.decode << "\n";

    std::vector<float> pixels = read_array<float>(a.pixels, B * 3 * S * S);
    std::vector<int64_t> ids = read_array<int64_t>(a.ids, B * T);
    std::vector<int64_t> mask = read_array<int64_t>(a.mask, B * T);

    Logger logger;
    std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
    if (!runtime) throw std::runtime_error("createInferRuntime failed");
    Engine prefill = load_engine(*runtime, a.prefill, Graph::kPrefill);
    Engine decode = load_engine(*runtime, a.decode, Graph::kDecode);
    cudaStream_t stream;
    check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate");

    // Device memory. Caches: capacity for the whole generation, two sets (ping-pong) per layer.
    DeviceBuffer d_pixels(pixels.size() * sizeof(float)), d_ids(ids.size() * 8), d_mask(mask.size() * 8);
    DeviceBuffer d_logits(B * kVocab * sizeof(float));
    DeviceBuffer d_keep1(B * keep1 * 8), d_keep2(B * keep2 * 8);
    DeviceBuffer d_margin1(B * sizeof(float)), d_margin2(B * sizeof(float));  // how close each cut was
    DeviceBuffer d_token(B * 8), d_position(B * 8);
    DeviceBuffer d_mask_l1(B * (L1 + a.max_new_tokens) * 8), d_mask_l2(B * (L2 + a.max_new_tokens) * 8);
    std::vector<std::unique_ptr<DeviceBuffer>> cache[2];  // [set][2 * layer + (0 key, 1 value)]
    std::vector<std::unique_ptr<DeviceBuffer>> slot_pos[2];  // [set][0: layers < K, 1: >= K] (kSlotPositions)
    for (auto& set : slot_pos) {
        if (!star_model::kSlotPositions) break;
        for (const int64_t slots : {L1, L2}) set.push_back(std::make_unique<DeviceBuffer>(B * (slots + a.max_new_tokens) * 8));
    }
    for (auto& set : cache) {
        for (int i = 0; i < kNumLayers; ++i) {
            const int64_t slots = (i < kLayerK ? L1 : L2) + a.max_new_tokens;
            for (int kv = 0; kv < 2; ++kv) {
                set.push_back(std::make_unique<DeviceBuffer>(B * kKvHeads * slots * kHeadDim * sizeof(float)));
            }
        }
    }
    check_cuda(cudaMemcpyAsync(d_pixels.get(), pixels.data(), d_pixels.bytes(), cudaMemcpyHostToDevice, stream), "copy");
    check_cuda(cudaMemcpyAsync(d_ids.get(), ids.data(), d_ids.bytes(), cudaMemcpyHostToDevice, stream), "copy");
    check_cuda(cudaMemcpyAsync(d_mask.get(), mask.data(), d_mask.bytes(), cudaMemcpyHostToDevice, stream), "copy");

    // ---- prefill -------------------------------------------------------------------------------------
    const auto t0 = std::chrono::steady_clock::now();
    prefill.set_shape("pixel_values", dims({B, 3, S, S}));
    prefill.set_shape("input_ids", dims({B, T}));
    prefill.set_shape("attention_mask", dims({B, T}));
    prefill.bind("pixel_values", d_pixels.get());
    prefill.bind("input_ids", d_ids.get());
    prefill.bind("attention_mask", d_mask.get());
    prefill.bind("logits", d_logits.get());
    prefill.bind("stage1_keep_idx", d_keep1.get());
    prefill.bind("stage2_keep_idx", d_keep2.get());
    prefill.bind("stage1_margin", d_margin1.get());
    prefill.bind("stage2_margin", d_margin2.get());
    for (int i = 0; i < kNumLayers; ++i) {
        prefill.bind(layer_name("present.{i}.key", i), cache[0][2 * i]->get());
        prefill.bind(layer_name("present.{i}.value", i), cache[0][2 * i + 1]->get());
    }
    if (star_model::kSlotPositions) {  // each cached slot's original position (-1 at padding)
        prefill.bind("present_positions_l1", slot_pos[0][0]->get());
        prefill.bind("present_positions_l2", slot_pos[0][1]->get());
    }
    if (!prefill.context->allInputDimensionsSpecified()) throw std::runtime_error("prefill: input shapes missing");
    if (!prefill.context->enqueueV3(stream)) throw std::runtime_error("prefill: enqueueV3 failed");
    std::vector<float> logits(B * kVocab);
    check_cuda(cudaMemcpyAsync(logits.data(), d_logits.get(), d_logits.bytes(), cudaMemcpyDeviceToHost, stream), "copy");
    check_cuda(cudaStreamSynchronize(stream), "prefill");
    const auto t1 = std::chrono::steady_clock::now();

    // ---- greedy decode loop (star_export.runtime.generate) -------------------------------------------
    std::vector<int64_t> real(B), pad(B);
    for (int64_t b = 0; b < B; ++b) {
        real[b] = 0;
        for (int64_t t = 0; t < T; ++t) real[b] += mask[b * T + t];
        pad[b] = T - real[b];
    }
    std::vector<std::vector<int64_t>> tokens(B);
    std::vector<bool> finished(B, false);
    std::vector<int64_t> token(B), position(B), mask_l1, mask_l2;
    int cur = 0, steps = 0;
    for (int64_t step = 0; step < a.max_new_tokens; ++step) {
        bool all_done = true;
        for (int64_t b = 0; b < B; ++b) {
            const float* row = logits.data() + b * kVocab;
            const int64_t best = std::max_element(row, row + kVocab) - row;  // ties: the lower id
            token[b] = finished[b] ? a.pad_id : best;
            if (!finished[b]) {
                tokens[b].push_back(token[b]);
                if (std::find(a.stops.begin(), a.stops.end(), token[b]) != a.stops.end()) finished[b] = true;
            }
            all_done = all_done && finished[b];
        }
        if (all_done || step == a.max_new_tokens - 1) break;

        const int64_t p1 = L1 + step, p2 = L2 + step;  // this step's past_len_l1 (layers < K), past_len_l2
        mask_l1.assign(B * (p1 + 1), 0);
        mask_l2.assign(B * (p2 + 1), 0);
        for (int64_t b = 0; b < B; ++b) {
            for (int64_t j = 0; j <= p1; ++j) mask_l1[b * (p1 + 1) + j] = j >= pad[b];
            for (int64_t j = 0; j <= p2; ++j) mask_l2[b * (p2 + 1) + j] = j >= pad[b];
            position[b] = real[b] - 1 + star_model::kNVisual + step;
        }
        check_cuda(cudaMemcpyAsync(d_token.get(), token.data(), B * 8, cudaMemcpyHostToDevice, stream), "copy");
        check_cuda(cudaMemcpyAsync(d_position.get(), position.data(), B * 8, cudaMemcpyHostToDevice, stream), "copy");
        check_cuda(cudaMemcpyAsync(d_mask_l1.get(), mask_l1.data(), mask_l1.size() * 8, cudaMemcpyHostToDevice, stream), "copy");
        check_cuda(cudaMemcpyAsync(d_mask_l2.get(), mask_l2.data(), mask_l2.size() * 8, cudaMemcpyHostToDevice, stream), "copy");

        decode.set_shape("input_ids", dims({B, 1}));
        decode.set_shape("position_ids", dims({B, 1}));
        decode.set_shape("attention_mask_l1", dims({B, p1 + 1}));
        decode.set_shape("attention_mask_l2", dims({B, p2 + 1}));
        decode.bind("input_ids", d_token.get());
        decode.bind("position_ids", d_position.get());
        decode.bind("attention_mask_l1", d_mask_l1.get());
        decode.bind("attention_mask_l2", d_mask_l2.get());
        decode.bind("logits", d_logits.get());
        for (int i = 0; i < kNumLayers; ++i) {
            const nvinfer1::Dims past = dims({B, kKvHeads, i < kLayerK ? p1 : p2, kHeadDim});
            decode.set_shape(layer_name("past.{i}.key", i), past);
            decode.set_shape(layer_name("past.{i}.value", i), past);
            decode.bind(layer_name("past.{i}.key", i), cache[cur][2 * i]->get());
            decode.bind(layer_name("past.{i}.value", i), cache[cur][2 * i + 1]->get());
            decode.bind(layer_name("present.{i}.key", i), cache[1 - cur][2 * i]->get());
            decode.bind(layer_name("present.{i}.value", i), cache[1 - cur][2 * i + 1]->get());
        }
        if (star_model::kSlotPositions) {  // carried like the caches: the new position is appended
            decode.set_shape("past_positions_l1", dims({B, p1}));
            decode.set_shape("past_positions_l2", dims({B, p2}));
            decode.bind("past_positions_l1", slot_pos[cur][0]->get());
            decode.bind("past_positions_l2", slot_pos[cur][1]->get());
            decode.bind("present_positions_l1", slot_pos[1 - cur][0]->get());
            decode.bind("present_positions_l2", slot_pos[1 - cur][1]->get());
        }
        if (!decode.context->allInputDimensionsSpecified()) throw std::runtime_error("decode: input shapes missing");
        if (!decode.context->enqueueV3(stream)) throw std::runtime_error("decode: enqueueV3 failed");
        check_cuda(cudaMemcpyAsync(logits.data(), d_logits.get(), B * kVocab * sizeof(float), cudaMemcpyDeviceToHost, stream), "copy");
        check_cuda(cudaStreamSynchronize(stream), "decode");
        cur = 1 - cur;  // this step's presents are the next step's pasts
        ++steps;
    }
    const auto t2 = std::chrono::steady_clock::now();
    check_cuda(cudaStreamDestroy(stream), "cudaStreamDestroy");

    for (int64_t b = 0; b < B; ++b) {
        std::cout << "row " << b << ":";
        for (int64_t t : tokens[b]) std::cout << " " << t;
        std::cout << "\n";
    }
    const double prefill_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
    const double decode_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
    std::cerr << "prefill " << prefill_ms << " ms; " << steps << " decode steps in " << decode_ms << " ms\n";
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    Args args;
    try {
        args = parse_args(argc, argv);
    } catch (const UsageError& e) {
        std::cerr << "star_greedy: " << e.what() << "\n";
        return 2;
    }
    try {
        return run(args);
    } catch (const std::exception& e) {
        std::cerr << "star_greedy: " << e.what() << "\n";
        return 1;
    }
}
