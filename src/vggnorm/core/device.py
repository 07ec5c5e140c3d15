"""Where and in what arithmetic the forward pass runs: device, precision, memory format."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from vggnorm.errors import SetupError, UsageError
from vggnorm.options import Precision


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA device that is absent is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"bad --device {device!r}: expected auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError(
                f"--device {device}: CUDA is not available here (torch.cuda.is_available() is False); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SetupError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device}: vggnorm supports cpu and cuda")
    return dev


def describe(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H100 ...)``: recorded with the statistics."""
    return str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"


def check_precision(precision: Precision, device: torch.device) -> None:
    if precision not in (Precision.FP32, Precision.FP64) and device.type != "cuda":
        raise SetupError(f"--precision {precision} is for CUDA; on {device.type} use fp32 (the default) or fp64")


@contextlib.contextmanager
def precision_mode(precision: Precision = Precision.FP32, device_type: str = "cpu") -> Iterator[None]:
    """The arithmetic of the forward pass: fp32 (TF32 off, the default), tf32, or bf16/fp16
    autocast; fp64 runs a float64 model (``model.double()``, the caller's) with TF32 off. The hook
    sums in float32 or float64 whatever the activations' dtype."""
    cudnn_conv = torch.backends.cudnn.conv  # type: ignore[attr-defined]  # torch >= 2.9, not in its stubs
    conv, matmul = cudnn_conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    ieee = precision in (Precision.FP32, Precision.FP64)
    cudnn_conv.fp32_precision = "ieee" if ieee else "tf32"
    torch.backends.cuda.matmul.fp32_precision = "ieee" if ieee else "tf32"
    dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(precision)
    try:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            yield
    finally:
        cudnn_conv.fp32_precision = conv
        torch.backends.cuda.matmul.fp32_precision = matmul


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CPU, where it made VGG19's forward 1.5x faster (scripts/bench.py); not yet
    measured on CUDA, so contiguous there."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch's kernels on one thread within the block (the caller's count is back afterwards). apply's and
    verify's kernels on the CPU are a 2-image probe's, too small to share, or passes over memory, which a
    second thread barely speeds; and beside their own threads (a hash, a figure, a write) a team of two waits
    at every kernel for a thread the system has not scheduled, spinning meanwhile: on a 2-core machine with
    other work, apply of vgg16 took 5-37 s (one thread: 5-10 s), verify 3-24 s (one thread: under 3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
