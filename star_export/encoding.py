"""Images and prompts -> the prefill graph's inputs, driven by the manifest's ``image`` section.

This file is self-contained on purpose (numpy, Pillow and, lazily, transformers; nothing from
star_export): ``star_export.preprocess`` uses it in Python, and ``triton`` copies it next to the
Triton pipeline model, which runs inside tritonserver's Python backend where star_export is not
installed. One implementation serves both, so the server and the local runtime pre-process alike.

The ``image`` section (written by the model family at export) says how pixels are made:

- ``{"kind": "processor", "processor_kwargs": {...}}``: the checkpoint's own image processor
  (``AutoProcessor`` from ``processor/``, PIL backend), called with ``processor_kwargs``
  (LLaVA-NeXT passes its fixed tile grid as the only pinpoint);
- ``{"kind": "patches", "size": [H, W], "mean", "std", "rescale_factor", "patch_size",
  "merge_size", "temporal_patch_size"}``: resize to H x W (bicubic), rescale, normalise and cut
  into patches in the Qwen-VL processors' layout (:func:`patchify`).

``"processor": "auto" | "tokenizer"`` says how ``processor/`` is loaded: the whole ``AutoProcessor``,
or only the tokenizer (with the chat template from ``chat_template.jinja`` / ``.json`` where the
tokenizer has none). Prompts follow the export's rules: exactly ONE image placeholder per row (never
expanded), LEFT padding, at least one token after the placeholder.

``"image_marker": {"marker": M, "text": X}`` (optional) is for chat templates that write a marker M for
the image where the processor writes more text around its placeholder (say, image tokens between
start/end-of-image tokens): the chat-templated text gets every M replaced by X, which holds
``image_token`` (the spec's, not the processor's) once.

Pixels are always made in float32; :func:`cast_inputs` casts every input to the dtype its graph
declares (an fp16 export takes fp16 pixels and pasts). Every runtime feeds the graphs through it:
onnxruntime, the PyTorch rewrite, TensorRT and the Triton pipeline.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


class InputError(ValueError):
    """A bad image or prompt (the caller turns it into its own one-line error)."""


class ProcessorError(ValueError):
    """``processor/`` cannot be loaded (missing or unreadable files)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------- images


def to_rgb(image: Any) -> Any:
    """RGB, with transparency composited on white (what transformers' convert_to_rgb does)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def open_image(item: Any, label: str = "image") -> Any:
    """A file path, encoded bytes or a PIL image -> an RGB PIL image (``InputError`` otherwise)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        source, where = io.BytesIO(bytes(item)), label
    elif isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.exists():
            raise InputError(f"{label} {path}: no such file")
        if not path.is_file():
            raise InputError(f"{label} {path}: not a file")
        source, where = path, f"{label} {path}"
    else:
        raise InputError(f"{label} {item!r}: expected a file path or a PIL image, got {type(item).__name__}")
    try:
        with Image.open(source) as im:
            im.load()
            return to_rgb(im)
    except UnidentifiedImageError:
        raise InputError(f"{where}: not an image file (Pillow cannot identify its format)") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{where}: too large to decode ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated / corrupt files, permission errors
        raise InputError(f"{where}: cannot be read ({_first_line(e)})") from None


