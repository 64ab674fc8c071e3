"""Load an SDNQ Qwen3-VL once: placement for a memory mode, dtype, and provenance.

Every failure becomes ``ModelLoadError`` with a message naming what to change, so a
worker that cannot serve exits at start with one line instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import time
from importlib import metadata
from typing import TYPE_CHECKING, Any

from worker.engine.base import ModelInfo
from worker.engine.catalogue import resolve_model
from worker.engine.kv_budget import kv_bytes_per_token
from worker.engine.weights import check_fit, convert
from worker.errors import CaptionError, ModelLoadError
from worker.settings import Settings

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ACTIVATION_MARGIN_BYTES = 2 * 2**30


def _dtype(name: str) -> torch.dtype:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def placement(settings: Settings, cuda_available: bool) -> tuple[str, dict[str, Any]]:
    """The execution device and ``from_pretrained`` placement kwargs for a memory mode."""
    device = settings.device or ("cuda:0" if cuda_available else "cpu")
    if device == "cuda":
        device = "cuda:0"
    if device.startswith("cpu") or settings.memory_mode == "gpu":
        return device, {"device_map": {"": device}}
    if settings.memory_mode == "balanced":
        # accelerate spreads layers over every visible GPU and spills the rest to CPU RAM.
        return device, {"device_map": "auto"}
    # lowvram: weights stay in CPU RAM and stream to the GPU layer by layer (see load_engine).
    return device, {"device_map": {"": "cpu"}}


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "transformers", "sdnq", "accelerate"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def load_model(settings: Settings) -> tuple[Any, Any, ModelInfo]:
    """Load the configured model and processor; raise ModelLoadError on any failure."""
    resolved = resolve_model(settings.model)
    started = time.perf_counter()
    import torch

    try:
        import sdnq  # noqa: F401  (registers quant_method "sdnq" with transformers)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device, where = placement(settings, torch.cuda.is_available())
        common: dict[str, Any] = {
            "revision": settings.revision,
            "local_files_only": resolved.is_local or not settings.auto_download,
        }
        model = AutoModelForImageTextToText.from_pretrained(
            resolved.source,
            dtype=_dtype(settings.dtype),
            attn_implementation=settings.attn_implementation,
            **where,
            **common,
        )
        if settings.memory_mode == "lowvram" and device.startswith("cuda"):
            from accelerate import cpu_offload

            cpu_offload(model, execution_device=torch.device(device))
        if settings.sdnq_quantized_matmul:
            from sdnq.loader import apply_sdnq_options_to_model

            model = apply_sdnq_options_to_model(model, use_quantized_matmul=True)
        quantization = _quantization(model)  # before a weight form drops the config
        if quantization.get("quant_method") == "sdnq" and settings.weights != "sdnq":
            dtype = _dtype(settings.dtype)
            dtype_bytes = torch.empty((), dtype=dtype).element_size()
            check_fit(model, settings.weights, dtype_bytes, reserve_bytes(model, settings))
            model = convert(model, settings.weights, dtype)
            quantization["served_as"] = settings.weights
        elif quantization.get("quant_method") == "sdnq":
            quantization["served_as"] = "sdnq"
        model.eval()  # type: ignore[no-untyped-call]
        processor = AutoProcessor.from_pretrained(resolved.source, **common)  # type: ignore[no-untyped-call]
    except CaptionError:
        raise
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"out of memory loading {resolved.name} ({settings.dtype}, memory_mode="
            f"{settings.memory_mode}); try CAPTION_MEMORY_MODE=balanced or lowvram: {exc}"
        ) from None
    except OSError as exc:
        hint = (
            " CAPTION_AUTO_DOWNLOAD is off and the files are not in the local Hugging Face "
            f"cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')})."
            if not settings.auto_download and not resolved.is_local
            else ""
        )
        raise ModelLoadError(f"cannot load model {resolved.name}:{hint} {exc}") from None
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {resolved.name}: {exc!r}") from None
    provenance = {
        "model_source": resolved.source,
        "revision": getattr(model.config, "_commit_hash", None) or settings.revision,
        "quantization": quantization,
        "dtype": settings.dtype,
        "device": device,
        "versions": _versions(),
    }
    info = ModelInfo(resolved, device, provenance)
    log.info(
        "model loaded: %s from %s on %s in %.1fs (pid %d)",
        resolved.name,
        resolved.source,
        device,
        time.perf_counter() - started,
        os.getpid(),
    )
    return model, processor, info


def _quantization(model: Any) -> dict[str, Any]:
    """The checkpoint's quantization, as plain JSON for results."""
    quant = getattr(model.config, "quantization_config", None)
    if quant is None:
        return {}
    quant_dict = quant if isinstance(quant, dict) else getattr(quant, "to_dict", dict)()
    return {
        # quant_method is an Enum in transformers; results must stay plain JSON.
        k: str(getattr(quant_dict[k], "value", quant_dict[k]))
        if k == "quant_method"
        else quant_dict[k]
        for k in ("quant_method", "weights_dtype", "use_svd", "svd_rank")
        if k in quant_dict
    }


def reserve_bytes(model: Any, settings: Settings) -> int:
    """Device memory to keep free beyond the weights: the slot engine's KV cache (or one
    batch's worth of it) and a margin for activations."""
    dtype_bytes = 4 if settings.dtype == "float32" else 2
    per_token = kv_bytes_per_token(model.config.text_config, dtype_bytes)
    return per_token * settings.slot_count * settings.slot_capacity + ACTIVATION_MARGIN_BYTES
