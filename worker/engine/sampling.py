"""Choosing each row's next token from its own logits, with its own options and seed.

Rows with different generation options share one decode step in the slot engine, so the
logits processing ``generate`` applies to a whole batch is done here per row, in the same
order: repetition penalty, then (when sampling) temperature, top-k, top-p. A sampled row
draws from its own generator, so a seeded row gives the same text whatever runs beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.contract import GenerationOptions


@dataclass
class RowSampler:
    """The token rule of one row."""

    options: GenerationOptions
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None

    @classmethod
    def for_row(cls, options: GenerationOptions, defaults: Any, device: torch.device) -> RowSampler:
        """A sampler for ``options``; unset sampling values come from the checkpoint's
        generation config (``defaults``), as ``generate`` would take them."""

        def pick(value: Any, name: str, neutral: Any) -> Any:
            if value is not None:
                return value
            default = getattr(defaults, name, None)
            return neutral if default is None else default

        generator = None
        if options.do_sample:
            generator = torch.Generator(device=device)
            if options.seed is not None:
                generator.manual_seed(options.seed)
            else:
                generator.seed()
        return cls(
            options=options,
            temperature=float(pick(options.temperature, "temperature", 1.0)),
            top_k=int(pick(options.top_k, "top_k", 0)),
            top_p=float(pick(options.top_p, "top_p", 1.0)),
            generator=generator,
        )

    @property
    def needs_seen(self) -> bool:
        """Whether choosing needs every token the row has seen (the repetition penalty)."""
        penalty = self.options.repetition_penalty
        return penalty is not None and penalty != 1.0

    @property
    def plain_greedy(self) -> bool:
        """Whether the token is simply the argmax of the logits."""
        return self.generator is None and not self.needs_seen

    def next_token(self, logits: torch.Tensor, seen: torch.Tensor | None) -> int:
        """The next token from one row's logits (vocab,); ``seen`` holds every token the row
        has seen (prompt and generated) when ``needs_seen``."""
        scores = logits.float()
        penalty = self.options.repetition_penalty
        if seen is not None and penalty is not None and penalty != 1.0:
            picked = scores.gather(0, seen)
            picked = torch.where(picked < 0, picked * penalty, picked / penalty)
            scores = scores.scatter(0, seen, picked)
        if self.generator is None:
            return int(scores.argmax())
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if 0 < self.top_k < scores.shape[0]:
            kth = torch.topk(scores, self.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.top_p
            drop[-1] = False  # always keep the most likely token
            scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        probs = scores.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
