"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP vision tower, a 2-layer MLP projector and a
Llama-family decoder (Llama/Vicuna, Mistral without sliding window, Qwen2; MHA or GQA).

Static layout: the vision tower's fixed resolution (336 px, patch 14 -> 24 x 24 = N = 576 tokens).
Stage 1 scores ``F = hidden_states[vision_feature_layer]`` without the CLS token
(``vision_feature_select_strategy == "default"``), d = the vision width; the projector maps the kept
features. Positions are 1-D: patch j sits at ``s + j``. Index space: ``stage1_keep_idx`` /
``stage2_keep_idx`` hold patch indices 0..N-1 in raster order (row ``j // 24``, column ``j % 24``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from star_export.errors import UsageError
from star_export.families.base import (
    Family,
    ImageSpan,
    normalisation,
    refuse_sliding_window,
    text_geometry,
    tiny_normalisation,
)
from star_export.geometry import Geometry
from star_export.rewrite import StarPrefill
from star_export.star import StarConfig


def clip_features(vision_tower: Any, pixel_values: torch.Tensor, layer: int, strategy: str) -> torch.Tensor:
    """(B', 3, S, S) -> (B', n, dv): the selected hidden state, CLS dropped for "default"."""
    out = vision_tower(pixel_values, output_hidden_states=True)
    feats = out.hidden_states[layer]  # (B', 1 + n, dv)
    return feats[:, 1:] if strategy == "default" else feats


def llava_geometry(config: Any, **layout: Any) -> Geometry:
    """The LLaVA geometry of a LlavaConfig-like config; ``layout`` overrides the span fields."""
    vc, tc = config.vision_config, config.text_config
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise UsageError(f"vision_feature_select_strategy {strategy!r} is not supported")
    vfl = config.vision_feature_layer
    if not isinstance(vfl, int):
        raise UsageError(f"vision_feature_layer {vfl!r}: only a single layer is supported")
    refuse_sliding_window(tc)
    side = vc.image_size // vc.patch_size
    fields: dict[str, Any] = {
        "n_visual": side * side + (0 if strategy == "default" else 1),
        "image_size": vc.image_size,
        "patch_size": vc.patch_size,
        "image_token_id": int(config.image_token_id),
        "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
        "vision_feature_layer": vfl,
        "select_strategy": strategy,
        **text_geometry(tc),
    }
    return Geometry(**{**fields, **layout})


@torch.no_grad()
def hf_last_logits(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """Last-position logits (V,) of an unmodified transformers model on ``hf_inputs``, positions
    0..L-1 given explicitly (never inferred from the mask)."""
    positions = torch.arange(inputs["input_ids"].shape[1])[None]
    return model(**inputs, position_ids=positions, logits_to_keep=1).logits[0, -1].float()


class LlavaPrefill(StarPrefill):
    """STAR prefill of a LLaVA-1.5 checkpoint: pixel_values (B, 3, S, S)."""

    def __init__(self, model: Any, geometry: Geometry, cfg: StarConfig):
        super().__init__(model, geometry, cfg)
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        geo = self.geo
        return clip_features(self.vision_tower, pixel_values, geo.vision_feature_layer, geo.select_strategy)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        return self.projector(feats)


def read_preprocessor(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "preprocessor_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def tiny_llava_processor(directory: Path, recipe: Any, image_processor: dict[str, Any], anyres: bool) -> None:
    """preprocessor_config.json + a real LlavaProcessor / LlavaNextProcessor around the tiny tokenizer."""
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from star_export.tiny import CHAT_TEMPLATE, IMAGE_TOKEN, tiny_tokenizer

    (directory / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2) + "\n")
    kwargs = {
        k: v for k, v in image_processor.items() if k not in ("image_processor_type", "processor_class")
    }
    processor = (LlavaNextProcessor if anyres else LlavaProcessor)(
        image_processor=(LlavaNextImageProcessorPil if anyres else CLIPImageProcessorPil)(**kwargs),
        tokenizer=tiny_tokenizer(image_token_id=int(recipe.config["image_token_id"])),
        patch_size=recipe.config["vision_config"]["patch_size"],
        vision_feature_select_strategy=recipe.config.get("vision_feature_select_strategy", "default"),
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the CLIP CLS token, as in llava-hf's checkpoints
    )
    processor.save_pretrained(directory)


class Llava(Family):
    name = "llava"
    model_type = "llava"
    architecture = "LlavaForConditionalGeneration"

    def geometry(self, config: Any, **options: Any) -> Geometry:
        return llava_geometry(config)

    def prefill_module(self, model: Any, geo: Geometry, cfg: StarConfig) -> StarPrefill:
        return LlavaPrefill(model, geo, cfg)

    def reference_image(self, model: Any, geo: Geometry, pixel_values: torch.Tensor) -> ImageSpan:
        cfg = model.config
        feats = clip_features(
            model.model.vision_tower,
            pixel_values[None],
            cfg.vision_feature_layer,
            cfg.vision_feature_select_strategy,
        )[0]  # (N, dv)

        def project(kept: list[int]) -> torch.Tensor:
            return model.model.multi_modal_projector(feats[kept][None])[0]

        return ImageSpan(feats, list(range(feats.shape[0])), project)

    def raster_candidates(self, model: Any) -> torch.nn.Module | None:
        return model.model.multi_modal_projector

    def patch_positions(self, model: Any) -> torch.Tensor | None:
        table = model.model.vision_tower.embeddings.position_embedding.weight  # (1 + N, dv), CLS first
        return table[1:]

    def hf_extra(self, geo: Geometry) -> dict[str, Any]:
        """Inputs the unmodified model needs besides pixels and ids (none for LLaVA-1.5)."""
        return {}

    def hf_inputs(
        self, model: Any, geo: Geometry, pixel_values: torch.Tensor, ids: list[int]
    ) -> dict[str, Any]:
        """The prompt with its placeholder expanded to the span's length and an explicit mask."""
        p = ids.index(geo.image_token_id)
        input_ids = torch.tensor([ids[:p] + [geo.image_token_id] * geo.n_positions + ids[p + 1 :]])
        return {
            **self.hf_extra(geo),
            "pixel_values": pixel_values[None],
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
        }

    @torch.no_grad()
    def hf_unpruned_logits(
        self, model: Any, geo: Geometry, pixel_values: torch.Tensor, ids: list[int]
    ) -> torch.Tensor:
        """The unmodified model on the expanded prompt, explicit mask and positions (never inferred)."""
        return hf_last_logits(model, self.hf_inputs(model, geo, pixel_values, ids))

    def image_spec(self, model_dir: Path, geo: Geometry) -> dict[str, Any]:
        pre = read_preprocessor(model_dir)
        return {
            "kind": "processor",
            "processor": "auto",
            "image_token": "<image>",
            "processor_kwargs": {},
            "size": geo.image_size,
            "resize_shortest_edge": (pre.get("size") or {}).get("shortest_edge", geo.image_size),
            "center_crop": pre.get("do_center_crop", True),
            **normalisation(pre),
            "layout": "NCHW, RGB",
        }

    tiny_anyres = False  # the tiny processor's chat/processor files: LLaVA-NeXT's anyres ones or not

    def tiny_image_processor(self, recipe: Any) -> dict[str, Any]:
        """preprocessor_config.json of an embedded recipe: CLIP's resize, centre crop and normalisation."""
        size = recipe.image["size"]
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": size},
            "do_center_crop": True,
            "crop_size": {"height": size, "width": size},
            **tiny_normalisation(recipe),
        }

    def write_tiny_processor(self, directory: Path, recipe: Any) -> None:
        tiny_llava_processor(directory, recipe, self.tiny_image_processor(recipe), anyres=self.tiny_anyres)

    def pixel_doc(self, geo: Geometry) -> str:
        return "image, resized/cropped to the model's size and normalised with the manifest's mean/std"

    def index_space(self, geo: Geometry) -> str:
        side = geo.image_size // geo.patch_size
        if geo.select_strategy == "full":
            return (
                f"index 0 is the CLS token, index j in 1..{geo.n_visual - 1} the patch j - 1 of the vision "
                f"tower's {side}x{side} grid in raster order"
            )
        return (
            f"patch index j in 0..{geo.n_visual - 1}: the vision tower's {side}x{side} patch grid in raster "
            f"order (row j // {side}, column j % {side})"
        )


FAMILY = Llava()
