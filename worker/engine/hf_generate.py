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
from worker.errors import CaptionFailed
from worker.settings import Settings

if TYPE_CHECKING:
    import torch
    from PIL import Image


class GenerateEngine:
    """A loaded model and processor; captions batches with ``model.generate``."""

    def __init__(self, model: Any, processor: Any, info: ModelInfo) -> None:
        self.model = model
        self.processor = processor
        self._info = info

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
        generating and comes back with finish_reason "timeout".
        """
        import torch
        from transformers import StoppingCriteriaList

        if not batch:
            return []
        options = batch[0].options
        if any(item.options != options for item in batch):
            raise CaptionFailed("internal error: a batch mixed generation options")
        inputs = collate([item.tensors for item in batch], self._pad_id).to(self.model.device)
        max_new = max(item.max_new_tokens for item in batch)
        stop = _Deadlines(deadlines) if deadlines is not None else None
        kwargs = options.generate_kwargs()
        if options.seed is not None:
            torch.manual_seed(options.seed)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self._generate(
                batch,
                **inputs,
                max_new_tokens=max_new,
                pad_token_id=self._pad_id,
                stopping_criteria=StoppingCriteriaList([stop]) if stop else None,
                **kwargs,
            )
        seconds = time.perf_counter() - started
        prompt_len = int(inputs["input_ids"].shape[1])
        new_tokens = out[:, prompt_len:].tolist()
        # New tokens a row had when its deadline struck (None: it never expired).
        cut = [None if n is None else n - prompt_len for n in stop.expired_at] if stop else None
        eos = self._eos_ids
        return [
            self._row(tokens, item, eos, cut[i] if cut else None, seconds, len(batch))
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
        expired_after: int | None,
        seconds: float,
        n: int,
    ) -> CaptionOutput:
        tokens = tokens[: item.max_new_tokens]
        stop_at = next((i for i, t in enumerate(tokens) if t in eos), None)
        finish: FinishReason
        if stop_at is not None and (expired_after is None or stop_at < expired_after):
            kept, generated, finish = tokens[:stop_at], stop_at + 1, "stop"
        elif expired_after is not None and expired_after < item.max_new_tokens:
            kept = tokens[:expired_after]
            generated, finish = len(kept), "timeout"
        else:
            kept = tokens if stop_at is None else tokens[:stop_at]
            generated, finish = len(kept), "length"
        text = self.processor.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return CaptionOutput(text, item.prompt_tokens, generated, finish, seconds, n)

    @property
    def _pad_id(self) -> int:
        tok = self.processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad)

    @property
    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return {int(i) for i in ids if i is not None} | {int(self.processor.tokenizer.eos_token_id)}

    def warm_up(self) -> CaptionOutput:
        """Caption one small image so readiness means the model really answers."""
        from PIL import Image

        image = Image.new("RGB", (64, 64), (128, 128, 128))
        item = self.prepare(
            image,
            "Describe this image.",
            max_new_tokens=1,
            options=GenerationOptions(),
            max_pixels=PATCH_PIXELS * 64,
            min_pixels=PATCH_PIXELS * 4,
        )
        return self.generate([item])[0]


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


class _Deadlines:
    """A per-row stopping criterion: rows past their deadline stop generating.

    It records the sequence length at which each row expired, because a stopped row is
    then padded with the pad token, which for Qwen is also an end-of-sequence token.
    """

    def __init__(self, deadlines: Sequence[float]) -> None:
        self.deadlines = list(deadlines)
        self.expired_at: list[int | None] = [None] * len(self.deadlines)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        import torch

        now = time.monotonic()
        length = int(input_ids.shape[1])
        self.expired_at = [
            at if at is not None else (length if now >= d else None)
            for at, d in zip(self.expired_at, self.deadlines, strict=True)
        ]
        expired = [at is not None for at in self.expired_at]
        return torch.tensor(expired, dtype=torch.bool, device=input_ids.device)


def load_engine(settings: Settings) -> GenerateEngine:
    """The default ``CAPTION_ENGINE_FACTORY``: load the configured model once."""
    return GenerateEngine(*load_model(settings))
