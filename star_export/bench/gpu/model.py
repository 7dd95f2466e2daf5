"""The benchmarked model: LLaVA-1.5-7B's widths (also ``tools/measure_export_memory.py``'s
checkpoints) or llava-tiny's at ``TINY_IMAGE`` px, built with random weights directly on the device."""

from __future__ import annotations

from typing import Any

import torch

# llava-hf/llava-1.5-7b-hf geometry
VISION = dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
TEXT_7B = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=32001,
)
IMAGE_TOKEN_ID = 32000
TINY_IMAGE = 112  # --tiny: a 8 x 8 patch grid, N = 64 (fp16 on a small CPU is slow)


def llava_7b_config(layers: int = 32) -> Any:
    """A ``LlavaConfig`` at llava-hf/llava-1.5-7b-hf's widths with ``layers`` decoder layers (32: the real one)."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=dict(VISION),
        text_config=dict(TEXT_7B, num_hidden_layers=layers),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=576,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=32001,
        tie_word_embeddings=False,
    )


def model_config(tiny: bool, layers: int | None) -> Any:
    """The LlavaConfig benchmarked: LLaVA-1.5-7B's widths, or llava-tiny's at ``TINY_IMAGE`` px."""
    if tiny:
        from transformers import LlavaConfig

        from star_export.recipes import load_recipe

        config = LlavaConfig(**load_recipe("llava-tiny").config)
        config.vision_config.image_size = TINY_IMAGE
        config.image_seq_length = (TINY_IMAGE // config.vision_config.patch_size) ** 2
        if layers is not None:
            config.text_config.num_hidden_layers = layers
        return config
    return llava_7b_config(32 if layers is None else layers)


def build_model(config: Any, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """LlavaForConditionalGeneration with random weights created on ``device`` in ``dtype``."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)
