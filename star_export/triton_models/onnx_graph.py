"""Triton Python-backend model: one exported ONNX graph (a keep level's prefill graph, or the decode
graph every level shares) in onnxruntime.

Copied by ``python -m star_export triton --backend python`` into ``<repo>/<model>/1/model.py``,
beside ``model.onnx`` and the external data it names (the export's ``weights.onnx.data``,
hard-linked or copied there: onnxruntime reads it relative to the graph's directory).
Self-contained: it needs numpy and onnxruntime in the Python environment of the backend stub,
not star_export. The tensor names come from the model's ``config.pbtxt`` (generated from the
export's manifest); the ONNX file name from its ``onnx_file`` parameter.

Config parameters (all optional): ``onnx_file`` (default ``model.onnx``),
``intra_op_num_threads`` and ``inter_op_num_threads`` (default 0 = onnxruntime's choice; the
``triton`` command writes its thread budget), ``allow_spinning`` ("0": idle threads sleep instead of
spin-waiting, so sessions sharing the cores do not take them from one another), ``share_weights``
(default ``1``; ``triton --weights`` writes it per model: decode-packed, the default, writes ``0`` for
the decode model only).

Weights: every prefill model and the decode model run in their own stub process, each with its own
session. With ``share_weights`` (and the ``onnx`` package present to read where each initializer
lies), the external data file is memory-mapped read-only and each initializer handed to onnxruntime
over its slice (``SessionOptions.add_initializer``, no copy; pre-packing off, since its buffers
would be per process): the file is hard-linked into every model directory, so every stub maps the
same page-cache pages and the weights sit in memory once for all levels (each process's RSS still
counts them; their proportional set sizes add up to one copy). Without it each session reads and
pre-packs its own copy: pre-packed, a decode step of several rows costs about one row's, while without
pre-packing onnxruntime packs every weight matrix again on each call of 2+ rows (measured 3.5-4x a
row's step), which is why the decode model pre-packs by default.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _parameters(config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


def check_numpy_bridge() -> None:
    """Fail the model load with a clear message where the stub mis-reads numpy arrays.

    Stubs built with a pybind11 that predates numpy 2 (e.g. Triton 24.10 in the nvidia-pytriton
    0.7 wheel) create every array they hand to Python with a zero stride under numpy 2: each
    tensor reads as copies of its first byte and BYTES inputs abort the stub.
    """
    probe = np.arange(1, 9, dtype=np.uint8)
    back = pb_utils.Tensor.from_dlpack("probe", pb_utils.Tensor("source", probe)).as_numpy()
    if not np.array_equal(back, probe):
        raise pb_utils.TritonModelException(
            f"this Triton Python backend stub reads tensors wrongly with numpy {np.__version__} "
            "(its pybind11 predates numpy 2): put numpy<2 first in the stub's Python environment "
            "(the python3 first on PATH when tritonserver starts)"
        )


def map_initializers(path: Path, opts) -> list:
    """Add every external initializer of ``path`` to ``opts`` as an OrtValue over a read-only memory
    map of its data file (page-cache pages shared with every process that maps the file); returns the
    maps (keep them alive as long as the session). Nothing is added without the ``onnx`` package."""
    try:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype
    except ImportError:
        return []
    import onnxruntime as ort

    maps: dict[str, np.ndarray] = {}
    kept: list = []
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info["location"]
        if location not in maps:
            maps[location] = np.memmap(path.parent / location, dtype=np.uint8, mode="r")
        offset, length = int(info.get("offset", 0)), int(info["length"])
        dtype = np.dtype(tensor_dtype_to_np_dtype(tensor.data_type))
        array = maps[location][offset : offset + length].view(dtype).reshape(tuple(tensor.dims))
        value = ort.OrtValue.ortvalue_from_numpy(array)
        opts.add_initializer(tensor.name, value)
        kept += [array, value]
    if kept:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return [*maps.values(), *kept]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        check_numpy_bridge()
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = _parameters(config)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = int(params.get("intra_op_num_threads") or 0)
        if threads > 0:
            opts.intra_op_num_threads = threads
        inter = int(params.get("inter_op_num_threads") or 0)
        if inter > 0:
            opts.inter_op_num_threads = inter
        if params.get("allow_spinning") in ("0", "1"):
            opts.add_session_config_entry("session.intra_op.allow_spinning", params["allow_spinning"])
        providers: list = ["CPUExecutionProvider"]
        if (
            args.get("model_instance_kind") == "GPU"
            and "CUDAExecutionProvider" in ort.get_available_providers()
        ):
            device = int(args.get("model_instance_device_id") or 0)
            providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        path = version_dir / (params.get("onnx_file") or "model.onnx")
        self._mapped: list = []  # the memory maps the session's initializers point into
        if params.get("share_weights", "1") != "0" and providers == ["CPUExecutionProvider"]:
            self._mapped = map_initializers(path, opts)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        if set(self.input_names) != graph_inputs or not set(self.output_names) <= graph_outputs:
            raise pb_utils.TritonModelException(
                f"{path.name}: config.pbtxt and the ONNX graph disagree: config inputs "
                f"{sorted(self.input_names)}, graph inputs {sorted(graph_inputs)}"
            )

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                feeds = {}
                for name in self.input_names:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise ValueError(f"missing input {name!r}")
                    feeds[name] = np.ascontiguousarray(tensor.as_numpy())
                outputs = self.session.run(self.output_names, feeds)
            except Exception as e:  # one bad request must not take the model down
                message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
                )
                continue
            tensors = [pb_utils.Tensor(n, v) for n, v in zip(self.output_names, outputs, strict=True)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
