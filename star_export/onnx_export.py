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
import re
import warnings
from pathlib import Path

import torch

from star_export.contract import GraphContract

OPSET = 18
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of parameters above which weights go to a .data file


def example_inputs(contract: GraphContract, batch: int = 2, text_len: int = 16, image_token_id: int = 0):
    """Prefill tracing inputs: batch >= 2 and text_len > 2 so no dim is specialised to 0/1."""
    sizes = {"batch": batch, "text_len": text_len}
    pv = torch.zeros(contract.inputs[0].concrete(sizes), dtype=getattr(torch, contract.inputs[0].dtype))
    ids = torch.full((batch, text_len), 1, dtype=torch.int64)
    ids[:, 1] = image_token_id
    mask = torch.ones(batch, text_len, dtype=torch.int64)
    if "keep" not in {d.name for d in contract.dims}:
        return pv, ids, mask
    keep = contract.dim("keep")  # a keep range: keep_slots [B, keep], an example length inside it
    size = keep.opt if keep.opt not in (batch, text_len) or keep.min == keep.max else keep.opt + 1
    return pv, ids, mask, torch.zeros(batch, min(size, keep.max), dtype=torch.int64)


def example_decode_inputs(contract: GraphContract, batch: int = 2):
    """Decode tracing inputs of the contract's shapes (values do not matter for tracing). The two past
    lengths get different sizes so that the exporter keeps them independent."""
    p1, p2 = contract.dim("past_len_l1"), contract.dim("past_len_l2")
    size1, size2 = p1.opt, p2.opt
    if size1 == size2:  # equal examples could let the exporter tie the two dims together
        size1 = size1 + 3 if size1 + 3 <= p1.max else size1 - 3
    sizes = {"batch": batch, "past_len_l1": size1, "past_len_l2": size2}
    out = []
    for spec in contract.inputs:
        shape = spec.concrete(sizes)
        if spec.dtype == "int64":
            out.append(torch.ones(shape, dtype=torch.int64))
        else:
            out.append(torch.zeros(shape, dtype=getattr(torch, spec.dtype)))
    return tuple(out)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


_DIM_EXPR = re.compile(r"^(\w+)(?: \+ (\d+))?$")


def dynamic_shapes_for(contract: GraphContract) -> dict[str, dict[int, object]]:
    """torch.export dynamic shapes from the contract: a symbol is a Dim with the contract's
    [min, max], ``sym + c`` a derived Dim (e.g. the decode masks' ``past_len + 1``)."""
    dims = {}
    for d in contract.dims:
        low = max(d.min, 2) if d.name == "text_len" else d.min  # placeholder + >= 1 query token
        dims[d.name] = torch.export.Dim(d.name, min=low, max=d.max)
    shapes: dict[str, dict[int, object]] = {}
    for spec in contract.inputs:
        axes = {}
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                continue
            m = _DIM_EXPR.match(d)
            if not m or m.group(1) not in dims:
                raise ValueError(f"{spec.name}: cannot export dim {d!r}")
            axes[axis] = dims[m.group(1)] + int(m.group(2)) if m.group(2) else dims[m.group(1)]
        shapes[spec.name] = axes
    return shapes


def _by_signature(module: torch.nn.Module, shapes: dict[str, dict[int, object]]) -> dict[str, object]:
    """Map contract input names onto forward's parameters; a ``*pasts`` parameter takes the rest, in order."""
    import inspect

    params = [p for p in inspect.signature(module.forward).parameters.values()]
    names = list(shapes)
    out: dict[str, object] = {}
    for i, p in enumerate(params):
        if i >= len(names):  # an optional parameter the contract does not feed (keep_slots of a fixed level)
            break
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            out[p.name] = tuple(shapes[n] for n in names[i:])
            break
        out[p.name] = shapes[names[i]]
    return out


def export_onnx(
    module: torch.nn.Module,
    contract: GraphContract,
    path: str | os.PathLike,
    image_token_id: int = 0,
    external_data: bool | None = None,
    opset: int = OPSET,
    verbose: bool = False,
    example_args: tuple | None = None,
) -> Path:
    """Export ``module`` (a static rewrite) to ``path`` following ``contract``; returns the path."""
    path = Path(path)
    if example_args is None:
        batch, text = contract.dim("batch"), contract.dim("text_len")
        example_args = example_inputs(
            contract, max(2, min(batch.opt, batch.max)), max(4, min(text.opt, text.max)), image_token_id
        )
    if external_data is None:
        external_data = param_bytes(module) > EXTERNAL_DATA_THRESHOLD
    sink = io.StringIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        redirect = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(sink)
        with redirect:
            program = torch.onnx.export(
                module,
                example_args,
                dynamo=True,
                input_names=contract.input_names,
                output_names=contract.output_names,
                dynamic_shapes=_by_signature(module, dynamic_shapes_for(contract)),
                opset_version=opset,
                optimize=True,
                verbose=verbose,
            )
            program.save(str(path), external_data=external_data)
    return path
