"""The ``Family`` interface: everything star_export knows about one model family, in one place.

A family module (``families/llava.py``, ...) defines one subclass and one instance, ``FAMILY``;
``families/__init__.py`` lists them. Generic code (loading, contract, export, validation, runtime,
Triton, C++) only calls these methods and never names a family. In short, a family:

1. recognises a checkpoint (``model_type``, ``architecture``) and refuses what it cannot export
   (``check_config``);
2. computes the static ``Geometry`` from the config and the layout ``options`` it takes;
3. builds the exported modules (``prefill_module`` / ``decode_module``: ``rewrite.StarPrefill``
   subclasses with its static vision forward, span layout and position ids);
4. runs the dynamic reference and the unmodified model (``reference_image`` / ``full_positions`` /
   ``hf_unpruned_logits``), written independently of its rewrite;
5. describes pre-processing (``image_spec``: the manifest's ``image`` section that drives
   ``encoding.pixel_values`` locally and in Triton) and writes a tiny checkpoint's processor;
6. documents its ``pixel_values`` layout and its kept-index space (``pixel_doc``, ``index_space``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from star_export.errors import UsageError
from star_export.geometry import Geometry

# Llama-family text decoders (q/k/v/o + RoPE + RMSNorm pre-norm), each tested (tests/test_rewrite.py)
LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2"})


@dataclass
class ImageSpan:
    """One image as the dynamic reference sees it.

    ``features``: (N, d) stage-1 candidates in index order (the features stage 1 scores);
    ``slots``: the unpruned visual span, slot by slot: a candidate index, or None for a structural
    token (never scored, always kept); ``project(kept)`` -> (len(kept), D) embeddings of the kept
    candidates; ``structural``: the embedding of a structural slot (or None).
    """

    features: torch.Tensor
    slots: list[int | None]
    project: Any  # Callable[[list[int]], torch.Tensor]
    structural: torch.Tensor | None = None
    extras: Any = None  # anything else the layers need per candidate (DeepStack levels)


@dataclass
class RefSpan:
    """The visual span of one row inside the reference's current sequence: its first index, the
    (offset in the unpruned span, candidate or None) of each slot, and ``ImageSpan.extras``."""

    start: int
    slots: list[tuple[int, int | None]]
    extras: Any = None


class Family:
    """One model family. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]  # the manifest's "arch", e.g. "llava_next"
    model_type: ClassVar[str]  # config.json "model_type" it loads
    architecture: ClassVar[str]  # the transformers class
    options: ClassVar[frozenset[str]] = frozenset()  # layout options it takes: "grid", "image_size"
    text_models: ClassVar[frozenset[str] | None] = LLAMA_FAMILY  # text decoders it runs (None: its own)
    # The decode graph needs each cached slot's ORIGINAL position (a sliding window counted in original
    # positions): the prefill then outputs ``present_positions_l1`` / ``_l2`` and the decode graph takes
    # ``past_positions_l1`` / ``_l2`` and returns them with the new token's appended (``contract``).
    slot_positions: ClassVar[bool] = False

    # ---- 1. recognise the checkpoint ---------------------------------------------------------------
    def check_config(self, cfg: dict[str, Any], where: str) -> None:
        """Refuse (UsageError) what this family cannot export, from config.json alone."""
        if self.text_models is None:
            return
        text_type = (cfg.get("text_config") or {}).get("model_type", "llama")
        if text_type not in self.text_models:
            raise UsageError(
                f"{where}: text model {text_type!r} is not supported; supported: {sorted(self.text_models)}"
            )

    def expectations(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """Config values a recipe's ``[expect]`` table may pin (generic names)."""
        vc, tc = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
        return {
            "image_seq_length": cfg.get("image_seq_length"),
            "vision_image_size": vc.get("image_size"),
            "vision_patch_size": vc.get("patch_size"),
            "text_model_type": tc.get("model_type"),
            "text_num_hidden_layers": tc.get("num_hidden_layers"),
        }

    # ---- 2. static geometry -------------------------------------------------------------------------
    def geometry(self, config: Any, **options: Any) -> Geometry:
        raise NotImplementedError

    def checkpoint_options(self, model_dir: Path) -> dict[str, Any]:
        """Layout options the checkpoint's own files imply where no flag sets them (a processor
        that admits one resolution only); default none."""
        return {}

    def check_layout(self, model_dir: Path, geo: Geometry) -> None:
        """Refuse (UsageError) a static layout the checkpoint's processor files rule out; default none."""

    def check_profile(self, config: Any, geo: Geometry, longest: int) -> None:
        """Refuse (UsageError) an export profile the graphs cannot serve exactly; ``longest`` is the
        longest sequence it admits in original positions (text_len max - 1 + n_positions +
        max_new_tokens). Default none."""

    # ---- 3. the exported modules ----------------------------------------------------------------
    def prefill_module(self, model: Any, geo: Geometry, cfg: Any) -> torch.nn.Module:
        raise NotImplementedError

    def decode_module(self, model: Any, geo: Geometry, cfg: Any) -> torch.nn.Module:
        from star_export.rewrite import StarDecode

        return StarDecode(model, geo, cfg)

    # ---- 4. the dynamic reference and the unmodified model ----------------------------------------
    def reference_image(self, model: Any, geo: Geometry, pixel_values: torch.Tensor) -> ImageSpan:
        """One image (``pixel_values`` without the batch dim) through HF's own modules."""
        raise NotImplementedError

    def full_positions(
        self, model: Any, geo: Geometry, pixel_values: torch.Tensor, ids: list[int]
    ) -> torch.Tensor:
        """Position ids (A, L) of the UNPRUNED prompt (placeholder expanded to the whole span), as the
        unmodified model computes them; A = ``geo.position_axes``. Default: 0..L-1."""
        length = len(ids) - 1 + geo.n_positions
        return torch.arange(length)[None]

    def hf_unpruned_logits(
        self, model: Any, geo: Geometry, pixel_values: torch.Tensor, ids: list[int]
    ) -> torch.Tensor:
        """Last-position logits (V,) of the unmodified transformers model on the expanded prompt."""
        raise NotImplementedError

    def hf_inputs(
        self, model: Any, geo: Geometry, pixel_values: torch.Tensor, ids: list[int]
    ) -> dict[str, Any] | None:
        """The unmodified model's ``generate`` inputs for one prompt row (``pixel_values`` of its one
        image, ``ids`` without padding), the placeholder expanded as the family's processor expands
        it; None where the family does not provide them (``eval`` then checks an export's unpruned
        answers only against an exported keep = N level)."""
        return None

    @property
    def has_hf_inputs(self) -> bool:
        return type(self).hf_inputs is not Family.hf_inputs

    def reference_layer(
        self,
        model: Any,
        geo: Geometry,
        i: int,
        layer: Any,
        h: torch.Tensor,
        pos: torch.Tensor,
        cache: Any,
        span: RefSpan,
    ) -> torch.Tensor:
        """The reference's decoder layer ``i`` on one row h (1, L, D) at positions ``pos`` (A, L), through
        HF's own layer (its attention module is hooked for stage 2), with ``cache`` (a DynamicCache).
        Default: a causal mask and the text model's rotary embedding."""
        lm = model.model.language_model
        length = h.shape[1]
        causal = torch.full((length, length), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)[None, None]
        cos_sin = lm.rotary_emb(h, pos[:, None, :] if pos.shape[0] > 1 else pos)
        out = layer(h, attention_mask=causal, cache=cache, use_cache=True, position_embeddings=cos_sin)
        return out[0] if isinstance(out, tuple) else out

    # ---- 5. pre-processing ------------------------------------------------------------------------
    def image_spec(self, model_dir: Path, geo: Geometry) -> dict[str, Any]:
        """The manifest's ``image`` section (see ``encoding``): how pixel_values are made."""
        raise NotImplementedError

    def write_tiny_processor(self, directory: Path, recipe: Any) -> None:
        """Processor files of an embedded recipe's checkpoint (preprocessor config, tokenizer)."""
        raise NotImplementedError

    def tiny_weights(self, model: Any) -> None:
        """Seeded values, for an embedded recipe's random model, where transformers initialises
        weights to constants that would make a tiny model degenerate (runs under the recipe's seed,
        before ``save_pretrained``). Default: nothing."""

    def raster_candidates(self, model: Any) -> torch.nn.Module | None:
        """The module whose first input holds a batch's stage-1 candidates in raster order (row by
        row over the token grid: (B, N, dv), or flat rows that reshape to (B, N, candidate_width)),
        and whose output is the image embeddings in the same order; None where they are not laid
        out so. The demo training hooks it for its dense per-token target (``demo/train.py``).
        Default: None."""
        return None

    def candidate_width(self, model: Any) -> int:
        """The width of one stage-1 candidate as ``raster_candidates``' input holds it per visual
        token. Default: the vision tower's hidden size."""
        return int(model.config.vision_config.hidden_size)

    def patch_positions(self, model: Any) -> torch.Tensor | None:
        """The vision tower's learned position embeddings of a square grid (side * side, dv) in raster
        order, as a view of the parameter (a class token's row left out), or None where positions
        are not a learned table (rotary ones). The demo training starts them from a 2-D sine-cosine
        table (``demo/train.py``, ``TrainConfig.position_init``). Default: None."""
        return None

    # ---- 6. documentation ---------------------------------------------------------------------------
    def pixel_doc(self, geo: Geometry) -> str:
        return "image pixels as the checkpoint's image processor lays them out"

    def index_space(self, geo: Geometry) -> str:
        """What an index of ``stage1_keep_idx`` / ``stage2_keep_idx`` names."""
        raise NotImplementedError

    def describe(self, geo: Geometry) -> str:
        """One line of the static layout for progress output."""
        return f"N={geo.n_visual}"


def text_geometry(tc: Any) -> dict[str, Any]:
    """The Geometry fields read from a text config (every family)."""
    return {
        "num_layers": tc.num_hidden_layers,
        "num_heads": tc.num_attention_heads,
        "num_kv_heads": tc.num_key_value_heads,
        "hidden_size": tc.hidden_size,
        "vocab_size": tc.vocab_size,
        "text_model_type": tc.model_type,
    }


def refuse_sliding_window(tc: Any) -> None:
    """The exported attention is global: refuse text models that use a sliding window."""
    window = getattr(tc, "sliding_window", None)
    uses = getattr(tc, "use_sliding_window", tc.model_type == "mistral")
    if (window is not None and uses) or "sliding_attention" in (getattr(tc, "layer_types", None) or []):
        raise UsageError(
            f"text model {tc.model_type} uses sliding-window attention (window {window}); not supported "
            "(the exported attention is global)"
        )


def normalisation(pre: dict[str, Any]) -> dict[str, Any]:
    """Rescale / mean / std of a preprocessor_config.json (CLIP's defaults where absent)."""
    return {
        "rescale_factor": pre.get("rescale_factor", 1 / 255),
        "mean": pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),
        "std": pre.get("image_std", [0.26862954, 0.26130258, 0.27577711]),
    }


def tiny_normalisation(recipe: Any) -> dict[str, Any]:
    """The preprocessor_config.json keys of an embedded recipe's [image] table."""
    image = recipe.image
    return {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": image["mean"],
        "image_std": image["std"],
        "do_convert_rgb": True,
    }
