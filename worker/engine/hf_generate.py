"""Today's engine: one Hugging Face ``generate`` call captions a whole batch.

``prepare`` runs in task threads (tokenising and image preprocessing overlap the GPU);
``generate`` runs only in the batcher thread, which owns the model. Inputs are prepared one
row at a time and collated with left padding, which gives the same tensors as processing
the batch at once and keeps greedy captions identical at any batch size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from worker.contract import GenerationOptions
from worker.engine.base import PATCH_PIXELS, CaptionOutput, FinishReason, ModelInfo, PreparedInput
from worker.engine.loading import load_model
from worker.engine.repetition import RepetitionGuard
from worker.errors import CaptionFailed
from worker.settings import Settings

if TYPE_CHECKING:
    import torch
    from PIL import Image


class GenerateEngine:
    """A loaded model and processor; captions batches with ``model.generate``."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        info: ModelInfo,
        repetition: RepetitionGuard | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self._info = info
        self.repetition = repetition or RepetitionGuard()

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def oom_errors(self) -> tuple[type[BaseException], ...]:
        """Exceptions that mean "this batch does not fit": the batcher splits on them."""
        import torch

        return (torch.OutOfMemoryError,)

    def release_memory(self) -> None:
        """Return cached blocks to the allocator after an out-of-memory."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def prepare(
        self,
        image: Image.Image,
        prompt: str,
        *,
        max_new_tokens: int,
        options: GenerationOptions,
        max_pixels: int,
        min_pixels: int,
    ) -> PreparedInput:
        """Tokenise the chat prompt and preprocess the image for one task (any thread)."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        encoded = self.processor(
            text=[text],
            images=[image],
            return_tensors="pt",
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        )
        tensors = dict(encoded)
        grid = tensors["image_grid_thw"][0]
        patch = int(self.processor.image_processor.patch_size)
        size = (int(grid[2]) * patch, int(grid[1]) * patch)
        return PreparedInput(
            tensors=tensors,
            prompt_tokens=int(tensors["input_ids"].shape[1]),
            image_size=size,
            max_new_tokens=max_new_tokens,
            options=options,
        )

    def generate(
        self, batch: Sequence[PreparedInput], deadlines: Sequence[float] | None = None
    ) -> list[CaptionOutput]:
        """Caption a batch whose rows share generation options (batcher thread only).

        ``deadlines`` are ``time.monotonic()`` values per row; a row past its deadline stops
        generating and comes back with finish_reason "timeout". A row stuck in a loop stops
        with "repetition" (see ``RepetitionGuard``).
        """
        import torch
        from transformers import StoppingCriteriaList

        if not batch:
            return []
        options = batch[0].options
        if any(item.options != options for item in batch):
            raise CaptionFailed("internal error: a batch mixed generation options")
        inputs = collate([item.tensors for item in batch], self.pad_id).to(self.model.device)
        max_new = max(item.max_new_tokens for item in batch)
        prompt_len = int(inputs["input_ids"].shape[1])
        stop = _RowStops(prompt_len, deadlines, self.repetition)
        kwargs = options.generate_kwargs()
        if options.seed is not None:
            torch.manual_seed(options.seed)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self._generate(
                batch,
                **inputs,
                max_new_tokens=max_new,
                pad_token_id=self.pad_id,
                stopping_criteria=StoppingCriteriaList([stop]),
                **kwargs,
            )
        seconds = time.perf_counter() - started
        new_tokens = out[:, prompt_len:].tolist()
        eos = self.eos_ids
        return [
            self._row(tokens, item, eos, stop.stopped[i], seconds, len(batch))
            for i, (tokens, item) in enumerate(zip(new_tokens, batch, strict=True))
        ]

    def _generate(self, batch: Sequence[PreparedInput], **kwargs: Any) -> Any:
        """The one ``model.generate`` call; a subclass may add logits processors per batch."""
        return self.model.generate(**kwargs)

    def _row(
        self,
        tokens: list[int],
        item: PreparedInput,
        eos: set[int],
        stopped: tuple[int, FinishReason] | None,
        seconds: float,
        n: int,
    ) -> CaptionOutput:
        tokens = tokens[: item.max_new_tokens]
        stop_at = next((i for i, t in enumerate(tokens) if t in eos), None)
        cut: int | None = None
        why: FinishReason = "length"
        if stopped is not None:
            cut, why = stopped
        finish: FinishReason
        if stop_at is not None and (cut is None or stop_at < cut):
            kept, generated, finish = tokens[:stop_at], stop_at + 1, "stop"
        elif cut is not None and cut < item.max_new_tokens:
            kept = tokens[:cut]
            generated, finish = len(kept), why
        else:
            kept = tokens if stop_at is None else tokens[:stop_at]
            generated, finish = len(kept), "length"
        return CaptionOutput(self.decode(kept), item.prompt_tokens, generated, finish, seconds, n)

    def decode(self, tokens: list[int]) -> str:
        """Caption text from generated token ids (end-of-sequence already cut)."""
        return str(self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip())

    @property
    def pad_id(self) -> int:
        tok = self.processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad)

    @property
    def eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return {int(i) for i in ids if i is not None} | {int(self.processor.tokenizer.eos_token_id)}

    def warm_up_input(self, max_new_tokens: int = 1) -> PreparedInput:
        """A small grey image with the default prompt, prepared: the warm-up row."""
        from PIL import Image

        image = Image.new("RGB", (64, 64), (128, 128, 128))
        return self.prepare(
            image,
            "Describe this image.",
            max_new_tokens=max_new_tokens,
            options=GenerationOptions(),
            max_pixels=PATCH_PIXELS * 64,
            min_pixels=PATCH_PIXELS * 4,
        )

    def warm_up(self) -> CaptionOutput:
        """Caption one small image so readiness means the model really answers."""
        return self.generate([self.warm_up_input()])[0]


