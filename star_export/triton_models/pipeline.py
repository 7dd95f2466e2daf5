"""Triton Python-backend model (BLS): image bytes + prompt -> generated text and token ids.

Copied by ``python -m star_export triton`` into ``<repo>/pipeline/1/model.py``, next to the
export's ``manifest.json``, ``processor/`` (tokenizer, chat template, image processor) and
``star_encoding.py`` (a copy of ``star_export/encoding.py``). It needs numpy, Pillow and
transformers in the backend stub's Python environment, not star_export: tritonserver's Python
backend runs in its own environment (numpy<2 for the stub), so this file and ``star_encoding.py``
are the only code of the project it loads. Per request (batch B rows, one image + prompt per row):

1. pre-process with ``star_encoding`` as ``star_export.preprocess.Preprocessor`` does (the same
   code): the manifest's ``image`` section, the checkpoint's chat template, exactly ONE image
   placeholder per row, LEFT padding;
2. call the prefill model of the requested keep level (BLS): logits + per-layer presents (L1 =
   T - 1 + span1 slots before layer K, L2 = T - 1 + span2 from K on, the level's spans);
3. greedy loop over the ``decode`` model (BLS; one decode model serves every level: its two past
   lengths are dynamic), exactly as ``star_export.runtime.generate``:
   cached-slot masks ``[0]*pad + [1]*(L - pad)``, first new position ``real - 1 + n_positions``, both
   masks with a 1 appended per step, ``past.{i}.*`` = previous ``present.{i}.*`` (every output named
   ``present*`` feeds the input ``past*``: also ``past_positions_l1/_l2`` where the export has them);
4. detokenise.

Inputs: ``image`` (BYTES [B, 1], a PNG/JPEG file's bytes), ``prompt`` (BYTES [B, 1], UTF-8),
optional ``max_new_tokens`` (INT32 [B, 1]), optional ``stop_token_ids`` (INT32 [B, S]; values
< 0 are ignored, the tokenizer's EOS always stops), optional ``keep`` (INT32 [B, 1]: the keep level,
keep2, to answer at; every row of a request the same; default the export's default level; a keep
the export does not hold is an error naming the levels it holds, never a fallback). Outputs:
``text`` (BYTES [B, 1]), ``token_ids`` (INT64 [B, n], each row padded with -1 after its last token).
Config parameters: ``prefill_models`` (JSON {keep2: model name}), ``default_keep``,
``prefill_model`` (the default level's), ``decode_model``, ``max_new_tokens`` (default limit),
``text_len_max``, ``past_len_l1_max`` and ``past_len_l2_max`` (the limits served; the TensorRT
engines' profiles).

Batching across requests: the config enables Triton's dynamic batcher, so one ``execute`` gets
every request queued within ``max_queue_delay_microseconds`` (up to ``max_batch_size`` rows). The
requests are checked one by one (a bad one is answered alone), grouped by keep level and packed,
in arrival order, into batches whose rows, longest prompt and longest answer fit the profile; each
batch is ONE left-padded prefill and ONE decode loop in which every row stops at its own end
(its ``max_new_tokens``, its stop ids). Left padding and per-row masks make each row's tokens
those of the row alone.

Streaming: where the config's ``model_transaction_policy`` is decoupled (the ``pipeline_stream``
model), each request gets one response per decode step while any of its rows is running
(``token_ids`` [B, 1], -1 for a row that has finished; ``text`` [B, 1], the text the step adds),
the last one flagged final (Triton's decoupled convention, as its LLM backends stream).

Errors: a client mistake is answered with status INVALID_ARGUMENT (``TritonError.INVALID_ARG``)
and a message naming the problem; a failure of the server's own models with INTERNAL.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))  # star_encoding.py sits beside this file
import star_encoding


class RequestError(ValueError):
    """A bad request: answered with an error, the model keeps serving."""


class Job:
    """One request, checked: its keep level, per-row limits and stop ids, its encoded prompts
    (left padded among its own rows) and pixels; ``tokens`` once generated."""

    def __init__(self, index: int, level, limits, stops, ids, mask, pixels, sender=None):
        self.index, self.level, self.limits, self.stops = index, level, limits, stops
        self.ids, self.mask, self.pixels, self.sender = ids, mask, pixels, sender
        self.rows, self.text_len = ids.shape
        self.tokens: list[list[int]] = []
        self.sent = [""] * self.rows  # streaming: the text sent so far, per row
        self.closed = False  # streaming: its final response is sent


def _error(message: str, invalid: bool):
    """A TritonError: INVALID_ARGUMENT for a client mistake where the backend has codes (2.31+)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _left_pad(arrays: list[np.ndarray], width: int, value: int) -> np.ndarray:
    return np.concatenate(
        [np.pad(a, ((0, 0), (width - a.shape[1], 0)), constant_values=value) for a in arrays]
    )


