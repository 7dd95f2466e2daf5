"""Stage 1 of the data's way: a LLaVA checkpoint directory -> a loaded model and its geometry.

There is one loading path. The embedded default (``llava-tiny``) is first *materialised* as a
checkpoint directory in the cache (``save_pretrained`` of a seeded random model) and then
loaded exactly like a real ``--model DIR``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from star_export.errors import UsageError
from star_export.recipes import Recipe

SUPPORTED_MODEL_TYPES = {"llava": "LlavaForConditionalGeneration"}
LLAMA_FAMILY = {"llama", "mistral", "qwen2"}  # each tested (tests/test_rewrite.py)


def cache_root() -> Path:
    return Path(os.environ.get("STAR_EXPORT_CACHE", Path.home() / ".cache" / "star_export"))


@dataclass(frozen=True)
class Geometry:
    """What the exporter needs to know about a checkpoint, read from its config."""

    n_visual: int  # N visual tokens per image (CLS dropped)
    image_size: int
    patch_size: int
    image_token_id: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    vision_feature_layer: int
    select_strategy: str
    text_model_type: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Loaded:
    model: Any  # LlavaForConditionalGeneration, eval mode
    model_dir: Path
    source: str  # "recipe:llava-tiny" or the directory
    geometry: Geometry


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def materialise(recipe: Recipe, overrides: dict[str, Any] | None = None, root: Path | None = None) -> Path:
    """Save the embedded recipe's seeded random model as a checkpoint directory (cached).

    The directory name hashes the config, the seed and the transformers version, so a changed
    recipe never reuses a stale checkpoint. Written to a temporary directory and renamed.
    """
    import transformers
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if not recipe.embedded:
        raise UsageError(f"recipe {recipe.name!r} describes a checkpoint directory; pass it with --model DIR")
    cfg_dict = _merge(recipe.config, overrides or {})
    from star_export.preprocess import TINY_TOKENIZER_DIGEST

    key = json.dumps([cfg_dict, recipe.seed, transformers.__version__, TINY_TOKENIZER_DIGEST], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = root or cache_root()
    target = root / f"{recipe.name}-{digest}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    config = LlavaConfig(**copy.deepcopy(cfg_dict))
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration(config).eval()
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.name}-", dir=root))
    try:
        model.save_pretrained(tmp)
        _write_extras(tmp, recipe)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_extras(directory: Path, recipe: Recipe) -> None:
    """Processor files that make the embedded checkpoint self-describing."""
    image = recipe.image
    if image:
        pre = {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": image["size"]},
            "do_center_crop": True,
            "crop_size": {"height": image["size"], "width": image["size"]},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": image["mean"],
            "image_std": image["std"],
            "do_convert_rgb": True,
        }
        (directory / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
        from star_export.preprocess import write_tiny_tokenizer

        write_tiny_tokenizer(directory, image_token_id=int(recipe.config["image_token_id"]))


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, with clear errors for what is not a LLaVA."""
    if not model_dir.exists():
        raise UsageError(f"--model {model_dir}: no such directory")
    if not model_dir.is_dir():
        raise UsageError(f"--model {model_dir}: not a directory (expected a checkpoint directory)")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"--model {model_dir}: no config.json, not a Hugging Face checkpoint directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--model {model_dir}: config.json is not valid JSON ({e})") from None
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(cfg.get("architectures") or []) or model_type or "unknown"
        raise UsageError(
            f"--model {model_dir}: architecture {arch} (model_type {model_type!r}) is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES.values())}"
        )
    text_type = (cfg.get("text_config") or {}).get("model_type", "llama")
    if text_type not in LLAMA_FAMILY:
        raise UsageError(
            f"--model {model_dir}: text model {text_type!r} is not supported; supported: {sorted(LLAMA_FAMILY)}"
        )
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise UsageError(f"--model {model_dir}: no weights (*.safetensors) in the directory")
    return cfg


def geometry_of(config: Any) -> Geometry:
    """Geometry from a loaded LlavaConfig."""
    vc, tc = config.vision_config, config.text_config
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise UsageError(f"vision_feature_select_strategy {strategy!r} is not supported")
    vfl = config.vision_feature_layer
    if not isinstance(vfl, int):
        raise UsageError(f"vision_feature_layer {vfl!r}: only a single layer is supported")
    window = getattr(tc, "sliding_window", None)
    if window is not None and getattr(tc, "use_sliding_window", tc.model_type == "mistral"):
        raise UsageError(
            f"text model {tc.model_type} uses sliding-window attention (window {window}); not supported "
            "(the exported attention is global)"
        )
    grid = vc.image_size // vc.patch_size
    n_visual = grid * grid + (0 if strategy == "default" else 1)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return Geometry(
        n_visual=n_visual,
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        image_token_id=int(config.image_token_id),
        num_layers=tc.num_hidden_layers,
        num_heads=tc.num_attention_heads,
        num_kv_heads=tc.num_key_value_heads,
        head_dim=head_dim,
        hidden_size=tc.hidden_size,
        vocab_size=tc.vocab_size,
        vision_feature_layer=vfl,
        select_strategy=strategy,
        text_model_type=tc.model_type,
    )


def load(model_dir: str | Path, source: str | None = None, dtype: torch.dtype = torch.float32) -> Loaded:
    """Load a LLaVA checkpoint directory for export (eval mode, eager attention)."""
    from transformers import LlavaForConditionalGeneration

    model_dir = Path(model_dir)
    read_config(model_dir)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="eager"
        )
    except (OSError, ValueError) as e:
        raise UsageError(
            f"--model {model_dir}: cannot load the checkpoint: {str(e).splitlines()[0]}"
        ) from None
    model.eval()
    return Loaded(
        model=model, model_dir=model_dir, source=source or str(model_dir), geometry=geometry_of(model.config)
    )


def load_recipe_model(
    recipe: Recipe, overrides: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> Loaded:
    """The embedded recipe's model, through its materialised checkpoint directory."""
    return load(materialise(recipe, overrides), source=f"recipe:{recipe.name}", dtype=dtype)
