"""Runtimes behind polygraphy's runner interface: the PyTorch rewrite, onnxruntime, TensorRT.

polygraphy's own ``PytRunner`` moves inputs to CUDA unconditionally, so the PyTorch rewrite
gets a small CPU/GPU-agnostic runner here. onnxruntime and TensorRT use polygraphy's runners
(``OnnxrtRunner``, ``TrtRunner``), imported lazily.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from star_export.contract import GraphContract
from star_export.encoding import cast_inputs, declared_dtypes
from star_export.runtime import as_bfloat16


def input_metadata(contract: GraphContract) -> TensorMetadata:
    meta = TensorMetadata()
    for t in contract.inputs:
        meta.add(t.name, np.dtype(t.dtype), [d if isinstance(d, int) else -1 for d in t.shape])
    return meta


class TorchRunner(BaseRunner):
    """Runs a module returning a tuple of tensors in contract output order."""

    def __init__(
        self, module: torch.nn.Module, contract: GraphContract, device: str = "cpu", name: str | None = None
    ):
        super().__init__(name=name, prefix="torch-runner")
        self._module = module
        self.contract = contract
        self.device = torch.device(device)

    def activate_impl(self) -> None:
        self._module.eval()

    def get_input_metadata_impl(self) -> TensorMetadata:
        return input_metadata(self.contract)

    def infer_impl(self, feed_dict):
        fed = cast_inputs(
            {n: feed_dict[n] for n in self.contract.input_names},
            declared_dtypes(self.contract.inputs),
            as_bfloat16,
        )
        args = [
            (v if torch.is_tensor(v) else torch.from_numpy(np.ascontiguousarray(v))).to(self.device)
            for v in fed.values()
        ]
        with torch.no_grad():
            start = time.perf_counter()
            outputs = self._module(*args)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.inference_time = time.perf_counter() - start
        return OrderedDict(
            (
                name,
                np.ascontiguousarray(
                    (out.float() if out.is_floating_point() else out).detach().cpu().numpy()
                ),
            )
            for name, out in zip(self.contract.output_names, outputs, strict=True)
        )

    def deactivate_impl(self) -> None:
        pass


def onnxrt_runner(path: str, threads: int | None = None, name: str | None = None) -> BaseRunner:
    """polygraphy's OnnxrtRunner on the CPU execution provider."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    def session():
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    return OnnxrtRunner(session, name=name)
