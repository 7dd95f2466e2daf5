"""Answer questions about images with a STAR-pruned model: an export (``load_export``) or a checkpoint
run through the PyTorch rewrite (``load_model``), behind one ``Pipeline.generate``.

    pipe = star_export.load_export("star_out")                  # prefill + decode graphs, onnxruntime
    out = pipe.generate(["cat.png"], ["What is in the image?"], max_new_tokens=32, keep=64)
    out.answers, out.result.stage2_keep_idx, out.result.prefill_s

An export with several keep levels (``--keep 32,64,128``) answers each request at the level it asks
for (``keep=``, default the export's default); one decode graph serves every level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    cfg: StarConfig | None = None  # the keep level that answered


class Pipeline:
    """A pre-processor, the keep levels and a backend per level (onnxruntime graphs or the rewrite).

    ``backend_for(cfg)`` builds the backend of one level; it is called on a level's first request and
    kept. ``dims``: the decode graph's dynamic dims ({name: {"max": ...}}), None when unbounded.
    ``model``: the loaded transformers model where the backends are the PyTorch rewrite of it."""

    def __init__(
        self,
        backend_for: Callable[[StarConfig], Any],
        pre: Any,
        geo: Geometry,
        levels: Sequence[StarConfig],
        where: str,
        text_max: int = UNBOUNDED,
        dims: dict[str, Any] | None = None,
        model: Any = None,
    ):
        self._backend_for, self._backends = backend_for, {}
        self.pre, self.geo, self.levels, self.where = pre, geo, list(levels), where
        self.text_max, self.dims = text_max, dims
        self.model = model  # the transformers model behind the rewrite (None for exported graphs)

    @property
    def cfg(self) -> StarConfig:
        """The default keep level."""
        return self.levels[0]

    @property
    def keeps(self) -> list[int]:
        """keep2 of every level, the default first (a keep range: its default and both ends)."""
        ends = (k for c in self.levels for k in (c.keep2, *(c.keep_range or ())))
        return list(dict.fromkeys(ends))

    def level(self, keep: int | None = None) -> StarConfig:
        """The level whose keep2 is ``keep`` (None: the default), a keep range's level ``keep``
        (constants keep1/keep2), or a one-line UsageError."""
        cfg = self._serving(keep)
        return cfg if cfg.keep_range is None else cfg.at(cfg.keep2 if keep is None else keep)

    def _serving(self, keep: int | None) -> StarConfig:
        """The level (or keep range) whose graph answers at ``keep``."""
        if keep is None:
            return self.levels[0]
        for cfg in self.levels:
            if cfg.keep2 == keep or cfg.covers(keep):
                return cfg
        from star_export.manifest import describe_keeps

        held = ",".join(describe_keeps(c) for c in self.levels)
        raise UsageError(
            f"--keep {keep}: this export holds keep levels {held}; re-export with --keep {held},{keep}"
        )

    def backend(self, keep: int | None = None) -> Any:
        cfg = self._serving(keep)  # a keep range: one backend (one graph) for every keep in it
        if cfg not in self._backends:
            self._backends[cfg] = self._backend_for(cfg)
        return self._backends[cfg]

    @property
    def runtime(self) -> str:
        return self.backend().name

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
        keep: int | None = None,
        keep_logits: bool = False,
    ) -> Answers:
        """One image per prompt (one image may serve all prompts); greedy unless ``temperature`` > 0;
        ``keep``: the keep level to answer at (the export's default when None); ``keep_logits``: keep
        every step's logits (``result.step_logits``)."""
        from star_export.runtime import GenerationConfig, generate

        cfg = self.level(keep)
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
        self.check_batch(len(prompts))
        bad = [t for t in stop if not 0 <= int(t) < self.geo.vocab_size]
        if bad:
            raise UsageError(f"--stop {bad[0]}: not a token id of this model (0..{self.geo.vocab_size - 1})")
        feeds = self.pre.encode(images, list(prompts))
        self.check_request(feeds["input_ids"].shape[1], max_new_tokens, cfg.keep2)
        stops = tuple(t for t in (self.pre.eos_token_id, *stop) if t is not None)
        gen = GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stops,
            pad_token_id=self.pre.pad_token_id,
        )
        result = generate(self.backend(cfg.keep2), feeds, self.geo, cfg, gen, keep_logits=keep_logits)
        return Answers([self.pre.decode(t) for t in result.tokens], result, cfg)

    @property
    def max_batch(self) -> int:
        """The most rows one request may hold: the exported profile's max batch (unbounded for the
        PyTorch rewrite of a checkpoint)."""
        return int((self.dims or {}).get("batch", {}).get("max", UNBOUNDED))

    def check_batch(self, rows: int) -> None:
        """A one-line UsageError when ``rows`` prompts exceed the exported profile's max batch."""
        if rows > self.max_batch:
            raise UsageError(
                f"{rows} prompts in one request: the exported profile allows at most {self.max_batch} "
                f"(batch); send them in requests of {self.max_batch}, or re-export with --max-batch {rows}"
            )

    def check_request(
        self, text_len: int, max_new_tokens: int, keep: int | None = None, *, batch: int | None = None
    ) -> None:
        """A one-line UsageError when a prompt of ``text_len`` tokens (after padding), an answer of
        ``max_new_tokens`` or ``batch`` rows lie outside the exported profile at level ``keep``."""
        from star_export.contract import max_new_tokens as room

        if batch is not None:
            self.check_batch(batch)
        cfg = self.level(keep)
        if text_len > self.text_max:
            raise UsageError(
                f"prompt is {text_len} tokens; the exported profile allows at most {self.text_max}"
            )
        if self.dims is not None:
            allowed = room(self.dims, text_len, self.geo.span(cfg.keep1), self.geo.span(cfg.keep2))
            if max_new_tokens > allowed:
                raise UsageError(
                    f"--max-new-tokens {max_new_tokens} exceeds the exported decode profile "
                    f"(at most {allowed} for this prompt)"
                )


