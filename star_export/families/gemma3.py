"""Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP vision tower at a fixed resolution, an
average-pooling projector and a Gemma 3 text decoder whose image tokens attend to each other
bidirectionally and whose layers alternate sliding-window and global attention.

Static layout: the vision tower's fixed resolution (896 px, patch 14 -> 64 x 64 patches on the real
checkpoints), no layout options. ``Gemma3MultiModalProjector`` average-pools the patch grid down to
``mm_tokens_per_image`` = t x t tokens (real: 16 x 16 = 256, kernel 4), normalises them with
``mm_soft_emb_norm`` (Gemma RMSNorm, ``1 + weight``) and maps them with ``mm_input_projection_weight``.

STAR
----
- Stage 1 scores the POOLED features, ``F [B, N, d]`` with N = t * t and d = the vision width: the
  tower's ``last_hidden_state`` (after ``post_layernorm``) average-pooled exactly as the projector
  does, BEFORE ``mm_soft_emb_norm`` (the norm belongs to the projector). ``project`` applies the
  norm and the linear map to the kept pooled tokens (both act per token, so gather-then-project
  equals project-then-gather).
- The prompt: ``Gemma3Processor`` replaces the chat template's ``<start_of_image>`` by
  ``"\\n\\n<start_of_image>" + <image_soft_token> * N + "<end_of_image>\\n\\n"``. The export's
  prompts hold ONE ``<image_soft_token>`` (``config.image_token_id``) instead of N: the manifest's
  image section says so as data (``image_marker``, carried out by ``encoding.encode_prompts``), and
  ``<start_of_image>`` / ``<end_of_image>`` are ordinary text tokens around the placeholder. So the
  visual span is the N content tokens alone (``n_fixed = 0``), 1-D positions, ``n_positions = N``:
  text after the image continues at ``s + N`` as in the unpruned model.
- Index space: pooled token j of the t x t grid in raster order (row j // t, column j % t), each
  the mean of a k x k block of patches (k = patches per side / t).

What the pruned attention mask becomes
--------------------------------------
transformers builds, for the expanded prompt (``create_masks_for_vision_model``): global layers
``causal OR same-image block``; sliding layers ``(causal OR same-image block) AND q - k < window``;
padding keys masked. The rewrite keeps that rule on the pruned sequence (``attention_masks``):
causal over sequence order, PLUS bidirectional attention among the KEPT image tokens of the row's
image (the span: keep1 slots before layer K, keep2 from K on; dropped tokens are simply absent as
keys and queries), padding keys masked, and for sliding layers the window counted in ORIGINAL
positions (``pos_q - pos_k < sliding_window``, the unpruned model's distance).

The decode step applies the same window. The 0/1 decode masks cannot say how far behind a cached
slot lies (after pruning, slot distance is not position distance), so the family sets
``slot_positions``: the prefill also outputs each cached slot's original position
(``present_positions_l1`` (B, L1), ``present_positions_l2`` (B, L2), -1 at left padding), and the
decode graph takes them as ``past_positions_l1`` / ``_l2`` and returns them with the new token's
``position_ids`` appended, carried from step to step like the key/value caches (``contract.carried``).
Global layers use the generic decode mask; sliding layers also mask every slot with
``pos_new - pos_slot >= sliding_window`` (``window_ok``, the prefill's rule). So decode is exact at
any length: no profile limit, long answers and long chats past the window.

Decoder (``run_layer``): Gemma 3's block, ``h + post_attention_layernorm(attn(input_layernorm(h)))``
then ``h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``; q_norm / k_norm per head
before RoPE, ``query_pre_attn_scalar ** -0.5`` scaling (the attention module's ``scaling``), the
scaled word embedding (the embedding module scales), RoPE per layer type (``rotary``: the local base
for sliding layers, the global one, with its scaling, for full layers: the text model's own
``Gemma3RotaryEmbedding``). ``Gemma3ForConditionalGeneration`` applies no final logit softcapping
(only the text-only ``Gemma3ForCausalLM`` does) and ``Gemma3Attention`` passes no
``attn_logit_softcapping`` to its attention function: the export follows the unmodified model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from star_export.errors import UsageError
from star_export.families.base import Family, ImageSpan, RefSpan, normalisation, text_geometry
from star_export.families.llava import FAMILY as LLAVA
from star_export.families.llava import hf_last_logits
from star_export.geometry import Geometry
from star_export.rewrite import Span, StarDecode, StarPrefill, TextLayers, decoder_attention
from star_export.star import StarConfig

# the real Gemma 3 tokenizer's image tokens (tokenizer_config.json names them; these are the defaults)
BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
# RoPE types with constant inverse frequencies (real Gemma 3: linear scaling on the global layers)
ROPE_TYPES = frozenset({"default", "linear"})

# Gemma 3's chat template as google/gemma-3-*-it publish it (and transformers' Gemma 3 processor
# tests quote it), the whitespace between its tags dropped: the image is written as
# <start_of_image>, which Gemma3Processor expands.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def pooled_side(config: Any) -> tuple[int, int]:
    """(patches per side, pooled tokens per side) of a Gemma3Config, as the projector computes them."""
    vc = config.vision_config
    patches = int(vc.image_size // vc.patch_size)
    side = int(config.mm_tokens_per_image**0.5)
    if side * side != config.mm_tokens_per_image or side < 1 or patches % side:
        raise UsageError(
            f"mm_tokens_per_image {config.mm_tokens_per_image}: must be a square t*t whose side divides the "
            f"{patches}x{patches} patch grid"
        )
    return patches, side


def pool_patches(projector: nn.Module, hidden: torch.Tensor, patches: int) -> torch.Tensor:
    """The projector's average pooling, as Gemma3MultiModalProjector.forward writes it.

    hidden: (B, patches*patches, dv) the tower's last_hidden_state -> (B, t*t, dv) in raster order."""
    b, _, dv = hidden.shape
    grid = hidden.transpose(1, 2).reshape(b, dv, patches, patches).contiguous()  # (B, dv, P, P)
    return projector.avg_pool(grid).flatten(2).transpose(1, 2)  # (B, t*t, dv)


