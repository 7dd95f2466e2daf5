"""Prompts and images -> the exported graphs' inputs (``pixel_values``, ``input_ids``, ``attention_mask``).

Two parts:

* :func:`write_tiny_tokenizer` gives the embedded ``llava-tiny`` checkpoint a small but real
  byte-level BPE tokenizer (trained deterministically on the text below), a LLaVA-1.5 chat
  template and a ``LlavaProcessor`` config, so the embedded model is loaded like any
  ``--model DIR``. Nothing is fetched from the Hugging Face hub.
* :class:`Preprocessor` wraps a checkpoint's own ``LlavaProcessor`` (loaded offline) and
  produces the inputs of STAR_SPEC.md: exactly ONE image placeholder per row (never
  expanded to N copies), LEFT padding, at least one token after the placeholder.

Images go through the checkpoint's image processor with the PIL backend (no torchvision).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from star_export.errors import UsageError

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN = "<pad>", "<s>", "</s>", "<image>"

# LLaVA-1.5 conversation format, as the llava-hf checkpoints render it: one user turn with an
# image and a text gives "USER: <image>\n{text} ASSISTANT:". The BOS token is not part of the
# template; the tokenizer adds it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Training text of the tiny tokenizer: plain English about pictures, colours and objects.
# Changing it changes the embedded tokenizer (and the ids of every prompt).
_CORPUS = """\
The picture shows a red ball on a wooden table next to a blue cup.
A small brown dog is sleeping on a green carpet near the window.
Two children are playing with a yellow kite in a sunny park.
What is the colour of the car parked in front of the house? The car is white.
Describe the image in detail. The image contains a tall tree, a bench and a path.
How many apples are in the basket? There are three red apples and one green pear.
The sky is bright blue with a few white clouds above the mountains.
An orange cat sits on a black chair and looks at a bird outside.
A woman in a purple dress holds an umbrella while walking down the street.
The kitchen has a silver fridge, a white oven and a round table with four chairs.
There is a bicycle leaning against a grey wall covered in green ivy.
A plate of pasta with tomato sauce is served beside a glass of water.
The boat floats on a calm lake surrounded by pine trees and rocks.
Is there a person in the photo? Yes, a man is reading a newspaper on a bench.
The train station is crowded with travellers carrying bags and suitcases.
A pink flower grows in a clay pot on the balcony of an old building.
The computer screen displays a chart with colourful bars and numbers.
Three horses are running across a field of tall golden grass at sunset.
What animal is shown in this image? It is a zebra with black and white stripes.
The bedroom has a large bed, soft pillows, a lamp and a wooden wardrobe.
A young boy wearing a red hat is eating an ice cream cone on the beach.
The street sign says stop, and a traffic light glows red above the crossing.
Where is the dog? The dog is lying under the table in the living room.
A bowl of fruit holds bananas, grapes, oranges, lemons and a ripe mango.
The photograph was taken at night, and the city lights reflect on the river.
Snow covers the roofs of the small village in the quiet valley.
A chef in a white uniform is cutting vegetables on a wooden board.
Several birds sit on a power line against a pale grey sky.
The girl is drawing a picture of a castle with crayons and markers.
An airplane is flying high above the clouds, leaving a long white trail.
What is written on the sign? The sign reads welcome to the museum.
The football players wear blue shirts and run toward the goal.
A laptop, a notebook, a pen and a coffee mug rest on the desk.
The giraffe stretches its long neck to eat leaves from a tall tree.
A family is having a picnic on a checkered blanket under an oak tree.
The bathroom has white tiles, a mirror, a sink and a green towel.
Which object is closest to the camera? The closest object is a glass vase.
The market stall sells fresh fish, bread, cheese and colourful spices.
A man rides a motorcycle along a winding road in the mountains.
The old clock on the tower shows that it is a quarter past nine.
Two cups of tea and a plate of cookies are placed on a tray.
The elephant is standing in the shallow water and spraying its back.
A teddy bear with a blue ribbon sits on a shelf full of books.
The bus is yellow and has the number twelve painted on its side.
A red umbrella lies open on the wet pavement after the rain.
Please answer briefly. What colour is the shirt? The shirt is striped.
The garden is full of roses, tulips, daisies and bright sunflowers.
A skateboarder jumps over a ramp while friends watch and cheer.
The pizza has cheese, mushrooms, olives and slices of green pepper.
A computer mouse and a keyboard are next to a black monitor.
The lighthouse stands on a cliff above the stormy ocean waves.
A baby is smiling while holding a colourful plastic toy.
The room is dark except for a candle burning on the table.
A group of people are waiting at the bus stop in the morning.
The sheep graze on the hillside beside a stone fence.
Count the windows on the building. There are eight windows.
A firefighter climbs a ladder toward the smoke on the roof.
The desert is hot and dry, with sand dunes stretching to the horizon.
A tennis racket and two balls are lying on the court.
The bridge crosses a wide river and connects two parts of the city.
A cow stands in a barn filled with hay and wooden crates.
The child wears glasses and reads a comic book on the sofa.
The surface of the table is scratched, and a spoon lies near the edge.
Is the door open or closed? The door is half open.
A violin and a piano stand in the corner of the music room.
The runner crosses the finish line with both arms raised.
A squirrel holds a nut while sitting on the branch of a maple tree.
The shop window displays shoes, hats, scarves and leather gloves.
Fireworks light up the night sky in shades of gold, green and violet.
The mountain peak is covered with ice, and climbers rest at the camp.
A gentle breeze moves the curtains beside an open window.
A truck carries logs along a muddy forest track.
The parrot has feathers of red, blue, yellow and bright green.
A student writes equations on a whiteboard during the lesson.
Tell me what you see. I see a small boat, a dock and a fisherman.
Where was this photo taken? It seems to be taken in a busy airport.
The puppy chews on a rubber bone while its owner laughs.
Rain drops cover the glass, and the street behind it looks blurry.
A cake with candles stands in the middle of a birthday party.
The soldier's uniform is dark green with shiny metal buttons.
Why is the man holding an umbrella? Because it is raining heavily.
The library shelves are filled with old books and thick encyclopedias.
A jar of honey and a loaf of bread are on the breakfast table.
The water in the pool is clear, and a swimmer dives from the board.
The monkey hangs from a rope and eats a banana.
A lamp post casts a long shadow across the empty square.
The farmer drives a tractor through the wheat field.
A knife, a fork and a napkin lie beside the empty plate.
The cyclists race downhill through the narrow streets of the town.
The photo is black and white and shows an old steam locomotive.
A vase of tulips decorates the centre of the dining table.
The penguin waddles across the ice toward the sea.
An astronaut floats inside the space station next to a window.
The television is turned off, and a remote control lies on the couch.
The lion rests in the shade of a large acacia tree.
A woman paints a landscape on a canvas by the lake.
Summarise the scene in one sentence. A quiet harbour at dawn with fishing boats.
USER: What is shown in this picture? ASSISTANT: A dog and a ball on the grass.
USER: Describe the colours you can see. ASSISTANT: Red, green, blue and a little yellow.
USER: How many people are there? ASSISTANT: There are two people standing by the door.
USER: Is it day or night? ASSISTANT: It is day, the sun is shining.
USER: What is the man holding? ASSISTANT: He is holding a cup of coffee.
USER: Where is the cat? ASSISTANT: The cat is on the sofa."""

# Changes whenever the tiny tokenizer's definition does: key cached checkpoint directories on it.
TINY_TOKENIZER_DIGEST = hashlib.sha256(f"bpe-v1\0{_CORPUS}\0{CHAT_TEMPLATE}".encode()).hexdigest()[:12]


def _train_bpe(vocab_size: int, image_token_id: int) -> Any:
    """The tokenizers.Tokenizer: byte-level BPE, specials at 0/1/2, <image> at image_token_id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(
            f"vocab_size {vocab_size} is below the byte alphabet + specials ({len(alphabet) + 3})"
        )
    if image_token_id < vocab_size:
        raise ValueError(f"image_token_id {image_token_id} must be >= vocab_size {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    # The text may not yield enough merges for a large vocab_size, and ids between vocab_size and
    # image_token_id must exist too: fill them with reserved special tokens, deterministically.
    # One call for all of them (one call per token is quadratic: minutes for an id of 32000).
    start = tok.get_vocab_size()
    tok.add_special_tokens(
        [AddedToken(f"<reserved_{n}>", special=True, normalized=False) for n in range(start, image_token_id)]
    )
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    got = tok.token_to_id(IMAGE_TOKEN)
    if got != image_token_id:  # pragma: no cover - guarded by the checks above
        raise RuntimeError(f"{IMAGE_TOKEN} got id {got}, expected {image_token_id}")
    bos = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos)]
    )
    return tok


