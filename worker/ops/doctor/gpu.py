"""The GPUs torch sees, and whether the model in its ``CAPTION_WEIGHTS`` form fits them.

The estimate itself is ``worker.engine.footprint``'s; this only judges it against the
tightest GPU a worker would use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.engine.footprint import Footprint
from worker.ops.doctor.report import CheckResult, Status, gib
from worker.settings import Settings


@dataclass(frozen=True)
class Gpu:
    """One CUDA device as torch sees it now."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class GpuProbe:
    """What torch found: the devices, and which CUDA torch was built for (None: CPU-only)."""

    gpus: tuple[Gpu, ...]
    torch_cuda: str | None


def probe_gpus() -> GpuProbe:
    """Ask torch for every visible CUDA device, its name and free/total memory."""
    import torch

    if not torch.cuda.is_available():
        return GpuProbe((), torch.version.cuda)
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(Gpu(index, torch.cuda.get_device_name(index), total, free))
    return GpuProbe(tuple(gpus), torch.version.cuda)


def wants_cpu(device: str | None) -> bool:
    return device is not None and device.startswith("cpu")


def _device_index(device: str | None) -> int | None:
    """The GPU index CAPTION_DEVICE names (``cuda:1`` -> 1), or None for any/all."""
    match = re.fullmatch(r"cuda:(\d+)", device or "")
    return int(match.group(1)) if match else None


def _target_gpus(probe: GpuProbe, device: str | None) -> list[Gpu]:
    """The GPUs a worker may run on: the one CAPTION_DEVICE names, or every visible one
    (``caption-worker worker`` starts one process per GPU)."""
    index = _device_index(device)
    return [g for g in probe.gpus if index is None or g.index == index]


def check_gpu(probe: GpuProbe | None, device: str | None) -> CheckResult:
    """A GPU is there for the worker, unless CAPTION_DEVICE=cpu says it should not be.
    ``probe`` is None when torch was not asked (CAPTION_DEVICE=cpu)."""
    if wants_cpu(device):
        return CheckResult(
            "gpu", Status.OK, f"CAPTION_DEVICE={device}: the worker runs on the CPU by choice"
        )
    if probe is None:
        return CheckResult("gpu", Status.SKIP, "torch was not asked about GPUs")
    build = f"torch built for CUDA {probe.torch_cuda}" if probe.torch_cuda else "CPU-only torch"
    if not probe.gpus:
        if device is None:
            return CheckResult(
                "gpu",
                Status.WARN,
                f"no GPU ({build} sees none); the worker will run on the CPU: check the "
                "driver and CUDA_VISIBLE_DEVICES, or set CAPTION_DEVICE=cpu if that is meant",
            )
        return CheckResult(
            "gpu",
            Status.FAIL,
            f"CAPTION_DEVICE={device} but {build} sees no GPU: check the driver, "
            "CUDA_VISIBLE_DEVICES and the pod's GPU request",
        )
    targets = _target_gpus(probe, device)
    if not targets:
        return CheckResult(
            "gpu",
            Status.FAIL,
            f"CAPTION_DEVICE={device} but only {len(probe.gpus)} GPU(s) are visible "
            f"(cuda:0 to cuda:{len(probe.gpus) - 1}); fix CAPTION_DEVICE",
        )
    listed = "; ".join(
        f"cuda:{g.index} {g.name}, {gib(g.free_bytes)} free of {gib(g.total_bytes)}"
        for g in targets
    )
    return CheckResult("gpu", Status.OK, listed)


def check_weights_fit(
    probe: GpuProbe | None, footprint: Footprint | str, settings: Settings
) -> CheckResult:
    """Whether the model in its CAPTION_WEIGHTS form, plus KV cache and activations, fits the
    tightest GPU a worker may use. ``footprint`` is the estimate, or why there is none."""
    name = "weights fit"
    if wants_cpu(settings.device) or probe is None:
        return CheckResult(name, Status.SKIP, "CPU worker: no GPU memory to fit")
    targets = _target_gpus(probe, settings.device)
    if not targets:
        return CheckResult(name, Status.SKIP, "no usable GPU, so nothing to fit the model on")
    if isinstance(footprint, str):
        return CheckResult(name, Status.SKIP, footprint)
    form = f"CAPTION_WEIGHTS={settings.weights}" if footprint.quantized else "the model"
    gpu = min(targets, key=lambda g: g.free_bytes)
    loaded = footprint.weights_bytes + footprint.extra_bytes
    needed = loaded + footprint.reserve_bytes
    sizes = (
        f"{form} needs about {gib(loaded)} for weights + "
        f"{gib(footprint.reserve_bytes)} for KV cache and activations; cuda:{gpu.index} has "
        f"{gib(gpu.free_bytes)} free"
    )
    if needed <= gpu.free_bytes:
        return CheckResult(name, Status.OK, sizes)
    if settings.memory_mode != "gpu":
        return CheckResult(
            name,
            Status.WARN,
            f"{sizes}; CAPTION_MEMORY_MODE={settings.memory_mode} spills the rest to CPU RAM, "
            "which is slower",
        )
    if footprint.quantized and settings.weights != "sdnq":
        fix = (
            "use CAPTION_WEIGHTS=int8 (half of bf16) or sdnq, fewer CAPTION_SLOTS, or a larger GPU"
        )
        return CheckResult(name, Status.FAIL, f"{sizes}: the worker will refuse to start; {fix}")
    if loaded > gpu.free_bytes:
        return CheckResult(
            name,
            Status.FAIL,
            f"{sizes}: loading runs out of memory; use CAPTION_MEMORY_MODE=balanced or lowvram, "
            "or a larger GPU",
        )
    short = (
        "the slot engine's KV cache may not fit: the worker then starts with fewer slots "
        "(and refuses a CAPTION_SLOTS that does not fit); lower CAPTION_SLOTS or "
        "CAPTION_SLOT_TOKENS"
        if settings.engine == "slots"
        else "large batches will run out of memory and be split; lower CAPTION_MAX_BATCH"
    )
    return CheckResult(name, Status.WARN, f"{sizes}: {short}")