def window_ok(pos_q: torch.Tensor, pos_k: torch.Tensor, window: int) -> torch.Tensor:
    """Query-key pairs within a sliding window counted in original positions: pos_q - pos_k < window.
    pos_q: (B, Lq), pos_k: (B, Lk) -> (B, Lq, Lk) bool [b, q, k]"""
    return (pos_q.unsqueeze(2) - pos_k.unsqueeze(1)) < window


# ---------------------------------------------------------------------------- the exported modules


class Gemma3Text(TextLayers):
    """Gemma 3's decoder layers and per-layer-type RoPE, shared by the prefill and the decode step."""

    def bind_gemma(self, model: nn.Module) -> None:
        tc = model.config.text_config
        self.layer_types: tuple[str, ...] = tuple(tc.layer_types)
        self.window = int(tc.sliding_window) if tc.sliding_window else None

    def rotary(self, h: torch.Tensor, pos: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin (B, L, hd) per layer type: the local base for sliding layers, the global one for full."""
        return {kind: self.rotary_emb(h, pos, kind) for kind in sorted(set(self.layer_types))}

    def run_layer(
        self,
        i: int,
        layer: nn.Module,
        h: torch.Tensor,
        rope: Any,
        mask: Any,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gemma3DecoderLayer: four norms (input, post-attention, pre- and post-feedforward)."""
        kind = self.layer_types[i]
        cos, sin = rope[kind]
        m = mask[kind] if isinstance(mask, dict) else mask  # one mask for both kinds: no sliding layer
        a, k, v, probs = decoder_attention(
            layer.self_attn, layer.input_layernorm(h), cos, sin, m, self.geo.head_dim, past
        )
        h = h + layer.post_attention_layernorm(a)
        h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        return h, k, v, probs


class Gemma3Prefill(Gemma3Text, StarPrefill):
    """STAR prefill of Gemma 3: pixel_values (B, 3, S, S), input_ids / attention_mask (B, T)."""

    def __init__(self, model: nn.Module, geometry: Geometry, cfg: StarConfig):
        super().__init__(model, geometry, cfg)
        self.bind_gemma(model)
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.patches = int(self.projector.patches_per_image)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """F: (B, 3, S, S) -> (B, N, dv), the pooled tokens before mm_soft_emb_norm."""
        hidden = self.vision_tower(pixel_values=pixel_values).last_hidden_state  # (B, P*P, dv)
        return pool_patches(self.projector, hidden, self.patches)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """mm_soft_emb_norm then the linear map, per kept token: (B, n, dv) -> (B, n, D)."""
        normed = self.projector.mm_soft_emb_norm(feats)
        return torch.matmul(normed, self.projector.mm_input_projection_weight).type_as(feats)

    def attention_masks(self, valid: torch.Tensor, pos: torch.Tensor, span: Span) -> dict[str, torch.Tensor]:
        """Additive masks (B, 1, L, L) float32 per layer type: causal OR both in the kept image span,
        padding keys masked; sliding layers also within the window in original positions."""
        length = valid.shape[1]
        slot = torch.arange(length, device=valid.device).unsqueeze(0)  # (1, L)
        start = span.start.unsqueeze(1)  # (B, 1)
        in_image = (slot >= start) & (slot < start + span.length)  # (B, L)
        block = in_image.unsqueeze(2) & in_image.unsqueeze(1)  # (B, L, L) image query, image key
        causal = slot.unsqueeze(2) >= slot.unsqueeze(1)  # (1, L, L)
        allowed = (causal | block) & valid.unsqueeze(1)  # (B, L, L)
        zero = torch.zeros((), dtype=torch.float32, device=valid.device)
        neg = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32, device=valid.device)
        masks = {"full_attention": torch.where(allowed, zero, neg).unsqueeze(1)}
        if "sliding_attention" in self.layer_types:
            near = allowed & window_ok(pos, pos, self.window) if self.window else allowed
            masks["sliding_attention"] = torch.where(near, zero, neg).unsqueeze(1)
        return masks


