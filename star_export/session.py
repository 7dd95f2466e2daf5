"""Answer questions about images with a STAR-pruned model: an export (``load_export``) or a checkpoint
run through the PyTorch rewrite (``load_model``), behind one ``Pipeline.generate``.

    pipe = star_export.load_export("star_out")                  # prefill.onnx + decode.onnx, onnxruntime
    out = pipe.generate(["cat.png"], ["What is in the image?"], max_new_tokens=32)
    out.answers, out.result.stage2_keep_idx, out.result.prefill_s
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from star_export.errors import UsageError
from star_export.geometry import Geometry
from star_export.star import StarConfig

UNBOUNDED = 1 << 30


@dataclass
class Answers:
    answers: list[str]
    result: Any  # runtime.GenerationResult: tokens, kept indices, margins, timings, cache lengths


class Pipeline:
    """A pre-processor, a STAR configuration and a backend (onnxruntime graphs or the PyTorch rewrite)."""

    def __init__(
        self,
        backend: Any,
        pre: Any,
        geo: Geometry,
        cfg: StarConfig,
        where: str,
        text_max: int = UNBOUNDED,
        past_max: int = UNBOUNDED,
    ):
        self.backend, self.pre, self.geo, self.cfg, self.where = backend, pre, geo, cfg, where
        self.text_max, self.past_max = text_max, past_max

    @property
    def runtime(self) -> str:
        return self.backend.name

    def generate(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[int] = (),
    ) -> Answers:
        """One image per prompt (one image may serve all prompts); greedy unless ``temperature`` > 0."""
        from star_export.runtime import GenerationConfig, generate

        if max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
        images = list(images)
        if len(images) == 1 and len(prompts) > 1:
            images = images * len(prompts)
        if len(images) != len(prompts):
            raise UsageError(
                f"{len(images)} images but {len(prompts)} prompts: give one image, or one per prompt"
            )
        feeds = self.pre.encode(images, list(prompts))
        text_len = feeds["input_ids"].shape[1]
        if text_len > self.text_max:
            raise UsageError(
                f"prompt is {text_len} tokens; the exported profile allows at most {self.text_max}"
            )
        span2 = self.geo.span(self.cfg.keep2)
        if text_len - 1 + span2 + max_new_tokens - 1 > self.past_max:
            allowed = self.past_max - (text_len - 1 + span2) + 1
            raise UsageError(
                f"--max-new-tokens {max_new_tokens} exceeds the exported decode profile "
                f"(at most {allowed} for this prompt)"
            )
        stops = tuple(t for t in (self.pre.eos_token_id, *stop) if t is not None)
        gen = GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stops,
            pad_token_id=self.pre.pad_token_id,
        )
        result = generate(self.backend, feeds, self.geo, self.cfg, gen)
        return Answers([self.pre.decode(t) for t in result.tokens], result)


def _torch_backend(loaded: Any, geo: Geometry, cfg: StarConfig, pc: Any, dc: Any) -> Any:
    from star_export.runtime import TorchBackend

    return TorchBackend(loaded.model, geo, cfg, pc, dc)


def load_export(directory: str | Path, runtime: str = "onnxruntime") -> Pipeline:
    """An export directory (``export``'s ``out``): its graphs in onnxruntime, or (``runtime="torch"``)
    the PyTorch rewrite of the checkpoint its manifest names, with the same settings."""
    from star_export.contract import contract_from_dict
    from star_export.geometry import Geometry
    from star_export.manifest import read_manifest, star_config
    from star_export.preprocess import Preprocessor

    directory = Path(directory)
    manifest = read_manifest(directory)
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    cfg = star_config(manifest, geo, f"--from {directory}")
    dims = {d["name"]: d for g in manifest["graphs"].values() for d in g["dynamic_dims"]}
    pre = Preprocessor.from_dir(directory / "processor", geometry=geo, flag="--from")
    if runtime == "onnxruntime":
        from star_export.runtime import OnnxruntimeBackend

        backend = OnnxruntimeBackend(directory / "prefill.onnx", directory / "decode.onnx")
        where = f"{directory}/ (prefill.onnx + decode.onnx)"
    elif runtime == "torch":
        from star_export.load import load

        loaded = load(manifest["model"]["directory"], options=_layout_options(geo, manifest))
        graphs = manifest["graphs"]
        pc, dc = contract_from_dict(graphs["prefill"]), contract_from_dict(graphs["decode"])
        backend = _torch_backend(loaded, geo, cfg, pc, dc)
        where = f"PyTorch rewrite of {loaded.source}"
    else:
        raise UsageError(f"runtime must be onnxruntime or torch, got {runtime!r}")
    return Pipeline(backend, pre, geo, cfg, where, dims["text_len"]["max"], dims["past_len"]["max"])


def _layout_options(geo: Geometry, manifest: dict[str, Any]) -> dict[str, Any]:
    """The layout options that reproduce the export's geometry when its checkpoint is loaded again."""
    from star_export.families import family_of

    family = family_of(geo)
    recorded = manifest.get("layout") or {}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in recorded.items() if k in family.options}


def load_model(
    model: str | Path | None = None,
    *,
    keep: int = 64,
    keep1: int | None = None,
    layer: int = 2,
    recipe: str | Path | None = None,
    grid: tuple[int, int] | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> Pipeline:
    """A checkpoint (directory, hub id, or None: the embedded llava-tiny) through the PyTorch rewrite."""
    from star_export.api import DEFAULT_RECIPE, quiet_libraries
    from star_export.contract import decode_contract, prefill_contract
    from star_export.load import load, load_recipe_model, resolve_model
    from star_export.preprocess import Preprocessor
    from star_export.recipes import load_recipe

    quiet_libraries()
    options = {"grid": grid, "image_size": image_size}
    if model is None:
        loaded = load_recipe_model(load_recipe(recipe or DEFAULT_RECIPE))
    else:
        model_dir, source = resolve_model(model)
        loaded = load(model_dir, source=source, options=options)
    geo = loaded.geometry
    cfg = StarConfig.resolve(
        keep=keep, keep1=keep1, layer=layer, n_visual=geo.n_visual, num_layers=geo.num_layers
    )
    pc = prefill_contract(geo, cfg, (1, 1, UNBOUNDED), (2, 2, UNBOUNDED))
    dc = decode_contract(geo, cfg, (1, 1, UNBOUNDED), (2, 2, UNBOUNDED), 1 << 20)
    pre = Preprocessor.from_dir(loaded.model_dir, geometry=geo)
    return Pipeline(
        _torch_backend(loaded, geo, cfg, pc, dc), pre, geo, cfg, f"PyTorch rewrite of {loaded.source}"
    )