def load_export(
    directory: str | Path, runtime: str = "onnxruntime", *, share_weights: bool = True
) -> Pipeline:
    """An export directory (``export``'s ``out``): its graphs in onnxruntime, or (``runtime="torch"``)
    the PyTorch rewrite of the checkpoint its manifest names, with the same levels. onnxruntime:
    every level's prefill session and the one decode session read the same weights, held once in
    memory (``share_weights``; False: each session loads and pre-packs its own copy, as before)."""
    from star_export.contract import contract_from_dict
    from star_export.manifest import levels, read_manifest
    from star_export.preprocess import Preprocessor

    directory = Path(directory)
    manifest = read_manifest(directory)
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    held = levels(manifest, geo, f"--from {directory}")
    graphs = manifest["graphs"]
    decode_dims = {d["name"]: d for d in graphs["decode"]["dynamic_dims"]}
    text_max = next(d["max"] for d in graphs[held[0].graph]["dynamic_dims"] if d["name"] == "text_len")
    pre = Preprocessor.from_dir(directory / "processor", geometry=geo, flag="--from")
    graph_of = {lv.cfg.keep2: lv for lv in held}
    if runtime == "onnxruntime":
        from star_export.runtime import OnnxruntimeBackend
        from star_export.weights import SharedWeights

        if any(t.get("dtype") == "bfloat16" for t in graphs[held[0].graph].get("inputs", [])):
            raise UsageError(
                f"--from {directory}: a bf16 export cannot run in onnxruntime's CPU provider (no bfloat16 "
                "kernels); use --runtime torch, or TensorRT engines on a GPU host"
            )

        shared: dict[str, Any] = {}
        weights = SharedWeights(directory) if share_weights else None

        def backend_for(cfg: StarConfig) -> Any:  # one decode session for every level
            level = graph_of[cfg.keep2]
            backend = OnnxruntimeBackend(
                directory / level.file,
                directory / "decode.onnx",
                decode=shared.get("decode"),
                weights=weights,
            )
            shared.setdefault("decode", backend.decode_session)
            return backend

        where = f"{directory}/ ({', '.join(lv.file for lv in held)} + decode.onnx)"
    elif runtime == "torch":
        from star_export.load import load
        from star_export.runtime import TorchBackend

        loaded = load(manifest["model"]["directory"], options=_layout_options(geo, manifest))
        dc = contract_from_dict(graphs["decode"])

        def backend_for(cfg: StarConfig) -> Any:
            pc = contract_from_dict(graphs[graph_of[cfg.keep2].graph])
            return TorchBackend(loaded.model, geo, cfg, pc, dc)

        where = f"PyTorch rewrite of {loaded.source}"
    else:
        raise UsageError(f"runtime must be onnxruntime or torch, got {runtime!r}")
    model = loaded.model if runtime == "torch" else None
    return Pipeline(backend_for, pre, geo, [lv.cfg for lv in held], where, text_max, decode_dims, model)


