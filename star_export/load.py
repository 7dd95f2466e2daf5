"""Stage 1 of the data's way: a checkpoint (directory or hub id) -> its family, model and geometry.

There is one loading path. The embedded tiny recipes are first *materialised* as checkpoint
directories in the cache (``save_pretrained`` of a seeded random model plus the family's processor
files) and then loaded exactly like a real ``--model DIR``. A hub id (``--model org/name``) resolves
through ``huggingface_hub`` to its snapshot in the local cache first.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from star_export.errors import UsageError
from star_export.families import Family, family_for_architecture, family_for_config, option_families
from star_export.geometry import Geometry
from star_export.recipes import Recipe

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what an export reads from a hub snapshot: config, weights, processor and tokenizer files
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


def cache_root() -> Path:
    return Path(os.environ.get("STAR_EXPORT_CACHE", Path.home() / ".cache" / "star_export"))


@dataclass
class Loaded:
    model: Any  # the transformers model, eval mode, eager attention
    model_dir: Path
    source: str  # "recipe:llava-tiny", a hub id or the directory
    geometry: Geometry
    family: Family


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


DEMO_RECIPE = "llava-demo"  # the recipe the shipped demo checkpoint was trained from (its profile)
DEMO_PREFIX = "demo:"  # --model demo:NAME: a shipped demo checkpoint by name
DEMO_SOURCE = f"{DEMO_PREFIX}{DEMO_RECIPE}"


def demo_checkpoint(name: str = DEMO_RECIPE) -> Path:
    """A shipped trained demo checkpoint (``tools/train_demo.py``) by its recipe's name: a directory
    loaded like any ``--model DIR``. The default, ``llava-demo``, is the model of the command line
    and the API when none is named; ``--model demo:NAME`` names any of them (``shipped_demos``)."""
    return Path(__file__).resolve().parent / "data" / "demo" / name


def shipped_demos() -> list[str]:
    """The names of the shipped demo checkpoints (``--model demo:NAME``)."""
    root = demo_checkpoint().parent
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def materialise(recipe: Recipe, overrides: dict[str, Any] | None = None, root: Path | None = None) -> Path:
    """Save the embedded recipe's seeded random model as a checkpoint directory (cached).

    The directory name hashes the config, the seed, the transformers version and the tiny tokenizer,
    so a changed recipe never reuses a stale checkpoint. Written to a temporary directory and renamed.
    """
    import transformers

    from star_export.tiny import TINY_TOKENIZER_DIGEST

    if not recipe.embedded:
        raise UsageError(f"recipe {recipe.name!r} describes a checkpoint directory; pass it with --model DIR")
    family = family_for_architecture(recipe.architecture)
    cfg_dict = _merge(recipe.config, overrides or {})
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
    family.tiny_weights(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.name}-", dir=root))
    try:
        model.save_pretrained(tmp)
        if recipe.image:
            family.write_tiny_processor(tmp, recipe)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def checkpoint_dtype(model_dir: Path) -> str:
    """The --dtype name of the checkpoint's weights (config.json ``dtype``/``torch_dtype``); fp32 if unstated."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    name = str(
        cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype") or "float32"
    )
    return {"float16": "fp16", "bfloat16": "bf16"}.get(name.removeprefix("torch."), "fp32")


def resolve_model(model: str | os.PathLike) -> tuple[Path, str]:
    """``--model``: an existing directory, a shipped demo ``demo:NAME``, or a hub id ``org/name``
    resolved by ``huggingface_hub`` (the local cache first; a download only where the hub is
    reachable and not disabled by ``HF_HUB_OFFLINE=1``). Returns the directory and the source string
    for the manifest."""
    path = Path(model)
    text = str(model)
    if text.startswith(DEMO_PREFIX) and not path.exists():  # a shipped demo checkpoint by name
        name, shipped = text.removeprefix(DEMO_PREFIX), shipped_demos()
        if name not in shipped:
            raise UsageError(f"--model {text}: no such demo checkpoint; shipped: {', '.join(shipped)}")
        return demo_checkpoint(name), text
    if path.exists() or not _HUB_ID.match(text):
        return path, text
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True)), text
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise UsageError(
            f"--model {text}: not a directory and not in the local Hugging Face cache "
            f"({_hub_cache()}), and HF_HUB_OFFLINE is set; download it first or pass a directory"
        )
    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS)), text
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"--model {text}: not a directory, not in the local Hugging Face cache, and the hub "
            f"cannot be reached ({first})"
        ) from None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def read_config(model_dir: Path) -> tuple[dict[str, Any], Family]:
    """config.json of a checkpoint directory and its family, with one-line errors for the rest."""
    where = f"--model {model_dir}"
    if not model_dir.exists():
        raise UsageError(f"{where}: no such directory")
    if not model_dir.is_dir():
        raise UsageError(f"{where}: not a directory (expected a checkpoint directory)")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{where}: no config.json, not a Hugging Face checkpoint directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{where}: config.json is not a JSON object")
    family = family_for_config(cfg, where)
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise UsageError(f"{where}: no weights (*.safetensors) in the directory")
    return cfg, family


def geometry_of(
    family: Family, config: Any, options: dict[str, Any] | None = None, model_dir: Path | None = None
) -> Geometry:
    """The family's static geometry; a layout option the family does not take is a UsageError.
    ``model_dir``: what the checkpoint's files imply (``Family.checkpoint_options``) fills the options
    no flag sets."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if model_dir is not None:
        options = {**family.checkpoint_options(model_dir), **options}
    for name in options:
        if name not in family.options:
            takers = ", ".join(option_families(name)) or "no family"
            raise UsageError(
                f"--{name.replace('_', '-')} does not apply to {family.name} checkpoints (it applies to: {takers})"
            )
    return family.geometry(config, **options)


def auto_config(model_dir: Path) -> Any:
    """The transformers config of a checkpoint directory (no weights read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UsageError(f"--model {model_dir}: cannot read its config: {str(e).splitlines()[0]}") from None


def load(
    model_dir: str | Path,
    source: str | None = None,
    dtype: torch.dtype = torch.float32,
    options: dict[str, Any] | None = None,
) -> Loaded:
    """Load a supported checkpoint directory for export (eval mode, eager attention).

    ``options``: the family's layout options (``grid``, ``image_size``)."""
    import transformers
    from safetensors import SafetensorError

    model_dir = Path(model_dir)
    _, family = read_config(model_dir)
    model_cls = getattr(transformers, family.architecture)
    try:
        model = model_cls.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # missing/corrupt/mismatched weights
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {model_dir}: cannot load the checkpoint: {first}") from None
    model.eval()
    return Loaded(
        model=model,
        model_dir=model_dir,
        source=source or str(model_dir),
        geometry=geometry_of(family, model.config, options, model_dir),
        family=family,
    )


def load_recipe_model(
    recipe: Recipe, overrides: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> Loaded:
    """The embedded recipe's model, through its materialised checkpoint directory."""
    return load(
        materialise(recipe, overrides), source=f"recipe:{recipe.name}", dtype=dtype, options=recipe.layout
    )