def collate(rows: Sequence[dict[str, Any]], pad_id: int) -> Any:
    """Stack per-task encodings into one batch: left-pad token rows, concat image rows."""
    import torch
    from transformers import BatchFeature

    length = max(int(r["input_ids"].shape[1]) for r in rows)
    batch: dict[str, Any] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if all(  # token rows are (1, prompt length); image rows never are, for every row
            v.dim() == 2 and v.shape[0] == 1 and v.shape[1] == r["input_ids"].shape[1]
            for v, r in zip(values, rows, strict=True)
        ):
            fill = pad_id if key == "input_ids" else 0
            padded = [
                torch.nn.functional.pad(v, (length - v.shape[1], 0), value=fill) for v in values
            ]
            batch[key] = torch.cat(padded, dim=0)
        else:
            batch[key] = torch.cat(values, dim=0)
    return BatchFeature(batch)


class _RowStops:
    """A per-row stopping criterion: a row stops at its deadline or when it loops.

    It records how many new tokens each row had when it stopped, and why, because a stopped
    row is then padded with the pad token, which for Qwen is also an end-of-sequence token.
    """

    def __init__(
        self, prompt_len: int, deadlines: Sequence[float] | None, repetition: RepetitionGuard
    ) -> None:
        self.prompt_len = prompt_len
        self.deadlines = list(deadlines) if deadlines is not None else None
        self.repetition = repetition
        self.stopped: list[tuple[int, FinishReason] | None] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        import torch

        rows = int(input_ids.shape[0])
        if not self.stopped:
            self.stopped = [None] * rows
        now = time.monotonic()
        new = int(input_ids.shape[1]) - self.prompt_len
        recent = None
        if self.repetition.span and new >= self.repetition.span:
            recent = input_ids[:, -self.repetition.span :].tolist()
        for row in range(rows):
            if self.stopped[row] is not None:
                continue
            if self.deadlines is not None and now >= self.deadlines[row]:
                self.stopped[row] = (new, "timeout")
            elif recent is not None and self.repetition.repeats(recent[row]):
                self.stopped[row] = (new, "repetition")
        flags = [s is not None for s in self.stopped]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


def load_engine(settings: Settings) -> GenerateEngine:
    """The default ``CAPTION_ENGINE_FACTORY``: load the configured model once."""
    guard = RepetitionGuard(settings.repetition_span, settings.repetition_max_cycle)
    return GenerateEngine(*load_model(settings), repetition=guard)