def write_tiny_tokenizer(
    directory: Path,
    vocab_size: int = 1000,
    image_token_id: int = 1000,
    *,
    patch_size: int = 14,
    vision_feature_select_strategy: str = "default",
    num_additional_image_tokens: int = 1,
    image_processor: dict[str, Any] | None = None,
) -> None:
    """Write a real, small LLaVA processor (tokenizer + chat template + processor config) to ``directory``.

    Ids: 0 ``<pad>``, 1 ``<s>`` (BOS, added by the tokenizer), 2 ``</s>`` (EOS), byte-level BPE
    tokens up to ``vocab_size - 1``, ``<image>`` at ``image_token_id`` (a special token). The image
    processor is the CLIP one described by ``image_processor`` or, when None, by the
    ``preprocessor_config.json`` already in ``directory``. Files are written with transformers'
    own ``LlavaProcessor.save_pretrained`` (tokenizer.json, tokenizer_config.json,
    chat_template.jinja, processor_config.json) and are byte-identical across runs.
    ``num_additional_image_tokens=1`` is the CLIP CLS token, as in llava-hf's LLaVA-1.5.
    """
    from transformers import LlavaNextProcessor, LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    directory = Path(directory)
    if image_processor is None:
        pre_path = directory / "preprocessor_config.json"
        if not pre_path.is_file():
            raise ValueError(f"{directory}: no preprocessor_config.json and no image_processor given")
        image_processor = json.loads(pre_path.read_text())
    qwen = image_processor.get("image_processor_type") == "Qwen2VLImageProcessor"
    ip_kwargs = {
        k: v for k, v in image_processor.items() if k not in ("image_processor_type", "processor_class")
    }
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(vocab_size, image_token_id),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
    if qwen:
        # Qwen2-VL: tokenizer + chat template + preprocessor_config.json (read by Preprocessor
        # itself: transformers' Qwen2VLProcessor needs torchvision for its video half)
        tokenizer.chat_template = CHAT_TEMPLATE
        directory.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(directory)
        return
    anyres = "image_grid_pinpoints" in ip_kwargs  # LLaVA-NeXT
    processor_cls = LlavaNextProcessor if anyres else LlavaProcessor
    image_cls = LlavaNextImageProcessorPil if anyres else CLIPImageProcessorPil
    processor = processor_cls(
        image_processor=image_cls(**ip_kwargs),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=num_additional_image_tokens,
    )
    directory.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(directory)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (what transformers' convert_to_rgb does)."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_image(item: str | os.PathLike[str] | Image.Image) -> Image.Image:
    """An image file (or a PIL image) as an RGB PIL image, with one-line UsageErrors."""
    if isinstance(item, Image.Image):
        return _to_rgb(item)
    if not isinstance(item, (str, os.PathLike)):
        raise UsageError(f"image {item!r}: expected a file path or a PIL image, got {type(item).__name__}")
    path = Path(item)
    if not path.exists():
        raise UsageError(f"image {path}: no such file")
    if not path.is_file():
        raise UsageError(f"image {path}: not a file")
    try:
        with Image.open(path) as im:
            im.load()
            return _to_rgb(im)
    except UnidentifiedImageError:
        raise UsageError(f"image {path}: not an image file (Pillow cannot identify its format)") from None
    except Image.DecompressionBombError as e:
        raise UsageError(f"image {path}: too large to decode ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated / corrupt files, permission errors
        raise UsageError(
            f"image {path}: cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


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


def _is_qwen2vl(model_dir: Path) -> bool:
    path = model_dir / "preprocessor_config.json"
    try:
        kind = json.loads(path.read_text()).get("image_processor_type", "") if path.is_file() else ""
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return kind.startswith("Qwen2VLImageProcessor")


class _Qwen2VLProcessor:
    """The tokenizer (with its chat template) and the image settings of a Qwen2-VL checkpoint.

    transformers' Qwen2VLProcessor cannot be built without torchvision (its video processor);
    the static export needs only the image normalisation and patch sizes, read from
    preprocessor_config.json, and the tokenizer's chat template.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = getattr(tokenizer, "chat_template", None) or chat_template
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"

    @classmethod
    def from_dir(cls, model_dir: Path) -> _Qwen2VLProcessor:
        from types import SimpleNamespace

        from transformers import AutoTokenizer

        pre = json.loads((model_dir / "preprocessor_config.json").read_text())
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--model {model_dir}: cannot load the tokenizer: {first}") from None
        image = SimpleNamespace(
            image_mean=pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),
            image_std=pre.get("image_std", [0.26862954, 0.26130258, 0.27577711]),
            rescale_factor=pre.get("rescale_factor", 1 / 255),
            patch_size=pre.get("patch_size", 14),
            temporal_patch_size=pre.get("temporal_patch_size", 2),
            merge_size=pre.get("merge_size", 2),
        )
        # the processor's own template where the tokenizer has none (chat_template.jinja / .json)
        template = None
        if (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text()
        elif (model_dir / "chat_template.json").is_file():
            template = json.loads((model_dir / "chat_template.json").read_text()).get("chat_template")
        return cls(tokenizer, image, template)

    def apply_chat_template(self, messages: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(messages, chat_template=chat_template, **kwargs)


class Preprocessor:
    """A checkpoint's LlavaProcessor, used to build the exported graphs' inputs."""

    def __init__(self, processor: Any, source: str = "", geometry: Any = None) -> None:
        self.processor = processor
        # the export's static image layout (LLaVA-NeXT tile grid, Qwen2-VL resolution); None: LLaVA-1.5
        self.geometry = geometry
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.source = source
        image_token = getattr(processor, "image_token", None) or IMAGE_TOKEN
        ids = self.tokenizer.encode(image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise UsageError(
                f"{source or 'processor'}: image token {image_token!r} is not a single token ({ids})"
            )
        self.image_token = image_token
        self._image_token_id = int(ids[0])

    @classmethod
    def from_dir(cls, model_dir: str | Path, geometry: Any = None) -> Preprocessor:
        """Load ``model_dir``'s processor offline (local files only, PIL image backend).

        ``geometry``: the export's ``load.Geometry`` (its static image layout); None for LLaVA-1.5."""
        from transformers import AutoProcessor

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise UsageError(f"--model {model_dir}: no such directory")
        missing = _missing_files(model_dir)
        if missing:
            raise UsageError(f"--model {model_dir}: cannot encode prompts, missing {'; '.join(missing)}")
        if _is_qwen2vl(model_dir):
            return cls(_Qwen2VLProcessor.from_dir(model_dir), source=str(model_dir), geometry=geometry)
        try:
            processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True, backend="pil")
        except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--model {model_dir}: cannot load the processor: {first}") from None
        if (
            getattr(processor, "tokenizer", None) is None
            or getattr(processor, "image_processor", None) is None
        ):
            raise UsageError(
                f"--model {model_dir}: the processor ({type(processor).__name__}) lacks a tokenizer or an image processor"
            )
        return cls(processor, source=str(model_dir), geometry=geometry)

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
        for tid in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if tid is not None:
                return int(tid)
        return 0

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images (LLaVA-NeXT: of one tile) fed to the vision tower."""
        if self.geometry is not None and self.geometry.arch == "qwen2_vl":
            return self.geometry.image_size, self.geometry.image_size
        crop = self.image_processor.crop_size
        return int(crop["height"]), int(crop["width"])

    # ---- text ---------------------------------------------------------------------------------
    def prompt_text(self, prompt: str) -> str:
        """The chat-templated text of one user turn (one image, then ``prompt``), ready for the answer."""
        if not isinstance(prompt, str):
            raise UsageError(f"prompt must be a string, got {type(prompt).__name__}")
        if self.image_token in prompt:
            raise UsageError(
                f"prompt {prompt!r} contains the image placeholder {self.image_token!r}; "
                "leave it out, the chat template places the image"
            )
        template = getattr(self.processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )
        if not template:
            raise UsageError(f"{self.source or 'processor'}: no chat template (chat_template.jinja)")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
        if isinstance(text, list):  # batched form
            text = text[0]
        return text

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``input_ids`` and ``attention_mask`` (int64 [B, T]), left-padded, one placeholder per row."""
        if isinstance(prompts, str) or not prompts:
            raise UsageError("prompts: expected a non-empty list of strings")
        rows: list[list[int]] = []
        bos = self.tokenizer.bos_token
        for i, prompt in enumerate(prompts):
            text = self.prompt_text(prompt)
            # A template that writes the BOS itself must not get a second one from the tokenizer.
            add_special = not (bos and text.startswith(bos))
            ids = [int(t) for t in self.tokenizer(text, add_special_tokens=add_special)["input_ids"]]
            n_img = ids.count(self.image_token_id)
            if n_img != 1:
                raise UsageError(
                    f"prompt {i} ({prompt!r}): {n_img} image placeholders after templating, exactly one is needed"
                )
            if ids.index(self.image_token_id) == len(ids) - 1:
                raise UsageError(f"prompt {i} ({prompt!r}): no token follows the image placeholder")
            rows.append(ids)
        length = max(len(r) for r in rows)
        input_ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        for b, ids in enumerate(rows):
            input_ids[b, length - len(ids) :] = ids
            attention_mask[b, length - len(ids) :] = 1
        return input_ids, attention_mask

    # ---- images -------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[str | os.PathLike[str] | Image.Image]) -> np.ndarray:
        """float32 [B, 3, H, W] as the checkpoint's image processor (PIL backend) computes it.

        LLaVA-NeXT: [B, 1 + rows*cols, 3, S, S]: the processor's anyres path with the grid's
        resolution as the only pinpoint, so every image is letterboxed into that same grid.
        Qwen2-VL: [B, (S/P)^2, C*Tp*P*P]: resized to the export's S x S (bicubic, aspect not kept),
        rescaled and normalised with the processor's mean/std, cut into patches in the processor's
        order (``qwen2vl.patchify``).
        """
        if isinstance(images, (str, os.PathLike, Image.Image)) or not images:
            raise UsageError("images: expected a non-empty list of image files or PIL images")
        pil = [load_image(item) for item in images]
        geo = self.geometry
        if geo is not None and geo.arch == "qwen2_vl":
            return np.stack([self._qwen2vl_pixels(im) for im in pil])
        kwargs: dict[str, Any] = {}
        if geo is not None and geo.arch == "llava_next":
            crop = self.image_size
            kwargs["image_grid_pinpoints"] = [[geo.grid[0] * crop[0], geo.grid[1] * crop[1]]]
        out = self.image_processor(pil, return_tensors="np", **kwargs)["pixel_values"]
        return np.ascontiguousarray(out, dtype=np.float32)

    def _qwen2vl_pixels(self, image: Image.Image) -> np.ndarray:
        from star_export.qwen2vl import patchify

        ip, size = self.image_processor, self.geometry.image_size
        array = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        array = array * float(ip.rescale_factor)
        array = (array - np.asarray(ip.image_mean, np.float32)) / np.asarray(ip.image_std, np.float32)
        merge = int(getattr(ip, "merge_size", 2))
        return patchify(array.transpose(2, 0, 1), int(ip.patch_size), merge, int(ip.temporal_patch_size))

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
