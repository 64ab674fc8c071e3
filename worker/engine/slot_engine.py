"""The slot engine: a fixed number of rows decode together, and a row joins or leaves between
any two steps.

Each slot holds one row's keys and values in a static cache. ``admit`` prefills a new row
into a free slot (its image through the vision encoder, its prompt through the decoder) and
chooses its first token; ``step`` decodes one token for every live row at once and returns
the rows that finished, whose slots are free at once. Nothing waits for the longest row of
a batch, and a task that arrives mid-decode starts at the next step.

It wraps a loaded ``GenerateEngine`` for the model, the processor and row preparation, and
runs a row that does not fit a slot (prompt + ``max_new_tokens`` over the slot capacity)
through that engine's ``generate`` instead. On CUDA the decode step replays captured CUDA
graphs (``worker.engine.graphs``), captured in ``warm_up``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.engine.base import CaptionOutput, FinishReason, ModelInfo, PreparedInput
from worker.engine.graphs import DecodeGraphs, Recorder, buckets, cuda_recorder_for
from worker.engine.hf_generate import GenerateEngine
from worker.engine.qwen3vl import StaticKVCache, decode_step, prefill
from worker.engine.sampling import RowSampler

log = logging.getLogger(__name__)


@dataclass
class _Row:
    item: PreparedInput
    sampler: RowSampler
    prompt: list[int]  # prompt ids, for the repetition penalty
    length: int  # tokens in the cache
    rope_delta: int
    started: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    peak_rows: int = 1


class SlotEngine:
    """Continuous batching over a static KV cache of ``slots`` rows."""

    def __init__(
        self,
        base: GenerateEngine,
        slots: int,
        capacity: int,
        *,
        cuda_graphs: bool = True,
        recorder: Recorder | None = None,
    ) -> None:
        self.base = base
        self.slots = slots
        self.capacity = capacity
        self.cache = StaticKVCache(base.model, slots, capacity)
        self._device = self.cache.keys[0].device
        self._rows: dict[int, _Row] = {}
        self._eos = base.eos_ids
        self._pad = base.pad_id
        recorder = recorder or cuda_recorder_for(self._device, cuda_graphs)
        #: Captured decode graphs; None: the eager step (CPU, disabled, or capture failed).
        self.graphs = DecodeGraphs(self._eager_step, self._device, recorder) if recorder else None

    def _eager_step(
        self, tokens: torch.Tensor, lengths: torch.Tensor, deltas: torch.Tensor, keys: int
    ) -> torch.Tensor:
        return decode_step(self.base.model, self.cache, tokens, lengths, deltas, keys)

    # CaptionEngine: identity and row preparation come from the wrapped engine.
    @property
    def info(self) -> ModelInfo:
        return self.base.info

    @property
    def oom_errors(self) -> tuple[type[BaseException], ...]:
        return self.base.oom_errors

    def release_memory(self) -> None:
        self.base.release_memory()

    def prepare(self, image: Any, prompt: str, **kwargs: Any) -> PreparedInput:
        return self.base.prepare(image, prompt, **kwargs)

    def warm_up(self) -> CaptionOutput:
        """Capture the decode graphs (on CUDA), then admit one small row and decode it to
        the end, through the slot path."""
        if self.graphs is not None:
            self._capture()
        item = self.base.warm_up_input(max_new_tokens=2)
        done = self.admit(self.free_slots()[0], item)
        while done is None:
            finished = self.step()
            done = finished[0][1] if finished else None
        return done

    def _capture(self) -> None:
        """Capture every decode bucket and check each against the eager step; any failure
        leaves the engine on the eager step (slower, never wrong)."""
        assert self.graphs is not None
        shapes = buckets(self.slots, self.capacity, _bucket)
        try:
            seconds = self.graphs.capture(shapes)
            checked = time.perf_counter()
            self._check_graphs()
        except Exception as exc:
            log.warning(
                "CUDA graph capture failed (%s: %s); decoding eagerly", type(exc).__name__, exc
            )
            self.graphs = None
            self.release_memory()
            return
        log.info(
            "decode step: %d CUDA graphs captured in %.1fs, checked against the eager step "
            "in %.1fs",
            len(shapes),
            seconds,
            time.perf_counter() - checked,
        )

    def _check_graphs(self) -> None:
        """Replay every bucket once on inputs a live step could have (any token, lengths up
        to the bucket's cache positions, the negative rope deltas of image rows) and compare
        its logits and the keys and values it writes with the eager step's. A graph that
        baked in its capture-time inputs, or wrote the cache somewhere else, differs here.
        No row is live yet; the cache is zeroed again afterwards."""
        assert self.graphs is not None
        seeded = torch.Generator().manual_seed(0)
        vocab = int(self.base.model.config.text_config.vocab_size)
        keys_out, values_out = self.cache.keys[-1], self.cache.values[-1]
        for n, keys in self.graphs.shapes:
            tokens = torch.randint(0, vocab, (n,), generator=seeded)
            lengths = torch.randint(0, keys, (n,), generator=seeded)
            # An image row's mrope position (length + delta) is behind its length, never < 0.
            deltas = -torch.minimum(torch.randint(0, 1_024, (n,), generator=seeded), lengths)
            tokens, lengths, deltas = (t.to(self._device) for t in (tokens, lengths, deltas))
            rows = torch.arange(n, device=self._device)
            expected = self._eager_step(tokens, lengths, deltas, keys)
            written = (keys_out[rows, :, lengths].clone(), values_out[rows, :, lengths].clone())
            keys_out[rows, :, lengths] = 0
            values_out[rows, :, lengths] = 0
            got = self.graphs(tokens, lengths, deltas, keys)
            for what, a, b in (
                ("logits", got, expected),
                ("keys", keys_out[rows, :, lengths], written[0]),
                ("values", values_out[rows, :, lengths], written[1]),
            ):
                if not torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2):
                    diff = (a.float() - b.float()).abs().max().item()
                    raise RuntimeError(
                        f"the graph for {n} slots x {keys} positions differs from the eager "
                        f"step in its {what} by {diff:.3g}"
                    )
        self.cache.clear()

    # Slots.
    @property
    def live(self) -> int:
        return len(self._rows)

    def free_slots(self) -> list[int]:
        return [s for s in range(self.slots) if s not in self._rows]

    def fits(self, item: PreparedInput) -> bool:
        """Whether the row's prompt and longest caption fit one slot."""
        return item.prompt_tokens + item.max_new_tokens <= self.capacity

    def run_alone(self, item: PreparedInput, deadline: float | None) -> CaptionOutput:
        """Caption a row that does not fit a slot with the wrapped engine's ``generate``."""
        return self.base.generate([item], None if deadline is None else [deadline])[0]

    def admit(self, slot: int, item: PreparedInput) -> CaptionOutput | None:
        """Prefill one row into a free slot; see ``admit_many``."""
        return self.admit_many([(slot, item)])[0]

    def admit_many(self, rows: list[tuple[int, PreparedInput]]) -> list[CaptionOutput | None]:
        """Prefill rows into free slots as one batch and choose each row's first token.

        Returns, per row, its output if that token already ends it, else None (it is live).
        """
        if not rows:
            return []
        for slot, item in rows:
            if slot in self._rows:
                raise ValueError(f"slot {slot} is in use")
            if not self.fits(item):
                raise ValueError("row does not fit a slot; use run_alone")
        started = time.perf_counter()
        firsts, dynamic_cache = prefill(
            self.base.model, [item.tensors for _, item in rows], self._pad
        )
        outputs: list[CaptionOutput | None] = []
        try:
            for index, ((slot, item), first) in enumerate(zip(rows, firsts, strict=True)):
                self.cache.load(slot, dynamic_cache, index, first.length)
                sampler = RowSampler.for_row(
                    item.options, self.base.model.generation_config, self._device
                )
                prompt_ids = item.tensors["input_ids"][0].tolist()
                row = _Row(item, sampler, prompt_ids, first.length, first.rope_delta, started)
                self._rows[slot] = row
                outputs.append(self._accept(slot, row, self._choose(row, first.logits)))
        except BaseException:
            # The caller fails or retries every row of this call: none may stay live.
            for slot, _ in rows:
                self._rows.pop(slot, None)
            raise
        for row in self._rows.values():
            row.peak_rows = max(row.peak_rows, self.live)
        return outputs

    def step(self) -> list[tuple[int, CaptionOutput]]:
        """Decode one token for every live row; return the rows that finished."""
        if not self._rows:
            return []
        # Only the slots up to the highest live one, and only the cache positions in use,
        # each rounded up to a bucket so a few shapes repeat.
        n = _bucket(max(self._rows) + 1, self.slots, minimum=1)
        keys = _bucket(max(r.length for r in self._rows.values()) + 1, self.capacity, 256)
        tokens, lengths, deltas = [self._pad] * n, [0] * n, [0] * n
        for slot, row in self._rows.items():
            tokens[slot], lengths[slot], deltas[slot] = (
                row.generated[-1],
                row.length,
                row.rope_delta,
            )
        step = self.graphs or self._eager_step
        logits = step(
            torch.tensor(tokens, device=self._device),
            torch.tensor(lengths, device=self._device),
            torch.tensor(deltas, device=self._device),
            keys,
        )
        # Plain greedy rows (most traffic) share one argmax; the others choose on their own.
        greedy = logits.argmax(-1).tolist()
        finished = []
        live = self.live
        for slot, row in list(self._rows.items()):
            row.length += 1
            row.peak_rows = max(row.peak_rows, live)
            token = greedy[slot] if row.sampler.plain_greedy else self._choose(row, logits[slot])
            output = self._accept(slot, row, token)
            if output is not None:
                finished.append((slot, output))
        return finished

    def stop_row(self, slot: int, reason: FinishReason) -> CaptionOutput:
        """End a live row now (its deadline passed) and free its slot."""
        row = self._rows.pop(slot)
        return self._output(row, row.generated, len(row.generated), reason)

    def _choose(self, row: _Row, logits: torch.Tensor) -> int:
        seen = None
        if row.sampler.needs_seen:
            seen = torch.tensor(row.prompt + row.generated, device=logits.device)
        return row.sampler.next_token(logits, seen)

    def _accept(self, slot: int, row: _Row, token: int) -> CaptionOutput | None:
        row.generated.append(token)
        if token in self._eos:
            del self._rows[slot]
            return self._output(row, row.generated[:-1], len(row.generated), "stop")
        if len(row.generated) >= row.item.max_new_tokens:
            del self._rows[slot]
            return self._output(row, row.generated, len(row.generated), "length")
        if self.base.repetition.repeats(row.generated):
            del self._rows[slot]
            return self._output(row, row.generated, len(row.generated), "repetition")
        return None

    def _output(
        self, row: _Row, kept: list[int], generated: int, reason: FinishReason
    ) -> CaptionOutput:
        text = self.base.decode(kept)
        seconds = time.perf_counter() - row.started
        return CaptionOutput(
            text, row.item.prompt_tokens, generated, reason, seconds, row.peak_rows
        )


def _bucket(needed: int, limit: int, minimum: int) -> int:
    """The smallest power-of-two multiple of ``minimum`` that holds ``needed``, capped."""
    size = minimum
    while size < needed:
        size *= 2
    return min(size, limit)
