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

# model_type -> the transformers class that loads it; each tested with tiny checkpoints saved by
# save_pretrained and loaded back (tests/conftest.py)
SUPPORTED_MODEL_TYPES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
}
DEFAULT_QWEN2VL_IMAGE_SIZE = 336  # Qwen2-VL's static square resolution unless --image-size says otherwise
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
    # --- architecture layout (defaults: LLaVA-1.5, so manifests written before these existed load)
    arch: str = "llava"  # model_type: "llava" | "llava_next" | "qwen2_vl"
    pixel_shape: tuple[int, ...] = ()  # pixel_values dims after the batch dim
    n_fixed: int = 0  # structural tokens of the visual span that are always kept (NeXT row newlines)
    n_positions: int = 0  # positions the image occupies: text after it starts at s + n_positions
    grid: tuple[int, int] = (1, 1)  # NeXT: anyres tile grid (rows, cols); Qwen2-VL: merged-token grid

    def __post_init__(self) -> None:
        # JSON round trips (manifest.json) turn tuples into lists; old manifests lack the layout
        object.__setattr__(
            self, "pixel_shape", tuple(self.pixel_shape) or (3, self.image_size, self.image_size)
        )
        object.__setattr__(self, "grid", tuple(self.grid))
        if not self.n_positions:
            object.__setattr__(self, "n_positions", self.n_visual + self.n_fixed)

    def span(self, keep: int) -> int:
        """Length of the visual span when ``keep`` visual tokens are kept (plus the fixed ones)."""
        return keep + self.n_fixed

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


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
    model_cls = getattr(transformers, recipe.architecture)
    config = model_cls.config_class(**copy.deepcopy(cfg_dict))
    torch.manual_seed(recipe.seed)
    model = model_cls(config).eval()
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
    if not image:
        return
    normalise = {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": image["mean"],
        "image_std": image["std"],
        "do_convert_rgb": True,
    }
    size = image["size"]
    if recipe.architecture == "Qwen2VLForConditionalGeneration":
        vc = recipe.config["vision_config"]
        pre = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": size * size, "longest_edge": size * size},
            **normalise,
            "patch_size": vc["patch_size"],
            "temporal_patch_size": vc["temporal_patch_size"],
            "merge_size": vc["spatial_merge_size"],
        }
    else:
        pre = {
            "image_processor_type": "CLIPImageProcessor"
            if recipe.architecture == "LlavaForConditionalGeneration"
            else "LlavaNextImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": size},
            "do_center_crop": True,
            "crop_size": {"height": size, "width": size},
            **normalise,
        }
        if "image_grid_pinpoints" in recipe.config:
            pre["image_grid_pinpoints"] = recipe.config["image_grid_pinpoints"]
            pre["do_pad"] = True
    (directory / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    from star_export.preprocess import write_tiny_tokenizer

    write_tiny_tokenizer(directory, image_token_id=int(recipe.config["image_token_id"]))


def checkpoint_dtype(model_dir: Path) -> str:
    """The --dtype name of the checkpoint's weights (config.json ``dtype``/``torch_dtype``); fp32 if unstated."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    return {"float16": "fp16", "bfloat16": "bf16"}.get(name, "fp32")


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
    if model_type != "qwen2_vl" and text_type not in LLAMA_FAMILY:
        raise UsageError(
            f"--model {model_dir}: text model {text_type!r} is not supported; supported: {sorted(LLAMA_FAMILY)}"
        )
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise UsageError(f"--model {model_dir}: no weights (*.safetensors) in the directory")
    return cfg


def text_geometry(tc: Any) -> dict[str, Any]:
    """The Geometry fields read from a text config (every architecture)."""
    return {
        "num_layers": tc.num_hidden_layers,
        "num_heads": tc.num_attention_heads,
        "num_kv_heads": tc.num_key_value_heads,
        "hidden_size": tc.hidden_size,
        "vocab_size": tc.vocab_size,
        "text_model_type": tc.model_type,
    }


def next_grid(config: Any, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """LLaVA-NeXT's static anyres tile grid (rows, cols): ``grid`` if given, else 2x2 when the
    checkpoint lists that resolution, else its first pinpoint. It must be one of the
    checkpoint's ``image_grid_pinpoints`` (the model only knows those)."""
    size = config.vision_config.image_size
    pinpoints = [tuple(int(v) for v in pp) for pp in config.image_grid_pinpoints]
    allowed = [(h // size, w // size) for h, w in pinpoints if h % size == 0 and w % size == 0]
    if grid is None:
        grid = (2, 2) if (2, 2) in allowed else (allowed[0] if allowed else (0, 0))
    if tuple(grid) not in allowed:
        raise UsageError(
            f"--grid {grid[0]}x{grid[1]}: the checkpoint's image_grid_pinpoints allow "
            f"{', '.join(f'{h}x{w}' for h, w in allowed) or 'no tile grid'} ({size} px tiles)"
        )
    return (int(grid[0]), int(grid[1]))


def geometry_of(config: Any, grid: tuple[int, int] | None = None, image_size: int | None = None) -> Geometry:
    """Geometry from a loaded LlavaConfig / LlavaNextConfig / Qwen2VLConfig.

    ``grid``: LLaVA-NeXT's tile grid; ``image_size``: Qwen2-VL's static square resolution.
    """
    if config.model_type == "qwen2_vl":
        if grid is not None:
            raise UsageError("--grid applies to LLaVA-NeXT checkpoints, not qwen2_vl")
        from star_export.qwen2vl import geometry_of_qwen2vl

        return geometry_of_qwen2vl(config, image_size or DEFAULT_QWEN2VL_IMAGE_SIZE)
    if image_size is not None:
        raise UsageError(
            f"--image-size applies to Qwen2-VL checkpoints; {config.model_type} has a fixed image size "
            f"({config.vision_config.image_size})"
        )
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
    side = vc.image_size // vc.patch_size
    n_visual = side * side + (0 if strategy == "default" else 1)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    layout: dict[str, Any] = {}
    if config.model_type == "llava_next":
        if strategy != "default":
            raise UsageError("LLaVA-NeXT: only vision_feature_select_strategy 'default' is supported")
        gh, gw = next_grid(config, grid)
        n_fixed = gh * side  # one newline per row of the tile grid
        layout = {
            "arch": "llava_next",
            "pixel_shape": (1 + gh * gw, 3, vc.image_size, vc.image_size),
            "n_fixed": n_fixed,
            "grid": (gh, gw),
        }
        n_visual = (1 + gh * gw) * side * side
    elif grid is not None:
        raise UsageError(f"--grid applies to LLaVA-NeXT checkpoints, not {config.model_type}")
    return Geometry(
        n_visual=n_visual,
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        image_token_id=int(config.image_token_id),
        head_dim=head_dim,
        vision_feature_layer=vfl,
        select_strategy=strategy,
        **text_geometry(tc),
        **layout,
    )


def load(
    model_dir: str | Path,
    source: str | None = None,
    dtype: torch.dtype = torch.float32,
    grid: tuple[int, int] | None = None,
    image_size: int | None = None,
) -> Loaded:
    """Load a supported checkpoint directory for export (eval mode, eager attention)."""
    import transformers

    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    model_cls = getattr(transformers, SUPPORTED_MODEL_TYPES[cfg["model_type"]])
    try:
        model = model_cls.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise UsageError(
            f"--model {model_dir}: cannot load the checkpoint: {str(e).splitlines()[0]}"
        ) from None
    model.eval()
    return Loaded(
        model=model,
        model_dir=model_dir,
        source=source or str(model_dir),
        geometry=geometry_of(model.config, grid, image_size),
    )


def load_recipe_model(
    recipe: Recipe, overrides: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> Loaded:
    """The embedded recipe's model, through its materialised checkpoint directory."""
    return load(materialise(recipe, overrides), source=f"recipe:{recipe.name}", dtype=dtype)