def patchify(image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """A normalised (C, H, W) image -> (gh * gw, C * Tp * P * P), the Qwen-VL processors' layout.

    P x P patches ordered block-major over m x m merge blocks: row ``((R * gw/m + Cm) * m + i) * m + j``
    for merge block (R, Cm) and patch (i, j) inside it; each row is ``[c, t, y, x]`` flattened with
    the still image repeated Tp times along t.
    """
    c, height, width = image.shape
    gh, gw = height // patch_size, width // patch_size
    m = merge_size
    x = image.reshape(c, gh // m, m, patch_size, gw // m, m, patch_size)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
    return np.ascontiguousarray(x.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size))


def _patches(image: Any, spec: dict[str, Any]) -> np.ndarray:
    from PIL import Image

    height, width = (int(v) for v in spec["size"])
    array = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    array = array * np.float32(spec.get("rescale_factor", 1 / 255))
    mean = np.asarray(spec.get("mean", DEFAULT_MEAN), np.float32)
    std = np.asarray(spec.get("std", DEFAULT_STD), np.float32)
    array = (array - mean) / std
    return patchify(
        array.transpose(2, 0, 1),
        int(spec["patch_size"]),
        int(spec["merge_size"]),
        int(spec["temporal_patch_size"]),
    )


def pixel_values(images: Sequence[Any], spec: dict[str, Any], image_processor: Any = None) -> np.ndarray:
    """float32 pixel_values of RGB PIL images, as the ``image`` section ``spec`` says."""
    kind = spec.get("kind", "processor")
    if kind == "patches":
        return np.stack([_patches(im, spec) for im in images]).astype(np.float32)
    if kind == "processor":
        if image_processor is None:
            raise ProcessorError("the image section asks for the checkpoint's image processor; none loaded")
        out = image_processor(list(images), return_tensors="np", **spec.get("processor_kwargs", {}))
        return np.ascontiguousarray(out["pixel_values"], dtype=np.float32)
    raise ProcessorError(f"unknown image pre-processing kind {kind!r}")


# ---------------------------------------------------------------------------- processor files


class Processor:
    """The tokenizer, chat template and (``kind: processor``) image processor of ``processor/``."""

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str | None,
        image_processor: Any,
        owner: Any,
        image_token: str,
        image_marker: dict[str, str] | None = None,
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_processor = image_processor
        self._render = owner.apply_chat_template  # the processor's, or the tokenizer's
        # with a marker the placeholder is the one its replacement text holds (the spec's image_token)
        self.image_marker = (image_marker["marker"], image_marker["text"]) if image_marker else None
        self.image_token = (
            image_token if self.image_marker else (getattr(owner, "image_token", None) or image_token)
        )

    def render(self, prompt: str) -> str:
        """The chat-templated text of one user turn (one image, then ``prompt``), ready for the answer."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self._render(
            messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
        )
        return text[0] if isinstance(text, list) else text  # batched form


def _template_file(directory: Path) -> str | None:
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").is_file():
        return json.loads((directory / "chat_template.json").read_text()).get("chat_template")
    return None


def load_processor(directory: str | os.PathLike, spec: dict[str, Any]) -> Processor:
    """Load ``directory`` offline (local files only, PIL image backend) as ``spec["processor"]`` says;
    ``spec["image_token"]`` is the placeholder where the processor does not name one."""
    directory = Path(directory)
    image_token = spec.get("image_token", "<image>")
    marker = spec.get("image_marker")
    try:
        if spec.get("processor", "auto") == "tokenizer":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            template = getattr(tokenizer, "chat_template", None) or _template_file(directory)
            return Processor(tokenizer, template, None, tokenizer, image_token, marker)
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(directory, local_files_only=True, backend="pil")
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        raise ProcessorError(f"cannot load the processor: {_first_line(e)}") from None
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        raise ProcessorError(
            f"the processor ({type(processor).__name__}) lacks a tokenizer or an image processor"
        )
    template = (
        getattr(processor, "chat_template", None)
        or getattr(tokenizer, "chat_template", None)
        or _template_file(directory)
    )
    return Processor(tokenizer, template, image_processor, processor, image_token, marker)


# ---------------------------------------------------------------------------- prompts


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id; EOS (then 0) where it has none. Padded slots are masked anyway."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode_prompts(
    processor: Processor, prompts: Sequence[str], image_token_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64 [B, T]): chat-templated, one placeholder per row,
    left padded with the tokenizer's pad id."""
    if isinstance(prompts, str) or not prompts:
        raise InputError("prompts: expected a non-empty list of strings")
    if not processor.chat_template:
        raise InputError("the processor has no chat template (chat_template.jinja)")
    tokenizer, image_token = processor.tokenizer, processor.image_token
    bos = tokenizer.bos_token
    rows: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InputError(f"prompt {i}: must be a string, got {type(prompt).__name__}")
        if image_token and image_token in prompt:
            raise InputError(
                f"prompt {i} ({prompt!r}) contains the image placeholder {image_token!r}; "
                "leave it out, the chat template places the image"
            )
        text = processor.render(prompt)
        if processor.image_marker:  # the template's image marker -> the text around one placeholder
            text = text.replace(*processor.image_marker)
        # A template that writes the BOS itself must not get a second one from the tokenizer.
        add_special = not (bos and text.startswith(bos))
        ids = [int(t) for t in tokenizer(text, add_special_tokens=add_special)["input_ids"]]
        n_img = ids.count(image_token_id)
        if n_img != 1:
            raise InputError(
                f"prompt {i} ({prompt!r}): {n_img} image placeholders after templating, exactly one is needed"
            )
        if ids.index(image_token_id) == len(ids) - 1:
            raise InputError(f"prompt {i} ({prompt!r}): no token follows the image placeholder")
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = np.full((len(rows), length), pad_token_id(tokenizer), dtype=np.int64)
    attention_mask = np.zeros((len(rows), length), dtype=np.int64)
    for b, ids in enumerate(rows):
        input_ids[b, length - len(ids) :] = ids
        attention_mask[b, length - len(ids) :] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------- graph inputs

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
ONNX_TENSOR_TYPES = {  # onnxruntime NodeArg.type -> numpy dtype name
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


def declared_dtypes(inputs: Iterable[Any]) -> dict[str, str]:
    """{input name: dtype name} of a graph's inputs as the graph declares them: manifest entries
    (``{"name", "dtype"}``), contract ``TensorSpec``s (``.dtype``) or onnxruntime ``NodeArg``s
    (``.type``, e.g. ``tensor(float16)``)."""
    out = {}
    for t in inputs:
        if isinstance(t, Mapping):
            out[str(t["name"])] = str(t["dtype"])
        elif hasattr(t, "dtype"):
            out[str(t.name)] = str(t.dtype)
        else:
            out[str(t.name)] = ONNX_TENSOR_TYPES.get(str(t.type), str(t.type))
    return out


def _kind(value: Any) -> str:
    """The numpy kind letter of an array or torch tensor ("f" float, "i" integer, unsigned counted as "i")."""
    if hasattr(value, "is_floating_point"):  # a torch tensor (bfloat16 has no numpy dtype)
        return "f" if value.is_floating_point() else "i"
    kind = np.asarray(value).dtype.kind
    return "i" if kind == "u" else kind


def cast_inputs(
    feeds: Mapping[str, Any],
    declared: Mapping[str, str],
    bfloat16: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """``feeds`` with every input in the dtype its graph declares (``declared``: :func:`declared_dtypes`):
    floating-point values to the declared float type (float32 pixels reach an fp16 graph as fp16),
    integer values to the declared integer type (int32 ids -> int64). A value of the other kind (a float
    for an integer input) and an input the graph does not declare are passed as given, for the runtime
    to reject. bfloat16, which numpy cannot hold, goes through ``bfloat16`` (the PyTorch rewrite and
    TensorRT pass a converter to a torch tensor); without one a bfloat16 input is a TypeError."""
    out: dict[str, Any] = {}
    for name, value in feeds.items():
        want = declared.get(name)
        kind = _kind(value)
        if want is None or (kind == "f") != (want in FLOAT_DTYPES) or kind not in "fi":
            out[name] = value
        elif want == "bfloat16":
            if bfloat16 is None:
                raise TypeError(
                    f"input {name}: the graph declares bfloat16, which numpy cannot hold "
                    "(feed it as a torch tensor, e.g. through DLPack)"
                )
            out[name] = bfloat16(value)
        else:
            out[name] = np.ascontiguousarray(value, dtype=want)
    return out
