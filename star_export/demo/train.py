"""Train a small vision-language model from scratch on the synthetic question set (``scenes``).

The model is an embedded recipe's (the real transformers class, seeded random weights), read and
written through the same code as any ``--model DIR``: the recipe is materialised as a checkpoint
directory, loaded, trained, and saved with its processor files and a model card. Prompts go
through the export's own pre-processing (``Preprocessor``: chat template, image processor) and
the family's ``hf_inputs`` (the unmodified model's inputs), so training sees exactly what the
exported graphs see. The loss is on the answer's tokens and the end-of-sequence token only.

Three phases (``phase``), because a decoder trained from scratch on pixels alone learns to read
colour and position and stalls below 50 % (measured: README, "A model that sees"):

1. ``symbolic_steps``: the decoder alone, on a symbolic code of each patch (``patch_code``: shape,
   colour, object centre, place) where the image embeddings go, in short rows of every object patch
   and a few background ones at their original position ids, several questions per image (``turns``).
2. ``vision_steps``: the vision tower and projector alone, taught to write that code from pixels
   (``DenseTarget``; the forward stops at the projector).
3. the rest: the whole model on the answers, with the dense targets kept.

Resumable: ``out/.train/state.pt`` holds the weights, optimiser, step and history after every
evaluation; the data of step s are samples ``s * batch ..`` of the train split, so a resumed run
draws what the uninterrupted one would. Accuracy is exact match of the whole answer under
teacher forcing (every answer token and the end token the argmax), which is what greedy decoding
produces.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from star_export.demo import scenes

STATE = ".train/state.pt"


@dataclass
class TrainConfig:
    recipe: str = "llava-demo"
    seed: int = 0
    steps: int = 4000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    eval_every: int = 250
    eval_count: int = 240  # validation samples per evaluation (40 per question kind)
    test_count: int = 600  # test samples for the final accuracy (100 per question kind)
    easy_steps: int = 0  # a curriculum: the first easy_steps steps draw scenes of two shapes only
    captions: float = 0.0  # the share of each batch that is captioning (scenes.caption), not questions
    aux_weight: float = 1.0  # weight of the dense per-patch targets (probe and symbolic code; 0: off)
    symbolic_steps: int = 0  # a first phase: the decoder alone, reading each patch's symbolic code
    vision_steps: int = 0  # then the vision tower and projector alone, taught to write that code
    symbolic_tokens: int = 0  # image tokens a row in that phase (objects + random background; 0: all)
    turns: int = 1  # questions about one image, asked one after another in one training sequence
    position_init: str = "default"  # "sincos": the vision tower's position table starts as 2-D sines
    code_place: bool = True  # the symbolic code writes each patch's place (False: M-RoPE ids carry it)


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)  # the dense per-patch loss, step by step


CODE_GAIN = 2.0
FREQUENCIES = (1, 2, 4)


def patch_code(labels: np.ndarray, grid: int, dim: int, place: bool = True) -> np.ndarray:
    """What each patch shows, written as an image embedding a decoder can read: (N, dim) float32 for
    ``scenes.patch_labels``' N classes in raster order over a ``grid`` x ``grid`` patch grid.

    Channels: background or one of the shapes (one-hot), the colour (one-hot), the object-centre
    flag, each scaled by CODE_GAIN; then the patch's column and row as sines and cosines
    (FREQUENCIES; zeros with ``place`` False: a tower with only rotary positions cannot write an
    absolute place, and an M-RoPE decoder reads it from the tokens' position ids); the rest zero.
    The training's first phase feeds it to the decoder in place of the projector's output
    (``TrainConfig.symbolic_steps``), and the second asks the projector to produce it
    (``DenseTarget``): the decoder learns to read objects in clean features while the vision tower
    learns to find them. Training only: nothing of it is in a checkpoint."""
    n_shapes, n_colours = len(scenes.SHAPES), len(scenes.COLOURS)
    centre = labels > scenes.PATCH_KINDS
    kind = np.where(centre, labels - scenes.PATCH_KINDS, labels)
    obj = kind > 0
    colour, shape = (kind - 1) // n_shapes, (kind - 1) % n_shapes
    out = np.zeros((len(labels), dim), np.float32)
    out[~obj, 0] = CODE_GAIN
    out[obj, 1 + shape[obj]] = CODE_GAIN
    out[obj, 1 + n_shapes + colour[obj]] = CODE_GAIN
    out[centre, 1 + n_shapes + n_colours] = CODE_GAIN
    where = (np.arange(grid) + 0.5) / grid
    row, col = np.meshgrid(where, where, indexing="ij")
    waves = [f(math.pi * k * v) for k in FREQUENCIES for v in (col, row) for f in (np.sin, np.cos)]
    first = 2 + n_shapes + n_colours
    if place:
        out[:, first : first + len(waves)] = np.stack(waves, -1).reshape(grid * grid, -1)
    return out


def sincos_table(grid: int, dim: int) -> np.ndarray:
    """(grid * grid, dim) float32: the fixed 2-D sine-cosine position embedding of MAE / ViT (half the
    channels encode the row, half the column, each as sines and cosines at dim / 4 frequencies from 1
    down to 1 / 10000), raster order. ``position_init = "sincos"`` starts a learned position table
    from it: a tower initialised with small random positions (CLIP's) reads what a patch shows long
    before where it is, and the place is half of what position and relation questions ask."""
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine table needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    row, col = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = [f(np.outer(v.reshape(-1), omega)) for v in (row, col) for f in (np.sin, np.cos)]
    return np.concatenate(parts, axis=1).astype(np.float32)


class StopForward(Exception):
    """Raised by ``DenseTarget``'s hook once the projector's output is seen (``DenseTarget.stop``)."""


class DenseTarget(torch.nn.Module):
    """Dense per-patch targets for the second phase, from ``scenes.patch_labels``: a linear probe on
    the stage-1 candidates (the input of ``Family.raster_candidates``, the projector) trained to name
    what each patch shows, a signal that teaches the vision tower objects in hundreds of steps where
    one-word answers alone take thousands; and the symbolic code (``patch_code``) as the target of the
    projector's output, the embeddings the first phase taught the decoder to read. Training only: the
    probe is not part of the saved checkpoint."""

    def __init__(self, module: torch.nn.Module | None, dim: int, grid: int, weight: float):
        super().__init__()
        self.active = module is not None and weight > 0
        self.grid = grid
        self.head = torch.nn.Linear(dim, scenes.N_CLASSES) if self.active else None
        self._seen: list[torch.Tensor] = []
        self.stop = False
        self._hook = module.register_forward_hook(self._keep) if self.active else None

    def _keep(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        self._seen = [args[0], output]
        if self.stop:  # the vision phase: nothing after the projector is needed
            raise StopForward

    def loss(self, labels: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        if not self.active or not self._seen:
            return torch.zeros(())
        (features, embeds), self._seen = self._seen, []
        # (B, N, .) already, or a merger's flat rows: m*m patch rows per token, tokens in raster order
        features, embeds = features.reshape(*labels.shape, -1), embeds.reshape(*labels.shape, -1)
        probe = torch.nn.functional.cross_entropy(self.head(features).flatten(0, 1), labels.flatten())
        return probe + torch.nn.functional.mse_loss(embeds, code.to(embeds.dtype))

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()


class Batcher:
    """Samples -> the unmodified model's training inputs (right padded) and the answers' labels."""

    def __init__(self, loaded: Any, size: int, patch: int, place: bool = True):
        from star_export.families import family_of
        from star_export.preprocess import Preprocessor

        self.model, self.geo = loaded.model, loaded.geometry
        self.family = family_of(self.geo)
        self.pre = Preprocessor.from_dir(loaded.model_dir, geometry=self.geo)
        self.size, self.patch, self.place = size, patch, place
        self.eos = self.pre.eos_token_id
        self._answers: dict[str, list[int]] = {}
        self._prompts: dict[str, list[int]] = {}

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answers:
            ids = self.pre.processor.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            self._answers[answer] = [int(t) for t in ids] + [int(self.eos)]
        return self._answers[answer]

    def _prompt(self, question: str, pixels: torch.Tensor | None) -> tuple[list[int], dict[str, Any]]:
        """The unmodified model's prompt ids (the image placeholder expanded) and its other inputs."""
        if pixels is None and question in self._prompts:
            return self._prompts[question], {}
        ids, mask = self.pre.encode_prompts([question])
        blank = torch.zeros(3, self.size, self.size) if pixels is None else pixels
        inputs = self.family.hf_inputs(self.model, self.geo, blank, ids[0][mask[0] == 1].tolist())
        prompt = inputs.pop("input_ids")[0].tolist()
        for key in PER_TOKEN:  # rebuilt for the whole row (positions) or not needed
            inputs.pop(key, None)
        if pixels is None:  # symbolic rows: the prompt depends on the question alone
            self._prompts[question] = prompt
            return prompt, {}
        return prompt, inputs

    def __call__(
        self,
        batch: list[scenes.Sample] | list[list[scenes.Sample]],
        symbolic: bool = False,
        tokens: int = 0,
        rng: np.random.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training inputs, a row per image; an entry of ``batch`` is a sample or several about one
        scene (a conversation: the first question in the prompt's format, the next ones appended
        after each answer, every answer labelled). ``symbolic``: no pixels, the rows' ``code``
        stands in for the image, and with ``tokens`` only that many image tokens a row: every patch
        an object covers and background ones drawn by ``rng``, at their original position ids (as
        STAR keeps them)."""
        turns = [b if isinstance(b, list) else [b] for b in batch]
        pixels: list[torch.Tensor | None] = [None] * len(turns)
        if not symbolic:
            feeds = self.pre.pixel_values([scenes.render(t[0].scene, self.size) for t in turns])
            pixels = [torch.from_numpy(p) for p in feeds]
        grid, dim = self.size // self.patch, self.model.config.text_config.hidden_size
        patch_labels = [scenes.patch_labels(t[0].scene, self.size, self.patch) for t in turns]
        codes = [patch_code(p, grid, dim, self.place) for p in patch_labels]
        n = len(patch_labels[0])
        rows, labels, positions, extras = [], [], [], []
        for b, (conv, px) in enumerate(zip(turns, pixels, strict=True)):
            row, inputs = self._prompt(conv[0].question, px)
            first = row.index(self.geo.image_token_id)
            label = [-100] * len(row)
            for i, s in enumerate(conv):
                if i:  # a follow-up: the next question's prompt after the image span
                    follow = self._prompt(s.question, None)[0][first + n :]
                    row, label = row + follow, label + [-100] * len(follow)
                answer = self.answer_ids(s.answer)
                row, label = row + answer, label + answer
            # (A, L): 0..L-1, or M-RoPE's t / h / w ids as the unmodified model computes them
            unexpanded = [*row[:first], self.geo.image_token_id, *row[first + n :]]
            position = self.family.full_positions(self.model, self.geo, None, unexpanded)
            if symbolic and tokens:
                kept = _sparse(patch_labels[b], tokens, rng or np.random.default_rng(0))
                keep = list(range(first)) + [first + int(k) for k in kept] + list(range(first + n, len(row)))
                row, label = ([v[i] for i in keep] for v in (row, label))
                position = position[:, keep]
                codes[b] = codes[b][kept]
            rows.append(row)
            labels.append(label)
            positions.append(position)
            extras.append(inputs)
        length = max(map(len, rows))
        pad = self.pre.pad_token_id
        out = {
            "input_ids": torch.tensor([r + [pad] * (length - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
            "labels": torch.tensor([r + [-100] * (length - len(r)) for r in labels]),
        }
        if (symbolic and tokens) or self.geo.position_axes > 1:  # else the model's own 0..L-1
            padded = [  # padding continues each axis past the row's last position
                torch.cat([p, p[:, -1:] + 1 + torch.arange(length - p.shape[1])], dim=1) for p in positions
            ]
            ids = torch.stack(padded, dim=1)  # (A, B, L)
            out["position_ids"] = ids[0] if self.geo.position_axes == 1 else ids
        for key in extras[0]:
            out[key] = torch.cat([e[key] for e in extras])
        out["patch_labels"] = torch.from_numpy(np.stack(patch_labels)).long()
        out["code"] = torch.from_numpy(np.stack(codes))
        return out


def _sparse(labels: np.ndarray, tokens: int, rng: np.random.Generator) -> np.ndarray:
    """``tokens`` patch indices in raster order: every object patch (the first ``tokens`` of them if
    there are more) and background ones drawn at random."""
    objects = np.flatnonzero(labels > 0)[:tokens]
    background = np.flatnonzero(labels == 0)
    drawn = rng.choice(background, size=tokens - len(objects), replace=False)
    return np.sort(np.concatenate([objects, drawn]))


TARGETS = ("labels", "patch_labels", "code")  # the Batcher's training targets, never model inputs
PER_TOKEN = ("attention_mask", "mm_token_type_ids", "token_type_ids")  # hf_inputs' keys laid out per token


def model_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Batcher's output without its training targets: what the model's forward takes."""
    return {k: v for k, v in inputs.items() if k not in TARGETS}


def answer_logits(
    model: Any, inputs: dict[str, torch.Tensor], image_token_id: int
) -> tuple[torch.Tensor, ...]:
    """The logits of the labelled positions only (the answers; the head over the whole sequence is a
    quarter of a step), their targets and their rows. Rows without pixels read ``code`` in place of
    the image embeddings (the symbolic phase)."""
    feed = model_inputs(inputs)
    if "pixel_values" not in feed:
        ids = feed.pop("input_ids")
        embeds = model.get_input_embeddings()(ids)
        image = (ids == image_token_id)[..., None]
        feed["inputs_embeds"] = embeds.masked_scatter(image, inputs["code"].to(embeds.dtype))
    hidden = model.model(**feed).last_hidden_state[:, :-1]
    target = inputs["labels"][:, 1:]
    where = target != -100
    return model.lm_head(hidden[where]), target[where], where.nonzero()[:, 0]


def rows_exact(logits: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) 1.0 where every labelled position of the row is predicted (``answer_logits``' layout)."""
    wrong = (logits.argmax(-1) != target).float()
    return (torch.zeros(n).index_add(0, rows, wrong) == 0).float()


def batch_of(cfg: TrainConfig, step: int, most: int) -> list[list[scenes.Sample]]:
    """Step ``step``'s images: conversations ``step * batch ..`` of the train split
    (``scenes.conversation``, ``turns`` questions each), the first ``captions * batch`` of them
    replaced by the captioning samples of the same indices."""
    n_cap = round(cfg.captions * cfg.batch)
    start = step * cfg.batch
    captions = [[scenes.caption_sample(cfg.seed, "train", start + i, most)] for i in range(n_cap)]
    talks = [
        scenes.conversation(cfg.seed, "train", i, cfg.turns, most)
        for i in range(start + n_cap, start + cfg.batch)
    ]
    return captions + talks


def accuracy(
    model: Any, batcher: Batcher, samples: list[scenes.Sample], batch: int = 48, symbolic: bool = False
) -> dict[str, float]:
    """Exact-match accuracy overall and per question kind (``symbolic``: on the symbolic code)."""
    model.eval()
    hits: dict[str, list[float]] = {}
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        logits, target, rows = answer_logits(model, batcher(chunk, symbolic), batcher.geo.image_token_id)
        ok = rows_exact(logits, target, rows, len(chunk))
        for s, v in zip(chunk, ok.tolist(), strict=True):
            hits.setdefault(s.kind, []).append(v)
    model.train()
    out = {k: float(np.mean(v)) for k, v in sorted(hits.items())}
    out["all"] = float(np.mean([v for vs in hits.values() for v in vs]))
    return out


def phase(cfg: TrainConfig, step: int) -> tuple[str, int, int]:
    """Step ``step``'s phase and its [start, end): "symbolic" (the decoder on the code), "vision"
    (the vision tower and projector on the dense targets), "joint" (the whole model on answers and
    dense targets)."""
    vision = cfg.symbolic_steps + cfg.vision_steps
    if step < cfg.symbolic_steps:
        return "symbolic", 0, cfg.symbolic_steps
    if step < vision:
        return "vision", cfg.symbolic_steps, vision
    return "joint", vision, cfg.steps


def _schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """Warm-up then cosine, once per phase (``phase``)."""

    def factor(step: int) -> float:
        _, start, end = phase(cfg, step)
        step -= start
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, end - start - cfg.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def plot(history: History, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    loss = np.asarray(history.loss)
    window = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    ax.plot(history.steps[window - 1 :], smooth, color="tab:blue", label="train loss (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(history.eval_steps, [100 * a for a in history.val_accuracy], "o-", color="tab:red", label="val")
    ax2.set_ylabel("validation exact match (%)")
    ax2.set_ylim(0, 100)
    fig.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(
    out: str | Path, cfg: TrainConfig, log: Callable[[str], None] = print, progress: bool = True
) -> dict[str, Any]:
    """Train ``cfg.recipe``'s model into ``out`` (resuming from ``out/.train`` when it is there);
    returns the model card's figures."""
    from tqdm import tqdm

    from star_export.load import load, materialise
    from star_export.recipes import load_recipe

    if cfg.position_init not in ("default", "sincos"):  # before the model is loaded
        raise ValueError(f"position_init must be 'default' or 'sincos', got {cfg.position_init!r}")
    out = Path(out)
    recipe = load_recipe(cfg.recipe)
    loaded = load(materialise(recipe), source=f"recipe:{recipe.name}", options=recipe.layout)
    model = loaded.model
    model.set_attn_implementation("sdpa")
    size = int(recipe.image["size"])
    side = math.isqrt(loaded.geometry.n_visual)  # visual tokens across a square image
    if side * side != loaded.geometry.n_visual or size % side:
        raise ValueError(
            f"{cfg.recipe}: {loaded.geometry.n_visual} visual tokens are not a square grid of {size} px"
        )
    batcher = Batcher(loaded, size, size // side, cfg.code_place)  # patch: the pixels of one token
    torch.manual_seed(cfg.seed)
    if cfg.position_init == "sincos":
        positions = batcher.family.patch_positions(model)
        if positions is None:
            raise ValueError(f"{cfg.recipe}: the vision tower has no learned position table to initialise")
        side = math.isqrt(positions.shape[0])  # the table's grid (LLaVA: the patch grid)
        with torch.no_grad():
            positions.copy_(torch.from_numpy(sincos_table(side, positions.shape[1])))
    dense = DenseTarget(
        batcher.family.raster_candidates(model),
        batcher.family.candidate_width(model),
        size // batcher.patch,
        cfg.aux_weight,
    )
    if cfg.symbolic_steps and not dense.active:
        raise ValueError(f"{cfg.recipe}: no raster of candidates to write a symbolic code for")
    opt = torch.optim.AdamW(
        [*model.parameters(), *dense.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    history, step = History(), 0
    state_path = out / STATE
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["config"] != asdict(cfg):
            raise ValueError(f"{state_path} was written with other settings: {state['config']}")
        model.load_state_dict(state["model"])
        dense.load_state_dict(state["dense"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        history, step = History(**state["history"]), state["step"]
        log(f"resuming at step {step} of {cfg.steps}")
    val = list(scenes.samples(cfg.seed, "val", cfg.eval_count))
    decoder = [*model.get_decoder().parameters(), *model.get_output_embeddings().parameters()]
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, unit="step")
    while step < cfg.steps:
        most = 2 if step < cfg.easy_steps else scenes.MAX_OBJECTS
        name, start, _ = phase(cfg, step)
        symbolic = name == "symbolic"
        # the joint phase's warm-up after a symbolic one moves the vision tower and projector only:
        # the decoder the first phase trained is not bent to fit a projector that does not yet write
        # the code
        settle = cfg.symbolic_steps > 0 and name == "joint" and step < start + cfg.warmup
        for p in decoder:
            p.requires_grad_(not settle)
        rng = np.random.default_rng([cfg.seed, step])
        inputs = batcher(batch_of(cfg, step, most), symbolic, cfg.symbolic_tokens, rng)
        if name == "vision":
            dense.stop = True
            try:
                model.model(**model_inputs(inputs))
            except StopForward:
                pass
            dense.stop = False
            loss = torch.zeros(())
        else:
            logits, target, _ = answer_logits(model, inputs, batcher.geo.image_token_id)
            loss = torch.nn.functional.cross_entropy(logits, target)
        aux = dense.loss(inputs["patch_labels"], inputs["code"])
        history.aux.append(float(aux.detach()))
        loss = loss + cfg.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        history.steps.append(step)
        history.loss.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{history.loss[-1]:.3f}", dense=f"{history.aux[-1]:.3f}")
        if step % cfg.eval_every == 0 or step in (
            cfg.symbolic_steps,
            cfg.symbolic_steps + cfg.vision_steps,
            cfg.steps,
        ):
            acc = accuracy(model, batcher, val, symbolic=step <= cfg.symbolic_steps)
            history.eval_steps.append(step)
            history.val_accuracy.append(acc["all"])
            mode = " (symbolic code)" if step <= cfg.symbolic_steps else ""
            bar.write(f"step {step}: val exact match{mode} {100 * acc['all']:.1f} % " + json.dumps(acc))
            state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = state_path.with_suffix(".tmp")
            torch.save(
                {
                    "config": asdict(cfg),
                    "model": model.state_dict(),
                    "dense": dense.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "history": asdict(history),
                    "step": step,
                },
                tmp,
            )
            tmp.replace(state_path)
            if step in (cfg.symbolic_steps, cfg.symbolic_steps + cfg.vision_steps):  # a phase's end, kept
                shutil.copy(state_path, state_path.with_name(f"state-{step}.pt"))
            plot(history, out / "training.png")
    bar.close()
    dense.remove()
    test = accuracy(model, batcher, list(scenes.samples(cfg.seed, "test", cfg.test_count)))
    model.eval()
    model.set_attn_implementation("eager")
    model.save_pretrained(out)
    for f in loaded.model_dir.iterdir():  # the processor files (tokenizer, template, image processor)
        if f.is_file() and not f.name.startswith(("model", "config")) and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    card = {
        "recipe": cfg.recipe,
        "architecture": recipe.architecture,
        "description": recipe.description,
        "config": asdict(cfg),
        "test_exact_match": test,
        "val_exact_match": history.val_accuracy[-1] if history.val_accuracy else None,
        "train_seconds_this_run": round(time.perf_counter() - started, 1),
        "final_loss": float(np.mean(history.loss[-50:])) if history.loss else None,
        # the weights are bit-identical across runs of one command at one thread count (measured:
        # two 2-thread runs, same hash); a different count sums in another order and trains another model
        "torch_threads": torch.get_num_threads(),
        "weights_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
    }
    (out / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(model_card(cfg, card, history))
    return card


def model_card(cfg: TrainConfig, card: dict[str, Any], history: History) -> str:
    """The checkpoint's README.md: what it is, the data, the command that made it, its accuracy."""
    flags = " ".join(
        [f"--threads {card['torch_threads']}"]
        + [f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if v != getattr(TrainConfig(), k)]
    )
    test = card["test_exact_match"]
    kinds = "\n".join(f"| {k} | {100 * v:.1f} % |" for k, v in test.items() if k != "all")
    samples = len(history.steps) * cfg.batch
    rest = cfg.steps - cfg.symbolic_steps - cfg.vision_steps
    joint = (
        f"{rest} steps of the whole model on the answers with the same dense targets"
        if rest > 0
        else "no joint phase: the decoder of the first phase reads what the vision tower learned to write"
    )
    start = (
        " The vision tower's patch position table started from MAE's 2-D sine-cosine table instead of"
        " small random values, so that the tower can write each patch's place."
        if cfg.position_init == "sincos"
        else ""
    )
    return f"""# {cfg.recipe}: a small vision-language model trained to answer questions about synthetic scenes

`{card["architecture"]}` ({card["description"]}), built from the recipe
`recipes/{cfg.recipe}.toml` and trained from scratch, CPU only, by star_export's
`tools/train_demo.py`. It exists to show what STAR's pruning costs in answers on a model that has
learned something (`python -m star_export compare`); it knows nothing but these scenes.

- Data: `star_export/demo/scenes.py`, seed {cfg.seed}: 2-4 small circles / squares / triangles in six
  colours on plain or textured backgrounds; one-word questions on colour, shape, count, position,
  presence and one relation. Train, validation and test are separate random streams of the seed.
- Training: {len(history.steps)} steps of {cfg.batch} images ({samples:,} images, each drawn fresh,
  up to {cfg.turns} questions each), AdamW lr {cfg.lr} (warm-up {cfg.warmup} and cosine per phase), in
  phases: {cfg.symbolic_steps} steps of the decoder alone reading a symbolic code of each patch
  (shape, colour, object centre, place) in place of the image embeddings, {cfg.vision_steps} of the
  vision tower and projector alone learning to write that code from pixels (and a linear probe naming
  each patch), then {joint}. The code and the
  probe are training-only: nothing of them is in these weights, which are read like any checkpoint's.{start}
- Command: `python tools/train_demo.py --out DIR {flags}` ({card["train_seconds_this_run"] / 60:.0f} minutes
  of training in its last run, CPU only; the validation curve reads the symbolic code during the first
  phase and images after it). At that thread count the command writes these weights bit for bit
  (sha256 `{card["weights_sha256"]}`); another count trains a different model.
- Test exact match ({cfg.test_count} questions, teacher forcing = greedy): **{100 * test["all"]:.1f} %**

| question kind | exact match |
| --- | --- |
{kinds}

Loss and validation curves: `training.png`; every figure: `training.json`.
"""