class Gemma3Decode(Gemma3Text, StarDecode):
    """One decode step: RoPE per layer type, the generic mask for global layers and, for sliding
    layers, the window in original positions from the carried slot positions."""

    def __init__(self, model: nn.Module, geometry: Geometry, cfg: StarConfig):
        super().__init__(model, geometry, cfg)
        self.bind_gemma(model)

    def decode_masks(
        self,
        mask_l1: torch.Tensor,
        mask_l2: torch.Tensor,
        position_ids: torch.Tensor,
        slot_pos: tuple[torch.Tensor, ...],
    ) -> tuple[Any, Any]:
        """Per group (layers < K, >= K) additive masks (B, 1, 1, P + 1) float32 per layer type: padding
        masked; sliding layers also ``position_ids - slot position < sliding_window``."""
        if len(slot_pos) != 2:  # a decode contract without past_positions_l1/_l2 (an older export)
            raise ValueError("Gemma 3 decode needs past_positions_l1 / past_positions_l2: re-export")
        out = []
        for mask, pos in zip((mask_l1, mask_l2), slot_pos, strict=True):
            allowed = mask.to(torch.bool).unsqueeze(1)  # (B, 1, P + 1)
            zero = torch.zeros((), dtype=torch.float32, device=mask.device)
            neg = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32, device=mask.device)
            masks = {"full_attention": torch.where(allowed, zero, neg).unsqueeze(1)}
            if "sliding_attention" in self.layer_types:
                near = allowed & window_ok(position_ids, pos, self.window) if self.window else allowed
                masks["sliding_attention"] = torch.where(near, zero, neg).unsqueeze(1)
            out.append(masks)
        return out[0], out[1]


