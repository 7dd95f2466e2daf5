"""Stage 3: the static rewrite -> ``prefill.onnx`` through torch.onnx's torch.export-based exporter.

Names and dynamic dims come from the contract. Weights are inlined for small models and go to
an external data file (``prefill.onnx.data``) when the protobuf would near its 2 GB limit.
The file is written into a temporary directory and moved into place by the caller's
``atomic_dir`` so that a failed export never leaves a partial graph behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch

from star_export.contract import GraphContract

OPSET = 18
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of parameters above which weights go to a .data file


def example_inputs(contract: GraphContract, batch: int = 2, text_len: int = 16, image_token_id: int = 0):
    """Example tensors for tracing: batch >= 2 and text_len > 2 so no dim is specialised to 0/1."""
    sizes = {"batch": batch, "text_len": text_len}
    pv = torch.zeros(contract.inputs[0].concrete(sizes), dtype=getattr(torch, contract.inputs[0].dtype))
    ids = torch.full((batch, text_len), 1, dtype=torch.int64)
    ids[:, 1] = image_token_id
    mask = torch.ones(batch, text_len, dtype=torch.int64)
    return pv, ids, mask


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_onnx(
    module: torch.nn.Module,
    contract: GraphContract,
    path: str | os.PathLike,
    image_token_id: int,
    external_data: bool | None = None,
    opset: int = OPSET,
    verbose: bool = False,
) -> Path:
    """Export ``module`` (the static rewrite) to ``path`` following ``contract``; returns the path."""
    path = Path(path)
    text = contract.dim("text_len")
    batch = contract.dim("batch")
    b_dim = torch.export.Dim("batch", min=batch.min, max=batch.max)
    # text_len >= 2: the placeholder plus at least one query token after it.
    t_dim = torch.export.Dim("text_len", min=max(2, text.min), max=text.max)
    dynamic_shapes = {
        "pixel_values": {0: b_dim},
        "input_ids": {0: b_dim, 1: t_dim},
        "attention_mask": {0: b_dim, 1: t_dim},
    }
    example_b = max(2, min(batch.opt, batch.max))
    example_t = max(4, min(text.opt, text.max))
    args = example_inputs(contract, example_b, example_t, image_token_id)
    if external_data is None:
        external_data = param_bytes(module) > EXTERNAL_DATA_THRESHOLD
    sink = io.StringIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        redirect = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(sink)
        with redirect:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=contract.input_names,
                output_names=contract.output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                optimize=True,
                verbose=verbose,
            )
            program.save(str(path), external_data=external_data)
    return path