def _layout_options(geo: Geometry, manifest: dict[str, Any]) -> dict[str, Any]:
    """The layout options that reproduce the export's geometry when its checkpoint is loaded again."""
    from star_export.families import family_of

    family = family_of(geo)
    recorded = manifest.get("layout") or {}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in recorded.items() if k in family.options}


def load_model(
    model: str | Path | None = None,
    *,
    keep: int | Sequence[int] = 64,
    keep1: int | None = None,
    layer: int = 2,
    recipe: str | Path | None = None,
    grid: tuple[int, int] | None = None,
    image_size: int | tuple[int, int] | None = None,
    selection: str = "star",
) -> Pipeline:
    """A checkpoint (directory, hub id, or None: the shipped trained demo model, ``recipe``: an
    embedded random one) through the PyTorch rewrite;
    ``keep``: one level or several (the first the default); ``selection``: "star" or a baseline
    (``star.SELECTIONS``)."""
    from star_export.contract import decode_contract, prefill_contract
    from star_export.load import (
        DEMO_RECIPE,
        DEMO_SOURCE,
        demo_checkpoint,
        load,
        load_recipe_model,
        resolve_model,
    )
    from star_export.preprocess import Preprocessor
    from star_export.progress import quiet_libraries
    from star_export.recipes import load_recipe
    from star_export.runtime import TorchBackend

    quiet_libraries()
    if model is None and recipe is None:  # the shipped trained demo model
        rec = load_recipe(DEMO_RECIPE)
        loaded = load(demo_checkpoint(), source=DEMO_SOURCE, options=rec.layout)
    elif model is None:
        loaded = load_recipe_model(load_recipe(recipe))
    else:
        model_dir, source = resolve_model(model)
        loaded = load(model_dir, source=source, options={"grid": grid, "image_size": image_size})
    geo = loaded.geometry
    keeps = [keep] if isinstance(keep, int) else list(keep)
    levels = [
        StarConfig.resolve(
            keep=k,
            keep1=keep1,
            layer=layer,
            n_visual=geo.n_visual,
            num_layers=geo.num_layers,
            selection=selection,
        )
        for k in keeps
    ]
    dc = decode_contract(geo, levels, (1, 1, UNBOUNDED), (2, 2, UNBOUNDED), 1 << 20)

    def backend_for(cfg: StarConfig) -> Any:
        return TorchBackend(
            loaded.model, geo, cfg, prefill_contract(geo, cfg, (1, 1, UNBOUNDED), (2, 2, UNBOUNDED)), dc
        )

    pre = Preprocessor.from_dir(loaded.model_dir, geometry=geo)
    return Pipeline(backend_for, pre, geo, levels, f"PyTorch rewrite of {loaded.source}", model=loaded.model)


def load_unpruned(directory: str | Path) -> Pipeline:
    """The unpruned reference of an export: the PyTorch rewrite of the checkpoint its manifest names at
    keep1 = keep2 = N, with the export's layer K and layout options (``load_export``'s torch runtime
    without the pruning)."""
    from star_export.manifest import levels, read_manifest

    manifest = read_manifest(Path(directory))
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    layer = levels(manifest, geo, f"--from {directory}")[0].cfg.layer
    n = geo.n_visual
    options = _layout_options(geo, manifest)
    return load_model(manifest["model"]["directory"], keep=n, keep1=n, layer=layer, **options)
