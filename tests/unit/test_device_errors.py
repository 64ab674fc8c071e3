"""Which model errors end the worker: CUDA's sticky errors, and nothing else."""

from __future__ import annotations

import pytest

from worker.engine.base import device_failed

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: device-side assert triggered",
        "CUDA error: unspecified launch failure",
        "CUDA error: uncorrectable ECC error encountered",
        "CUDA error: misaligned address",
    ],
)
def test_sticky_cuda_errors_mean_the_device_failed(message: str) -> None:
    assert device_failed(torch.AcceleratorError(message))
    assert device_failed(RuntimeError(message))  # how older torch releases raise them


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        torch.AcceleratorError("CUDA error: out of memory"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        torch.AcceleratorError("CUDA error: invalid configuration argument"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)"),
        ValueError("CUDA error: an illegal memory access was encountered"),  # not from torch
    ],
)
def test_errors_that_fail_one_call_do_not(error: BaseException) -> None:
    assert not device_failed(error)
