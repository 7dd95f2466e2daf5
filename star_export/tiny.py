"""The tokenizer of the embedded tiny checkpoints: a small but real byte-level BPE, trained
deterministically on the text below, with a LLaVA-1.5 style chat template. Nothing is fetched.

Family modules wrap it in their processor (``families/*.write_tiny_processor``) so that an embedded
recipe's checkpoint directory is loaded exactly like a real ``--model DIR``.
"""

from __future__ import annotations

import hashlib
from typing import Any

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


def tiny_tokenizer(vocab_size: int = 1000, image_token_id: int = 1000) -> Any:
    """A ``PreTrainedTokenizerFast``: ids 0 ``<pad>``, 1 ``<s>`` (BOS, added by the tokenizer),
    2 ``</s>`` (EOS), byte-level BPE tokens up to ``vocab_size - 1``, ``<image>`` at
    ``image_token_id``; left padding. Byte-identical across runs; the family sets the template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(vocab_size, image_token_id),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
