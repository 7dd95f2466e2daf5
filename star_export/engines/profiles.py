"""Optimization-profile shape ranges of an engine, from the I/O contract.

``IOptimizationProfile``: min/opt/max for every dynamic input; kernels are chosen for ``opt`` and
valid across [min, max]; inputs outside the range fail at run time. The ranges come from the
contract's ``DynamicDim`` ranges (the recipe) with CLI overrides, one profile per engine; derived
dims (``past_len + 65``) are evaluated per corner, so all inputs of one profile agree with each
other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from star_export.contract import GraphContract, TensorSpec
from star_export.errors import UsageError

# Smallest legal size per dim name: a prompt holds the image placeholder plus at least one token
# after it (STAR_SPEC.md, Inputs). Other dims: 1.
MIN_DIM_SIZE: Mapping[str, int] = {"text_len": 2}

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)
ProfileShapes = dict[str, ShapeRange]  # input name -> (min, opt, max)
DimRange = tuple[int, int, int]


def _dim_ranges(
    contract: GraphContract, overrides: Mapping[str, Sequence[int]] | None
) -> dict[str, DimRange]:
    ranges: dict[str, DimRange] = {d.name: (d.min, d.opt, d.max) for d in contract.dims}
    for name, value in (overrides or {}).items():
        if name not in ranges:
            raise UsageError(
                f"the {contract.graph} graph has no dynamic dim {name!r} (it has: {', '.join(ranges)})"
            )
        if len(value) != 3:
            raise UsageError(f"{name}: expected (min, opt, max), got {tuple(value)}")
        ranges[name] = (int(value[0]), int(value[1]), int(value[2]))
    for name, (lo, opt, hi) in ranges.items():
        floor = MIN_DIM_SIZE.get(name, 1)
        if not floor <= lo <= opt <= hi:
            raise UsageError(
                f"{contract.graph} profile, {name}: need {floor} <= min <= opt <= max, got "
                f"min={lo} opt={opt} max={hi}"
            )
    return ranges


def _shape_ranges(specs: Iterable[TensorSpec], ranges: Mapping[str, DimRange]) -> dict[str, ShapeRange]:
    out: dict[str, ShapeRange] = {}
    for spec in specs:
        corners = tuple(spec.concrete({n: r[i] for n, r in ranges.items()}) for i in range(3))
        lo, opt, hi = corners
        for axis, (a, b, c) in enumerate(zip(lo, opt, hi, strict=True)):
            if not 1 <= a <= b <= c:
                raise UsageError(
                    f"{spec.name} axis {axis} ({spec.shape[axis]}): min/opt/max {a}/{b}/{c} "
                    "is not a valid range"
                )
        out[spec.name] = (lo, opt, hi)
    return out


def profile_shapes(
    contract: GraphContract, overrides: Mapping[str, Sequence[int]] | None = None
) -> ProfileShapes:
    """{input name: (min shape, opt shape, max shape)} for every input of ``contract``.

    Ranges come from the contract's dynamic dims; ``overrides`` ({"batch": (1, 4, 16)}) replace a
    dim's (min, opt, max). Each corner evaluates every symbol and expression (``past_len + 65``)
    at that corner, so the shapes of one profile are mutually consistent. A range with
    min > opt, opt > max, or below the dim's floor (text_len >= 2) is a ``UsageError``.
    """
    return _shape_ranges(contract.inputs, _dim_ranges(contract, overrides))


def output_shapes(
    contract: GraphContract, overrides: Mapping[str, Sequence[int]] | None = None
) -> dict[str, ShapeRange]:
    """Output shapes at the profile's corners (what a C++ user allocates for ``max``)."""
    return _shape_ranges(contract.outputs, _dim_ranges(contract, overrides))


def check_profile(contract: GraphContract, shapes: Mapping[str, Sequence[Sequence[int]]]) -> None:
    """A profile (e.g. from a caller) must cover exactly the contract's inputs with valid ranges."""
    names = set(contract.input_names)
    if set(shapes) != names:
        missing, extra = sorted(names - set(shapes)), sorted(set(shapes) - names)
        raise UsageError(f"{contract.graph} profile: missing inputs {missing}, unknown inputs {extra}")
    for spec in contract.inputs:
        lo, opt, hi = (tuple(s) for s in shapes[spec.name])
        if not len(lo) == len(opt) == len(hi) == len(spec.shape):
            raise UsageError(f"{spec.name}: profile shapes must have rank {len(spec.shape)}")
        for axis, (a, b, c) in enumerate(zip(lo, opt, hi, strict=True)):
            if not 1 <= a <= b <= c:
                raise UsageError(f"{spec.name} axis {axis}: min/opt/max {a}/{b}/{c} is not a valid range")
            fixed = spec.shape[axis]
            if isinstance(fixed, int) and not a == b == c == fixed:
                raise UsageError(f"{spec.name} axis {axis} is static ({fixed}), profile says {a}/{b}/{c}")


def to_polygraphy_profiles(profiles: Sequence[Mapping[str, ShapeRange]]) -> list[Any]:
    """polygraphy ``Profile`` objects (no TensorRT needed until ``Profile.to_trt``)."""
    from polygraphy.backend.trt import Profile

    out = []
    for shapes in profiles:
        p = Profile()
        for name, (lo, opt, hi) in shapes.items():
            p.add(name, min=tuple(lo), opt=tuple(opt), max=tuple(hi))
        out.append(p)
    return out


def profile_json(shapes: Mapping[str, ShapeRange]) -> dict[str, dict[str, list[int]]]:
    """A profile as JSON for the manifest: {input: {"min": [...], "opt": [...], "max": [...]}}."""
    return {n: {"min": list(lo), "opt": list(opt), "max": list(hi)} for n, (lo, opt, hi) in shapes.items()}


def outputs_for_profile(contract: GraphContract, shapes: Mapping[str, ShapeRange]) -> dict[str, ShapeRange]:
    """Output shape ranges implied by a profile: dim sizes read back from the input shapes."""
    ranges: dict[str, list[int]] = {}
    for spec in contract.inputs:
        for axis, d in enumerate(spec.shape):
            if isinstance(d, str) and d.isidentifier():
                ranges.setdefault(d, [shapes[spec.name][i][axis] for i in range(3)])
    if set(ranges) != {d.name for d in contract.dims}:
        return {}
    return output_shapes(contract, {n: tuple(r) for n, r in ranges.items()})