# ---------------------------------------------------------------------------- the family


class Gemma3(Family):
    name = "gemma3"
    model_type = "gemma3"
    architecture = "Gemma3ForConditionalGeneration"
    text_models = frozenset({"gemma3_text"})
    slot_positions = True  # the decode graph's sliding layers need each cached slot's original position

    # ---- 1. recognise ---------------------------------------------------------------------------
    def check_config(self, cfg: dict[str, Any], where: str) -> None:
        super().check_config(cfg, where)
        vc, tc = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
        vision = vc.get("model_type", "siglip_vision_model")
        if vision != "siglip_vision_model":
            raise UsageError(
                f"{where}: vision model {vision!r} is not supported; supported: siglip_vision_model"
            )
        if tc.get("use_bidirectional_attention"):
            raise UsageError(
                f"{where}: use_bidirectional_attention (text tokens attending bidirectionally) is not supported"
            )
        ropes = tc.get("rope_parameters") or {}
        ropes = {"all layers": ropes} if "rope_type" in ropes else dict(ropes)  # flat: one for all
        if isinstance(tc.get("rope_scaling"), dict):  # the older key: the global layers' scaling
            ropes["rope_scaling"] = tc["rope_scaling"]
        for kind, params in ropes.items():
            params = params if isinstance(params, dict) else {}
            rope = params.get("rope_type", params.get("type", "default"))
            if rope not in ROPE_TYPES:
                raise UsageError(
                    f"{where}: rope_type {rope!r} ({kind}) is not supported; supported: {sorted(ROPE_TYPES)}"
                )

    def expectations(self, cfg: dict[str, Any]) -> dict[str, Any]:
        return {**super().expectations(cfg), "image_seq_length": cfg.get("mm_tokens_per_image")}

    # ---- 2. static geometry ---------------------------------------------------------------------
    def geometry(self, config: Any, **options: Any) -> Geometry:
        vc, tc = config.vision_config, config.text_config
        _, side = pooled_side(config)
        image_token_id = int(config.image_token_id)
        if image_token_id >= tc.vocab_size:  # the graph embeds the placeholder before replacing it
            raise UsageError(
                f"image_token_id {image_token_id} is outside the text vocabulary ({tc.vocab_size} ids)"
            )
        return Geometry(
            n_visual=side * side,
            image_size=int(vc.image_size),
            patch_size=int(vc.patch_size),
            image_token_id=image_token_id,
            head_dim=int(tc.head_dim),
            vision_feature_layer=-1,  # last_hidden_state (after post_layernorm)
            select_strategy="full",  # SigLIP has no CLS token
            **text_geometry(tc),
            arch=self.name,
            pixel_shape=(3, int(vc.image_size), int(vc.image_size)),
            n_fixed=0,
            n_positions=side * side,
            grid=(side, side),
            slot_positions=self.slot_positions,
        )

    def check_layout(self, model_dir: Path, geo: Geometry) -> None:
        """The checkpoint's image processor must resize to the tower's resolution."""
        size = read_json(Path(model_dir) / "preprocessor_config.json").get("size") or {}
        hw = (size.get("height"), size.get("width"))
        if hw != (None, None) and hw != (geo.image_size, geo.image_size):
            raise UsageError(
                f"the checkpoint's image processor resizes to {hw[0]}x{hw[1]}, the vision tower takes "
                f"{geo.image_size}x{geo.image_size} (preprocessor_config.json size)"
            )

    # ---- 3. the exported modules ----------------------------------------------------------------
    def prefill_module(self, model: Any, geo: Geometry, cfg: StarConfig) -> StarPrefill:
        return Gemma3Prefill(model, geo, cfg)

    def decode_module(self, model: Any, geo: Geometry, cfg: StarConfig) -> StarDecode:
        return Gemma3Decode(model, geo, cfg)

    # ---- 4. the dynamic reference and the unmodified model --------------------------------------
    def reference_image(self, model: Any, geo: Geometry, pixel_values: torch.Tensor) -> ImageSpan:
        """HF's own get_image_features on the one image; F = the input of mm_soft_emb_norm (captured by
        a hook), the kept tokens' embeddings = rows of HF's projector output."""
        captured: dict[str, torch.Tensor] = {}

        def grab(_module: Any, args: tuple, _output: Any) -> None:
            captured["pooled"] = args[0]

        handle = model.model.multi_modal_projector.mm_soft_emb_norm.register_forward_hook(grab)
        try:
            embeds = model.model.get_image_features(pixel_values[None]).pooler_output[0]  # (N, D)
        finally:
            handle.remove()
        feats = captured["pooled"][0]  # (N, dv)
        return ImageSpan(feats, list(range(feats.shape[0])), lambda kept: embeds[kept])

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
        """HF's Gemma3DecoderLayer on one row with its own mask: causal, the kept image slots
        all-to-all, and for sliding layers ``pos_q - pos_k < sliding_window`` in original positions."""
        tc = model.config.text_config
        kind = tc.layer_types[i]
        length = h.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool).tril()
        first, last = span.start, span.start + len(span.slots)
        allowed[first:last, first:last] = True  # one image: its kept tokens see each other
        if kind == "sliding_attention":
            p = pos[0]
            allowed &= (p[:, None] - p[None, :]) < tc.sliding_window
        mask = torch.zeros(length, length, dtype=h.dtype).masked_fill(~allowed, torch.finfo(h.dtype).min)
        cos_sin = model.model.language_model.rotary_emb(h, pos, kind)
        out = layer(
            h, attention_mask=mask[None, None], cache=cache, use_cache=True, position_embeddings=cos_sin
        )
        return out[0] if isinstance(out, tuple) else out

    def hf_inputs(
        self, model: Any, geo: Geometry, pixel_values: torch.Tensor, ids: list[int]
    ) -> dict[str, Any]:
        """LLaVA's inputs (the placeholder expanded to N soft tokens, an explicit mask) plus the
        processor's token_type_ids, 1 on the image tokens: what makes transformers build the
        bidirectional image block."""
        p = ids.index(geo.image_token_id)
        types = [0] * p + [1] * geo.n_visual + [0] * (len(ids) - p - 1)
        return {**LLAVA.hf_inputs(model, geo, pixel_values, ids), "token_type_ids": torch.tensor([types])}

    def hf_unpruned_logits(
        self, model: Any, geo: Geometry, pixel_values: torch.Tensor, ids: list[int]
    ) -> torch.Tensor:
        """The unmodified model on ``hf_inputs``, positions 0..L-1."""
        return hf_last_logits(model, self.hf_inputs(model, geo, pixel_values, ids))

    # ---- 5. pre-processing ----------------------------------------------------------------------
    def image_tokens(self, model_dir: Path) -> tuple[str, str, str]:
        """(boi, eoi, image soft token) as the checkpoint's tokenizer_config.json names them."""
        tok = read_json(Path(model_dir) / "tokenizer_config.json")
        extra = tok.get("extra_special_tokens") or {}
        extra = extra if isinstance(extra, dict) else {}

        def name(key: str, default: str) -> str:
            value = tok.get(key) or extra.get(key) or default
            return value["content"] if isinstance(value, dict) else str(value)

        return name("boi_token", BOI), name("eoi_token", EOI), name("image_token", SOFT)

    def image_spec(self, model_dir: Path, geo: Geometry) -> dict[str, Any]:
        pre = read_json(Path(model_dir) / "preprocessor_config.json")
        boi, eoi, soft = self.image_tokens(model_dir)
        return {
            "kind": "processor",
            "processor": "auto",
            "image_token": soft,
            # Gemma3Processor's full_image_sequence with ONE soft token instead of N
            "image_marker": {"marker": boi, "text": f"\n\n{boi}{soft}{eoi}\n\n"},
            "processor_kwargs": {"do_pan_and_scan": False},
            "size": geo.image_size,
            "resize": f"bilinear to {geo.image_size}x{geo.image_size} (aspect ratio not kept), no pan and scan",
            **normalisation(pre),
            "layout": "NCHW, RGB",
        }

    def write_tiny_processor(self, directory: Path, recipe: Any) -> None:
        """preprocessor_config.json + a real Gemma3Processor around the tiny tokenizer, with Gemma 3's
        image tokens (<start_of_image>, <end_of_image>, <image_soft_token>) and turn markers added
        as special tokens at the ids the recipe's config names."""
        from tokenizers import AddedToken
        from transformers import Gemma3Processor, PreTrainedTokenizerFast
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        from star_export.tiny import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, tiny_tokenizer

        config, image = recipe.config, recipe.image
        backend = tiny_tokenizer(vocab_size=1000, image_token_id=1000).backend_tokenizer
        added = [BOI, EOI, SOFT, "<start_of_turn>", "<end_of_turn>"]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
        want = {
            BOI: config["boi_token_index"],
            EOI: config["eoi_token_index"],
            SOFT: config["image_token_index"],
        }
        got = {t: backend.token_to_id(t) for t in want}
        if got != want:
            raise ValueError(f"the tiny tokenizer puts the image tokens at {got}, the recipe says {want}")
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=PAD_TOKEN,
            extra_special_tokens={"image_token": SOFT, "boi_token": BOI, "eoi_token": EOI},
            padding_side="left",
        )
        size = image["size"]
        pre = {
            "image_processor_type": "Gemma3ImageProcessor",
            "do_resize": True,
            "size": {"height": size, "width": size},
            "resample": 2,  # bilinear, as the real checkpoints
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": image["mean"],
            "image_std": image["std"],
            "do_convert_rgb": True,
            "do_pan_and_scan": False,
        }
        (directory / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
        kwargs = {k: v for k, v in pre.items() if k != "image_processor_type"}
        processor = Gemma3Processor(
            image_processor=Gemma3ImageProcessorPil(**kwargs),
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
            image_seq_length=int(config["mm_tokens_per_image"]),
        )
        processor.save_pretrained(directory)

    def tiny_weights(self, model: Any) -> None:
        """transformers initialises the projection to zeros and every Gemma RMSNorm weight to zeros
        (scale 1 + 0): give them seeded values so a random tiny model's image matters."""
        with torch.no_grad():
            proj = model.model.multi_modal_projector.mm_input_projection_weight
            proj.normal_(0.0, 0.05)
            for module in model.modules():
                if type(module).__name__ == "Gemma3RMSNorm":
                    module.weight.normal_(0.0, 0.1)

    # ---- 6. documentation -----------------------------------------------------------------------
    def pixel_doc(self, geo: Geometry) -> str:
        return (
            f"one image resized to {geo.image_size}x{geo.image_size} (bilinear, aspect ratio not kept) and "
            "normalised with the manifest's mean/std (Gemma3ImageProcessor, no pan and scan)"
        )

    def index_space(self, geo: Geometry) -> str:
        side = geo.grid[0]
        k = geo.image_size // geo.patch_size // side
        return (
            f"pooled token index j in 0..{geo.n_visual - 1}: the {side}x{side} grid of average-pooled "
            f"{k}x{k} patch blocks in raster order (row j // {side}, column j % {side})"
        )

    def describe(self, geo: Geometry) -> str:
        side = geo.grid[0]
        return f"N={geo.n_visual} ({side}x{side} pooled tokens at {geo.image_size} px)"


FAMILY = Gemma3()
