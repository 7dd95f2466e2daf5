"""Train a small vision-language model from scratch on the synthetic question set (``scenes``).

The model is an embedded recipe's (the real transformers class, seeded random weights), read and
written through the same code as any ``--model DIR``: the recipe is materialised as a checkpoint
directory, loaded, trained, and saved with its processor files and a model card. Prompts go
through the export's own pre-processing (``Preprocessor``: chat template, image processor) and
the family's ``hf_inputs`` (the unmodified model's inputs), so training sees exactly what the
exported graphs see. The loss is on the answer's tokens and the end-of-sequence token only.

Resumable: ``out/.train/state.pt`` holds the weights, optimiser, step and history after every
evaluation; the data of step s are samples ``s * batch ..`` of the train split, so a resumed run
draws what the uninterrupted one would. Accuracy is exact match of the whole answer under
teacher forcing (every answer token and the end token the argmax), which is what greedy decoding
produces.
"""

from __future__ import annotations

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
    aux_weight: float = 1.0  # weight of the dense per-patch target on the stage-1 candidates (0: off)


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)  # the dense per-patch loss, step by step


SHAPE_GAIN = 4.0


class DenseTarget(torch.nn.Module):
    """Linear probes trained to name what each patch shows (``scenes.patch_labels``): one on the
    stage-1 candidates (the input of ``Family.raster_candidates``, the projector) and one on the
    projector's output (the decoder's image embeddings). A dense signal that teaches the vision tower
    objects in hundreds of steps where one-word answers alone take thousands; the second probe and a
    fixed target for the shape (``loss``) make the projector pass each patch's shape on to the decoder
    from the start (an untrained decoder gives the projector no reason to keep what it does not use
    yet). Training only: the
    probes are not part of the saved checkpoint."""

    def __init__(self, module: torch.nn.Module | None, dim: int, out_dim: int, weight: float):
        super().__init__()
        self.active = module is not None and weight > 0
        self.head = torch.nn.Linear(dim, scenes.N_CLASSES) if self.active else None
        self.out_head = torch.nn.Linear(out_dim, scenes.N_CLASSES) if self.active else None
        self._seen: list[torch.Tensor] = []
        self._hook = module.register_forward_hook(self._keep) if self.active else None

    def _keep(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        self._seen = [args[0], output]

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.active or not self._seen:
            return torch.zeros(())
        (features, embeds), self._seen = self._seen, []
        flat = labels.flatten()
        on_features = torch.nn.functional.cross_entropy(self.head(features).flatten(0, 1), flat)
        on_embeds = torch.nn.functional.cross_entropy(self.out_head(embeds).flatten(0, 1), flat)
        # the shape, written loudly: the embedding's first len(SHAPES) + 1 channels are SHAPE_GAIN x a
        # one-hot of (background, circle, square, triangle). Measured without it: shape is 1-3 % of the
        # object embeddings' variance beside colour's 60-70 %, and the decoder never learned to read it.
        kind = torch.where(labels > scenes.PATCH_KINDS, labels - scenes.PATCH_KINDS, labels)
        shape = torch.where(kind > 0, 1 + (kind - 1) % len(scenes.SHAPES), 0)
        target = SHAPE_GAIN * torch.nn.functional.one_hot(shape, len(scenes.SHAPES) + 1).to(embeds.dtype)
        loud = torch.nn.functional.mse_loss(embeds[..., : len(scenes.SHAPES) + 1], target)
        return on_features + on_embeds + loud

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()


class Batcher:
    """Samples -> the unmodified model's training inputs (right padded) and the answers' labels."""

    def __init__(self, loaded: Any, size: int, patch: int):
        from star_export.families import family_of
        from star_export.preprocess import Preprocessor

        self.model, self.geo = loaded.model, loaded.geometry
        self.family = family_of(self.geo)
        self.pre = Preprocessor.from_dir(loaded.model_dir, geometry=self.geo)
        self.size, self.patch = size, patch
        self.eos = self.pre.eos_token_id
        self._answers: dict[str, list[int]] = {}

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answers:
            ids = self.pre.processor.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            self._answers[answer] = [int(t) for t in ids] + [int(self.eos)]
        return self._answers[answer]

    def __call__(self, batch: list[scenes.Sample]) -> dict[str, torch.Tensor]:
        images = [scenes.render(s.scene, self.size) for s in batch]
        feeds = self.pre.encode(images, [s.question for s in batch])
        rows, labels, extras = [], [], []
        for b, s in enumerate(batch):
            ids = feeds["input_ids"][b][feeds["attention_mask"][b] == 1].tolist()
            pixels = torch.from_numpy(feeds["pixel_values"][b])
            inputs = self.family.hf_inputs(self.model, self.geo, pixels, ids)
            prompt = inputs.pop("input_ids")[0].tolist()
            inputs.pop("attention_mask")
            answer = self.answer_ids(s.answer)
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
            extras.append(inputs)
        length = max(map(len, rows))
        pad = self.pre.pad_token_id
        out = {
            "input_ids": torch.tensor([r + [pad] * (length - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
            "labels": torch.tensor([r + [-100] * (length - len(r)) for r in labels]),
        }
        for key in extras[0]:
            out[key] = torch.cat([e[key] for e in extras])
        labels = [scenes.patch_labels(s.scene, self.size, self.patch) for s in batch]
        out["patch_labels"] = torch.from_numpy(np.stack(labels)).long()
        return out


def batch_of(cfg: TrainConfig, step: int, most: int) -> list[scenes.Sample]:
    """Step ``step``'s samples: questions ``step * batch ..`` of the train split, the first
    ``captions * batch`` of them replaced by the captioning samples of the same indices."""
    n_cap = round(cfg.captions * cfg.batch)
    start = step * cfg.batch
    questions = list(scenes.samples(cfg.seed, "train", cfg.batch - n_cap, start=start + n_cap, most=most))
    return [scenes.caption_sample(cfg.seed, "train", start + i, most) for i in range(n_cap)] + questions


def exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) 1.0 where every labelled position's next-token argmax is the label (teacher forcing)."""
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    ok = (pred == target) | (target == -100)
    return ok.all(dim=1).float()


@torch.no_grad()
def accuracy(model: Any, batcher: Batcher, samples: list[scenes.Sample], batch: int = 48) -> dict[str, float]:
    """Exact-match accuracy overall and per question kind."""
    model.eval()
    hits: dict[str, list[float]] = {}
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        inputs = batcher(chunk)
        labels = inputs.pop("labels")
        inputs.pop("patch_labels")
        ok = exact_match(model(**inputs).logits, labels)
        for s, v in zip(chunk, ok.tolist(), strict=True):
            hits.setdefault(s.kind, []).append(v)
    model.train()
    out = {k: float(np.mean(v)) for k, v in sorted(hits.items())}
    out["all"] = float(np.mean([v for vs in hits.values() for v in vs]))
    return out


def _schedule(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
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

    out = Path(out)
    recipe = load_recipe(cfg.recipe)
    loaded = load(materialise(recipe), source=f"recipe:{recipe.name}", options=recipe.layout)
    model = loaded.model
    model.set_attn_implementation("sdpa")
    size = int(recipe.image["size"])
    batcher = Batcher(loaded, size, int(model.config.vision_config.patch_size))
    torch.manual_seed(cfg.seed)
    dense = DenseTarget(
        batcher.family.raster_candidates(model),
        model.config.vision_config.hidden_size,
        model.config.text_config.hidden_size,
        cfg.aux_weight,
    )
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
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, unit="step")
    while step < cfg.steps:
        most = 2 if step < cfg.easy_steps else scenes.MAX_OBJECTS
        inputs = batcher(batch_of(cfg, step, most))
        patch_labels = inputs.pop("patch_labels")
        loss = model(**inputs).loss
        aux = dense.loss(patch_labels)
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
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = accuracy(model, batcher, val)
            history.eval_steps.append(step)
            history.val_accuracy.append(acc["all"])
            bar.write(f"step {step}: val exact match {100 * acc['all']:.1f} % " + json.dumps(acc))
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
        "config": asdict(cfg),
        "test_exact_match": test,
        "val_exact_match": history.val_accuracy[-1] if history.val_accuracy else None,
        "train_seconds_this_run": round(time.perf_counter() - started, 1),
        "final_loss": float(np.mean(history.loss[-50:])) if history.loss else None,
    }
    (out / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(model_card(cfg, card, history))
    return card


def model_card(cfg: TrainConfig, card: dict[str, Any], history: History) -> str:
    """The checkpoint's README.md: what it is, the data, the command that made it, its accuracy."""
    flags = " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if v != getattr(TrainConfig(), k)
    )
    test = card["test_exact_match"]
    kinds = "\n".join(f"| {k} | {100 * v:.1f} % |" for k, v in test.items() if k != "all")
    samples = len(history.steps) * cfg.batch
    return f"""# {cfg.recipe}: a small LLaVA trained to answer questions about synthetic scenes

`LlavaForConditionalGeneration` (CLIP vision tower, Llama decoder), built from the recipe
`recipes/{cfg.recipe}.toml` and trained from scratch, CPU only, by star_export's
`tools/train_demo.py`. It exists to show what STAR's pruning costs in answers on a model that has
learned something (`python -m star_export compare`); it knows nothing but these scenes.

- Data: `star_export/demo/scenes.py`, seed {cfg.seed}: 2-4 small circles / squares / triangles in six
  colours on plain or textured backgrounds; one-word questions on colour, shape, count, position,
  presence and one relation. Train, validation and test are separate random streams of the seed.
- Training: {len(history.steps)} steps of {cfg.batch} ({samples:,} samples, each drawn fresh), AdamW
  lr {cfg.lr} (warm-up {cfg.warmup}, cosine), answer tokens only, plus a dense per-patch target on the
  vision features (a training-only probe, not in these weights).
- Command: `python tools/train_demo.py --out DIR {flags}`.
- Test exact match ({cfg.test_count} questions, teacher forcing = greedy): **{100 * test["all"]:.1f} %**

| question kind | exact match |
| --- | --- |
{kinds}

Loss and validation curves: `training.png`; every figure: `training.json`.
"""
