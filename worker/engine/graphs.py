"""CUDA graphs for the slot engine's decode step: one captured graph per shape bucket.

A decode step launches a few hundred small kernels per layer (norms, projections, rope, the
cache writes, attention, and with SDNQ weights a dequantization per linear layer). At batch
32 on an H100 the GPU finishes each faster than Python can launch the next, so the step is
bound by launches, not by the GPU. A CUDA graph records the launches
once and replays them with one call.

The step's shapes come in buckets (``slot_engine._bucket``: live slots rounded up to a power
of two, cache positions to a power-of-two multiple of 256), so a handful of graphs cover
every step. Each graph reads its inputs from static tensors (the tokens, cache lengths and
rope deltas of its ``n`` slots), which a call copies in before the replay, and writes the
logits to a static output, which the caller reads before the next step. The KV cache is
outside the graphs: every replay writes the new keys and values into it where the eager
step would. All graphs share one memory pool; that is safe because they never run at once
and nothing a graph allocates outlives its replay except its output, which is read first.

Capture happens at start (``SlotEngine.warm_up``, before the worker says ready) for every
bucket, and is logged with its time; then every bucket is replayed once on inputs a live
step could have and compared with the eager step. On the CPU, or with
``CAPTION_CUDA_GRAPHS=false``, or when a capture fails (then with a warning), the engine
runs the eager step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

#: One decode step: (tokens, lengths, deltas, keys) -> logits (n, vocab).
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
#: Eager runs on a side stream before a capture (lazy initialisations, autotuning).
WARMUP_RUNS = 2


class Recorder(Protocol):
    """Records a step for static inputs and returns something that replays it."""

    def record(self, run: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Record ``run``; return (replay, static output)."""
        ...


class CudaRecorder:
    """Records with ``torch.cuda.CUDAGraph`` on the model's device, into one shared memory
    pool."""

    def __init__(self, device: torch.device) -> None:
        # Streams, pools and captures belong to the thread's current device, which is
        # cuda:0 unless set: a model on cuda:1 must be captured on cuda:1. (A replay sets
        # its graph's device itself.)
        self._device = device
        with torch.cuda.device(device):
            self._pool = torch.cuda.graph_pool_handle()

    def record(self, run: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        with torch.cuda.device(self._device):
            side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls other threads make meanwhile (the metrics endpoint reads
            # memory statistics) do not invalidate this capture.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output = run()
        return graph.replay, output


class _Captured:
    """One bucket's static inputs, replay and output."""

    def __init__(self, n: int, keys: int, device: torch.device, step: StepFn, recorder: Recorder):
        self.tokens = torch.zeros(n, dtype=torch.long, device=device)
        self.lengths = torch.zeros(n, dtype=torch.long, device=device)
        self.deltas = torch.zeros(n, dtype=torch.long, device=device)
        self.replay, self.output = recorder.record(
            lambda: step(self.tokens, self.lengths, self.deltas, keys)
        )


class DecodeGraphs:
    """The decode step through captured graphs, one per (slots, cache positions) bucket."""

    def __init__(self, step: StepFn, device: torch.device, recorder: Recorder) -> None:
        self._step = step
        self._device = device
        self._recorder = recorder
        self._graphs: dict[tuple[int, int], _Captured] = {}

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """The (slots, cache positions) buckets captured so far."""
        return sorted(self._graphs)

    def capture(self, buckets: Iterable[tuple[int, int]]) -> float:
        """Capture every bucket not captured yet; the seconds it took.

        The captures write keys and values for pad tokens at position 0 of the slots they
        cover, which is harmless while no row is live (a prefill overwrites them).
        """
        started = time.perf_counter()
        for n, keys in buckets:
            if (n, keys) not in self._graphs:
                self._graphs[(n, keys)] = _Captured(
                    n, keys, self._device, self._step, self._recorder
                )
        return time.perf_counter() - started

    def __call__(
        self, tokens: torch.Tensor, lengths: torch.Tensor, deltas: torch.Tensor, keys: int
    ) -> torch.Tensor:
        """The step's logits for these inputs (the graph's static output: read it before
        the next call). A bucket not captured at start runs eagerly."""
        captured = self._graphs.get((int(tokens.shape[0]), keys))
        if captured is None:
            return self._step(tokens, lengths, deltas, keys)
        captured.tokens.copy_(tokens)
        captured.lengths.copy_(lengths)
        captured.deltas.copy_(deltas)
        captured.replay()
        return captured.output


def buckets(
    slots: int, capacity: int, bucket: Callable[[int, int, int], int]
) -> list[tuple[int, int]]:
    """Every (slots, cache positions) shape the slot engine's steps can take, given its
    bucketing function ``bucket(needed, limit, minimum)``."""
    rows = sorted({bucket(n, slots, 1) for n in range(1, slots + 1)})
    positions = sorted({bucket(k, capacity, 256) for k in range(1, capacity + 1)})
    return [(n, k) for n in rows for k in positions]


def cuda_recorder_for(device: torch.device, enabled: bool) -> Any:
    """A ``CudaRecorder`` when ``device`` is a CUDA device and graphs are enabled, else
    None (the eager step)."""
    if not enabled or device.type != "cuda":
        return None
    return CudaRecorder(device)