class Level:
    """One keep level: its prefill model and its visual-span lengths (cache slots per prompt)."""

    def __init__(self, keep2: int, model: str, span1: int, span2: int, ranged: bool = False):
        self.keep2, self.model, self.span1, self.span2 = keep2, model, span1, span2
        self.ranged = ranged  # a keep range's graph: keep2 is fed as the length of keep_slots


def _parameters(config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


def _numpy(tensor) -> np.ndarray:
    """A BLS output as a host numpy array (GPU outputs, e.g. from TensorRT, are copied)."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    from torch.utils.dlpack import from_dlpack

    return from_dlpack(tensor.to_dlpack()).cpu().numpy()


def _rows(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def check_numpy_bridge() -> None:
    """Fail the model load with a clear message where the stub mis-reads numpy arrays.

    Stubs built with a pybind11 that predates numpy 2 (e.g. Triton 24.10 in the nvidia-pytriton
    0.7 wheel) create every array they hand to Python with a zero stride under numpy 2: each
    tensor reads as copies of its first byte and BYTES inputs abort the stub.
    """
    probe = np.arange(1, 9, dtype=np.uint8)
    back = pb_utils.Tensor.from_dlpack("probe", pb_utils.Tensor("source", probe)).as_numpy()
    if not np.array_equal(back, probe):
        raise pb_utils.TritonModelException(
            f"this Triton Python backend stub reads tensors wrongly with numpy {np.__version__} "
            "(its pybind11 predates numpy 2): put numpy<2 first in the stub's Python environment "
            "(the python3 first on PATH when tritonserver starts)"
        )


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        check_numpy_bridge()
        config = json.loads(args["model_config"])
        params = _parameters(config)
        here = Path(args["model_repository"]) / args["model_version"]
        manifest = json.loads((here / "manifest.json").read_text())
        self.decode_model = params.get("decode_model") or "decode"
        self.default_max_new_tokens = int(params.get("max_new_tokens") or 32)
        self.max_batch = max(1, int(config.get("max_batch_size") or 1))  # rows of one prefill batch
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)  # streaming

        star, geo = manifest["star"], manifest["model"]["geometry"]
        self.n_positions = int(star["n_positions"])
        self.num_layers = int(geo["num_layers"])
        # keep levels: keep2 -> its prefill model (config parameter prefill_models) and spans
        models = json.loads(params.get("prefill_models") or "{}")
        self.levels = {
            int(lv["keep2"]): Level(
                int(lv["keep2"]),
                models.get(str(lv["keep2"])) or lv["graph"],
                int(lv["span1"]),
                int(lv["span2"]),
            )
            for lv in star["levels"]
        }
        # keep ranges (--keep 16:128): one prefill model answers any keep2 in [min, max]
        self.ranges = [
            (int(lv["keep_range"]["min"]), int(lv["keep_range"]["max"]), self.levels[int(lv["keep2"])])
            for lv in star["levels"]
            if "keep_range" in lv
        ]
        for *_, lv in self.ranges:
            lv.ranged = True
        self.n_visual, self.n_fixed = int(star["N"]), int(star.get("n_fixed", 0))
        self.default_keep = int(
            params.get("default_keep") or star.get("default_keep") or star["levels"][0]["keep2"]
        )
        if self.default_keep not in self.levels:
            raise pb_utils.TritonModelException(
                f"default_keep {self.default_keep} is not a keep level of manifest.json ({self._held()})"
            )
        graphs = manifest["graphs"]
        decode_dims = {d["name"]: d for d in graphs["decode"]["dynamic_dims"]}
        default_graph = graphs[
            next(lv["graph"] for lv in star["levels"] if int(lv["keep2"]) == self.default_keep)
        ]
        text_dims = [
            d for lv in star["levels"] for d in graphs[lv["graph"]]["dynamic_dims"] if d["name"] == "text_len"
        ]
        # Served limits: config parameters (the TensorRT engines' profiles), else the export's ranges.
        self.text_max = int(params.get("text_len_max") or min(d["max"] for d in text_dims))
        self.past_max1 = int(params.get("past_len_l1_max") or decode_dims["past_len_l1"]["max"])
        self.past_max2 = int(params.get("past_len_l2_max") or decode_dims["past_len_l2"]["max"])
        # the prefill graphs' declared input dtypes: float32 pixels are cast to them (fp16 exports)
        self.prefill_dtypes = star_encoding.declared_dtypes(default_graph["inputs"])
        if any(t["dtype"] == "bfloat16" for g in graphs.values() for t in (*g["inputs"], *g["outputs"])):
            raise pb_utils.TritonModelException(
                "a bf16 export cannot be served by this pipeline (pb_utils.Tensor cannot carry bfloat16); "
                "export with --dtype fp16 or fp32"
            )
        # carried from step to step: present.{i}.* and, where the family has them, present_positions_*
        self.present_names = [
            t["name"] for t in graphs["decode"]["outputs"] if t["name"].startswith("present")
        ]

        # pre-processing exactly as star_export.preprocess: the manifest's image section, carried out
        # by the copy of star_export/encoding.py that `triton` puts beside this file
        self.image_spec = manifest["image"]
        try:
            self.processor = star_encoding.load_processor(here / "processor", self.image_spec)
        except star_encoding.ProcessorError as e:
            raise pb_utils.TritonModelException(f"processor/: {e}") from None
        self.tokenizer = self.processor.tokenizer
        self.image_token_id = int(manifest["image_token_id"])
        ids = self.tokenizer.encode(self.processor.image_token, add_special_tokens=False)
        if list(ids) != [self.image_token_id]:
            raise pb_utils.TritonModelException(
                f"image token {self.processor.image_token!r} encodes to {ids}, the export expects "
                f"[{self.image_token_id}]"
            )
        if not self.processor.chat_template:
            raise pb_utils.TritonModelException("processor/ has no chat template (chat_template.jinja)")
        self.eos = self.tokenizer.eos_token_id
        self.pad_id = star_encoding.pad_token_id(self.tokenizer)

    def _held(self) -> str:
        ranges = {lv.keep2: f"{lo}:{hi}" for lo, hi, lv in self.ranges}
        return ", ".join(ranges.get(k, str(k)) for k in self.levels)

    def _in_range(self, keep: int) -> Level | None:
        """The level ``keep`` of a keep range that covers it (keep1 = min(N, 2 * keep)), else None."""
        for lo, hi, lv in self.ranges:
            if lo <= keep <= hi:
                span1 = min(self.n_visual, 2 * keep) + self.n_fixed
                return Level(keep, lv.model, span1, keep + self.n_fixed, ranged=True)
        return None

    def _level(self, request, batch: int) -> Level:
        """The keep level a request asks for (input ``keep``), or the default; never a fallback."""
        rows = _rows(request, "keep")
        if rows is None:
            return self.levels[self.default_keep]
        values = sorted({int(v) for v in rows.reshape(-1)})
        if len(values) != 1 or rows.size != batch:
            raise RequestError(
                f"keep: one value per row, the same for every row of a request, got {values}; "
                "send rows of other keep levels as separate requests"
            )
        level = self.levels.get(values[0]) or self._in_range(values[0])
        if level is None:
            raise RequestError(
                f"keep {values[0]}: this export holds keep levels {self._held()} "
                f"(default {self.default_keep}); re-export with --keep "
                f"{','.join(str(k) for k in self.levels)},{values[0]} to add it"
            )
        return level

    # ---- one request, checked -------------------------------------------------------------------
    def _allowed(self, text_len: int, level: Level) -> int:
        """contract.max_new_tokens: the tighter of the two past lengths, with this level's spans."""
        return min(
            self.past_max1 - (text_len - 1 + level.span1) + 1,
            self.past_max2 - (text_len - 1 + level.span2) + 1,
        )

    def _job(self, index: int, request, sender=None) -> Job:
        images, prompts = _rows(request, "image"), _rows(request, "prompt")
        if images is None or prompts is None:
            raise RequestError("inputs 'image' and 'prompt' are required")
        images = [bytes(x) for x in images.reshape(len(images), -1)[:, 0]]
        texts = []
        for i, p in enumerate(prompts.reshape(len(prompts), -1)[:, 0]):
            try:
                texts.append(p.decode("utf-8") if isinstance(p, bytes) else str(p))
            except UnicodeDecodeError:
                raise RequestError(f"prompt {i}: not UTF-8 text") from None
        if len(images) != len(texts):
            raise RequestError(f"{len(images)} images but {len(texts)} prompts")
        batch = len(texts)
        level = self._level(request, batch)
        limit_rows = _rows(request, "max_new_tokens")
        if limit_rows is None:
            limits = [self.default_max_new_tokens] * batch
        else:
            limits = [int(v) for v in limit_rows.reshape(batch, -1)[:, 0]]
        if min(limits) < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {min(limits)}")
        stop_rows = _rows(request, "stop_token_ids")
        extra = [[] for _ in range(batch)] if stop_rows is None else stop_rows.reshape(batch, -1).tolist()
        eos = {int(self.eos)} if self.eos is not None else set()
        stops = [{int(t) for t in row if int(t) >= 0} | eos for row in extra]
        try:
            ids, mask = star_encoding.encode_prompts(self.processor, texts, self.image_token_id)
        except star_encoding.InputError as e:
            raise RequestError(str(e)) from None
        if ids.shape[1] > self.text_max:
            raise RequestError(
                f"prompt is {ids.shape[1]} tokens; the exported profile allows at most {self.text_max}"
            )
        allowed = self._allowed(ids.shape[1], level)
        if max(limits) > allowed:
            raise RequestError(
                f"max_new_tokens {max(limits)} exceeds the exported decode profile (at most {allowed} here, "
                f"keep {level.keep2})"
            )
        pil = []
        for i, data in enumerate(images):
            try:
                pil.append(star_encoding.open_image(data, label=f"image {i}"))
            except star_encoding.InputError:
                raise RequestError(f"image {i}: not a readable image") from None
        pixels = star_encoding.pixel_values(pil, self.image_spec, self.processor.image_processor)
        return Job(index, level, limits, stops, ids, mask, pixels, sender)

    # ---- batches across requests ------------------------------------------------------------------
    def _pack(self, jobs: list[Job]) -> list[list[Job]]:
        """Jobs grouped by keep level, then packed in arrival order into batches that fit the profile:
        rows <= max_batch_size, the longest answer within the longest prompt's decode limit."""
        by_level: dict[int, list[Job]] = {}
        for job in jobs:
            by_level.setdefault(job.level.keep2, []).append(job)
        batches: list[list[Job]] = []
        for group in by_level.values():
            current: list[Job] = []
            for job in group:
                trial = [*current, job]
                rows = sum(j.rows for j in trial)
                longest = max(max(j.limits) for j in trial)
                fits = longest <= self._allowed(max(j.text_len for j in trial), job.level)
                if current and (rows > self.max_batch or not fits):
                    batches.append(current)
                    trial = [job]
                current = trial
            batches.append(current)
        return batches

    def _run(self, batch: list[Job]) -> None:
        """One left-padded prefill and one decode loop for the batch; each job gets its rows' tokens."""
        width = max(j.text_len for j in batch)
        raw = {
            "pixel_values": np.concatenate([j.pixels for j in batch]),
            "input_ids": _left_pad([j.ids for j in batch], width, self.pad_id),
            "attention_mask": _left_pad([j.mask for j in batch], width, 0),
        }
        feeds = star_encoding.cast_inputs(raw, self.prefill_dtypes)  # as every runtime: the declared dtypes
        limits = [n for j in batch for n in j.limits]
        stops = [s for j in batch for s in j.stops]
        starts = np.cumsum([0] + [j.rows for j in batch])
        emit = None
        if self.decoupled:

            def emit(tokens: list[list[int]], emitted: np.ndarray, finished: np.ndarray) -> None:
                for j, start in zip(batch, starts, strict=False):
                    rows = slice(start, start + j.rows)
                    if not j.closed and emitted[rows].any():
                        self._stream(j, tokens[rows], emitted[rows], bool(finished[rows].all()))

        tokens = self._generate(feeds, limits, stops, batch[0].level, emit)
        for j, start in zip(batch, starts, strict=False):
            j.tokens = tokens[start : start + j.rows]

    # ---- BLS -------------------------------------------------------------------------------------
    def _infer(self, model: str, inputs: list, outputs: list[str]) -> dict:
        request = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=inputs)
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name) for name in outputs}

    def _pasts(self, out: dict) -> list:
        """present* of one step -> past* of the next (renamed, not copied: DLPack)."""
        return [
            pb_utils.Tensor.from_dlpack(n.replace("present", "past", 1), out[n]) for n in self.present_names
        ]

    def _generate(self, feeds: dict, limits: list[int], stops: list[set[int]], level: Level, emit=None):
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        batch, text_len = ids.shape
        inputs = [pb_utils.Tensor(n, feeds[n]) for n in ("pixel_values", "input_ids", "attention_mask")]
        if level.ranged:  # a keep range's graph reads keep2 from the length of keep_slots, never its values
            inputs.append(pb_utils.Tensor("keep_slots", np.zeros((batch, level.keep2), dtype=np.int64)))
        out = self._infer(level.model, inputs, ["logits", *self.present_names])
        real = mask.sum(axis=1).astype(np.int64)  # (B,) real prompt tokens
        pad = text_len - real  # (B,) left padding
        l1, l2 = text_len - 1 + level.span1, text_len - 1 + level.span2  # this level's cache slots
        mask_l1 = (np.arange(l1)[None] >= pad[:, None]).astype(np.int64)  # (B, L1)
        mask_l2 = (np.arange(l2)[None] >= pad[:, None]).astype(np.int64)  # (B, L2)
        position = real - 1 + self.n_positions  # (B,) original position of the first new token
        logits, pasts = _numpy(out["logits"]), self._pasts(out)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        finished = np.zeros(batch, dtype=bool)
        one = np.ones((batch, 1), dtype=np.int64)
        longest = max(limits)
        for step in range(longest):
            token = np.where(finished, self.pad_id, np.argmax(logits, axis=-1)).astype(np.int64)  # greedy
            emitted = ~finished
            for b in np.flatnonzero(emitted):
                tokens[b].append(int(token[b]))
                if int(token[b]) in stops[b] or len(tokens[b]) >= limits[b]:
                    finished[b] = True
            if emit is not None:
                emit(tokens, emitted, finished)
            if finished.all() or step == longest - 1:
                break
            mask_l1 = np.concatenate([mask_l1, one], axis=1)
            mask_l2 = np.concatenate([mask_l2, one], axis=1)
            inputs = [
                pb_utils.Tensor("input_ids", np.ascontiguousarray(token[:, None])),
                pb_utils.Tensor("position_ids", np.ascontiguousarray((position + step)[:, None])),
                pb_utils.Tensor("attention_mask_l1", mask_l1),
                pb_utils.Tensor("attention_mask_l2", mask_l2),
                *pasts,
            ]
            out = self._infer(self.decode_model, inputs, ["logits", *self.present_names])
            logits, pasts = _numpy(out["logits"]), self._pasts(out)
        return tokens

    # ---- responses -------------------------------------------------------------------------------
    def _stream(self, job: Job, tokens: list[list[int]], emitted: np.ndarray, final: bool) -> None:
        """One streamed response of ``job``: this step's token and the text it adds, per row."""
        step = np.array([[t[-1] if e else -1] for t, e in zip(tokens, emitted, strict=True)], dtype=np.int64)
        deltas = []
        for b, t in enumerate(tokens):
            text = self.tokenizer.decode(t, skip_special_tokens=True)
            # hold back a partial character (a byte-level token that completes it comes later)
            upto = len(text) if final or not text.endswith("\ufffd") else len(job.sent[b])
            deltas.append(text[len(job.sent[b]) : upto])
            job.sent[b] = text[:upto]
        text = np.array([[d.encode("utf-8")] for d in deltas], dtype=np.object_)
        response = pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("text", text), pb_utils.Tensor("token_ids", step)]
        )
        job.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)
        job.closed = final

    def _answer(self, job: Job):
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in job.tokens]
        width = max(len(t) for t in job.tokens)
        token_ids = np.full((job.rows, width), -1, dtype=np.int64)
        for b, t in enumerate(job.tokens):
            token_ids[b, : len(t)] = t
        text = np.array([[s.encode("utf-8")] for s in texts], dtype=np.object_)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("text", text), pb_utils.Tensor("token_ids", token_ids)]
        )

    def _fail(self, e: BaseException, invalid: bool, sender=None):
        response = pb_utils.InferenceResponse(output_tensors=[], error=_error(_first_line(e), invalid))
        if sender is None:
            return response
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def execute(self, requests: list) -> list | None:
        """Every request checked alone (a bad one is answered alone, INVALID_ARGUMENT), the good ones
        batched by keep level; one answer per request, in order (streamed where decoupled)."""
        senders = [r.get_response_sender() for r in requests] if self.decoupled else [None] * len(requests)
        responses: list = [None] * len(requests)
        jobs = []
        for i, request in enumerate(requests):
            try:
                jobs.append(self._job(i, request, senders[i]))
            except Exception as e:  # one bad request must not take the model down
                responses[i] = self._fail(e, isinstance(e, RequestError), senders[i])
        for batch in self._pack(jobs):
            try:
                self._run(batch)
            except Exception as e:  # the server's own models failed: INTERNAL, for this batch only
                for j in batch:
                    if not j.closed:
                        responses[j.index] = self._fail(e, False, j.sender)
                continue
            if not self.decoupled:
                for j in batch:
                    responses[j.index] = self._answer(j)
        return None if self.decoupled else responses
