"""Prompts and images -> the exported graphs' inputs (``pixel_values``, ``input_ids``, ``attention_mask``).

:class:`Preprocessor` loads a checkpoint's (or an export's ``processor/``) tokenizer, chat template
and image processor offline and applies the export's rules: exactly ONE image placeholder per row
(never expanded to N copies), LEFT padding, at least one token after the placeholder. How pixels
are made is the family's ``image_spec`` (the manifest's ``image`` section), carried out by
``encoding``, the same code the Triton pipeline runs. Errors are one-line ``UsageError``s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from star_export import encoding
from star_export.errors import UsageError
from star_export.geometry import Geometry

DEFAULT_SPEC = {"kind": "processor", "processor": "auto"}  # a checkpoint's own AutoProcessor


def load_image(item: str | os.PathLike[str] | Image.Image) -> Image.Image:
    """An image file (or a PIL image) as an RGB PIL image, with one-line UsageErrors."""
    try:
        return encoding.open_image(item)
    except encoding.InputError as e:
        raise UsageError(str(e)) from None


def _missing_files(model_dir: Path) -> list[str]:
    missing = []
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer (tokenizer.json)")
    has_ip = (model_dir / "preprocessor_config.json").is_file()
    proc = model_dir / "processor_config.json"
    if not has_ip and proc.is_file():
        try:
            has_ip = "image_processor" in json.loads(proc.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            has_ip = False
    if not has_ip:
        missing.append("image processor config (preprocessor_config.json)")
    return missing


def check_processor_files(model_dir: Path, flag: str = "--model") -> None:
    """A UsageError naming ``flag`` when ``model_dir`` cannot encode prompts (no tokenizer / image config)."""
    missing = _missing_files(model_dir)
    if missing:
        raise UsageError(f"{flag} {model_dir}: cannot encode prompts, missing {'; '.join(missing)}")


class Preprocessor:
    """A checkpoint's processor files, used to build the exported graphs' inputs."""

    def __init__(self, processor: encoding.Processor, spec: dict[str, Any], source: str, image_token_id=None):
        self.processor = processor
        self.spec = spec
        self.source = source
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        image_token = processor.image_token or "<image>"
        ids = self.tokenizer.encode(image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise UsageError(f"{source}: image token {image_token!r} is not a single token ({ids})")
        if image_token_id is not None and int(ids[0]) != int(image_token_id):
            raise UsageError(
                f"{source}: image token {image_token!r} has id {ids[0]}, the model expects {image_token_id}"
            )
        self.image_token = image_token
        self._image_token_id = int(ids[0])

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, geometry: Geometry | None = None, flag: str = "--model"
    ) -> Preprocessor:
        """Load ``model_dir``'s processor offline as its family says (``geometry``: the export's static
        layout; None: the checkpoint's own AutoProcessor). ``flag`` names the directory in errors."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise UsageError(f"{flag} {model_dir}: no such directory")
        check_processor_files(model_dir, flag)
        spec = dict(DEFAULT_SPEC)
        if geometry is not None:
            from star_export.families import family_of

            spec = family_of(geometry).image_spec(model_dir, geometry)
        try:
            processor = encoding.load_processor(model_dir, spec)
        except encoding.ProcessorError as e:
            raise UsageError(f"{flag} {model_dir}: {e}") from None
        token_id = None if geometry is None else geometry.image_token_id
        return cls(processor, spec, source=f"{flag} {model_dir}", image_token_id=token_id)

    # ---- ids ----------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self._image_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id; EOS (then 0) where it has none. Padded slots are masked anyway."""
        return encoding.pad_token_id(self.tokenizer)

    # ---- text ---------------------------------------------------------------------------------
    def prompt_text(self, prompt: str) -> str:
        """The chat-templated text of one user turn (one image, then ``prompt``), ready for the answer."""
        if not self.processor.chat_template:
            raise UsageError(f"{self.source}: no chat template (chat_template.jinja)")
        return self.processor.render(prompt)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``input_ids`` and ``attention_mask`` (int64 [B, T]), left-padded, one placeholder per row."""
        if not self.processor.chat_template:
            raise UsageError(f"{self.source}: no chat template (chat_template.jinja)")
        try:
            return encoding.encode_prompts(self.processor, prompts, self.image_token_id)
        except encoding.InputError as e:
            raise UsageError(str(e)) from None

    # ---- images -------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[str | os.PathLike[str] | Image.Image]) -> np.ndarray:
        """float32 pixel_values as the export's image section says (``encoding.pixel_values``)."""
        if isinstance(images, (str, os.PathLike, Image.Image)) or not images:
            raise UsageError("images: expected a non-empty list of image files or PIL images")
        pil = [load_image(item) for item in images]
        return encoding.pixel_values(pil, self.spec, self.image_processor)

    def encode(
        self, images: Sequence[str | os.PathLike[str] | Image.Image], prompts: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """One image and one prompt per row -> ``pixel_values``, ``input_ids``, ``attention_mask``."""
        if isinstance(images, (str, os.PathLike, Image.Image)) or isinstance(prompts, str):
            raise UsageError("encode: pass lists (one image and one prompt per row)")
        if len(images) != len(prompts):
            raise UsageError(
                f"{len(images)} images but {len(prompts)} prompts: one image per prompt is needed"
            )
        input_ids, attention_mask = self.encode_prompts(prompts)
        return {
            "pixel_values": self.pixel_values(images),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=skip_special_tokens)
