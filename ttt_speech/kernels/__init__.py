"""Fused Triton kernels for the TTT inner loop, and which path a call takes (`TTTConfig.kernel`).

On a GPU the PyTorch path (`ttt_speech.ops`) is thousands of small ops per layer per training
window, each a launch and ~10 µs of Python; a kernel here scans every mini-batch of a chunk in one
launch, one program per (batch row, head). Which runs:

    kernel="torch"   the PyTorch path, always
    kernel="triton"  the kernels; on a CPU only under TRITON_INTERPRET=1 (Triton's interpreter, for
                     tests); a case they do not cover is a one-line error
    kernel="auto"    the kernels on CUDA where they cover the case, the PyTorch path elsewhere

Covered: TTT-Linear forward and backward, TTT-MLP forward without autograd (inference and
evaluation); a float32 state; head dim (and TTT-MLP hidden width) a power of two, 16 to 128 (512
hidden); mini-batches of at most 64 slots; NVIDIA GPUs from sm_80 (A100) on, the targets they are
built and checked for (`build.py`). A program keeps a mini-batch's [slots, D] values in registers
and streams the [D+1, D] fast weights through in tiles from the state's buffers. Files:
`common.py`, `linear.py`, `mlp.py` (Triton), `custom_ops.py` (the PyTorch operators and autograd),
`scan.py` (what `TTTLayer` calls), `launches.py` (the launch counter), `build.py` (ahead-of-time
builds for sm_80 / sm_90). The reference they are pinned to is the PyTorch path
(tests/test_kernels.py).
"""
from __future__ import annotations

import importlib.util
import os
from functools import cache
from typing import Callable

import torch
from torch import Tensor

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128  # tl.dot needs 16; [slots, D] values are held in registers
MAX_MLP_HIDDEN = 512  # TTT-MLP: the hidden layer is streamed in tiles, its [slots, hidden] rows are not
MAX_KERNEL_MINI_BATCH = 64  # [b, b] causal matrices per program (TTTConfig allows up to 1024)
MIN_CAPABILITY = (8, 0)  # sm_80: the oldest target the kernels are built for (the linear backward needs
                         # ~68 KB of shared memory a block; sm_75 allows 64)


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly. It must be
    set before triton is first imported: triton defines its own language library at import."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def unsupported(layer_type: str, head_dim: int, hidden: int, mini_batch_size: int, state_dtype: torch.dtype,
                device: torch.device, needs_grad: bool) -> str | None:
    """Why the kernels cannot run this call, or None when they can."""
    if layer_type not in ("linear", "mlp"):
        return f"layer_type {layer_type!r} has no kernel (TTT-E2E runs on the PyTorch path)"
    if state_dtype != torch.float32:
        return f"the kernels keep a float32 state, this layer's is {state_dtype}"
    if not (_power_of_two(head_dim) and MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM):
        return f"head dim {head_dim}: the kernels take a power of two from {MIN_HEAD_DIM} to {MAX_HEAD_DIM}"
    if layer_type == "mlp" and not (_power_of_two(hidden) and hidden <= MAX_MLP_HIDDEN):
        return f"TTT-MLP hidden width {hidden}: the kernel takes a power of two up to {MAX_MLP_HIDDEN}"
    if mini_batch_size > MAX_KERNEL_MINI_BATCH:
        return f"mini_batch_size {mini_batch_size}: the kernels take at most {MAX_KERNEL_MINI_BATCH}"
    if layer_type == "mlp" and needs_grad:
        return "TTT-MLP has a forward kernel only (inference); training it runs the PyTorch path (kernel: auto)"
    if not triton_installed():
        return "Triton is not installed (pip install triton, or the project's `kernels` extra)"
    if device.type == "cuda":
        return _unsupported_gpu(device.index if device.index is not None else torch.cuda.current_device())
    if device.type != "cpu" or not interpreting():
        return f"the kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1), not on {device.type}"
    return None


@cache
def _unsupported_gpu(index: int) -> str | None:
    if torch.version.hip is not None:
        return "ROCm: the kernels are built and checked for NVIDIA GPUs only"
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        return (f"compute capability {capability[0]}.{capability[1]}: the kernels need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (A100, H100, …)")
    return None


def use_triton(kernel: str, layer_type: str, head_dim: int, hidden: int, mini_batch_size: int,
               state_dtype: torch.dtype, x: Tensor, needs_grad: Callable[[], bool]) -> bool:
    """Whether this call runs the Triton kernels, by `TTTConfig.kernel` (see the module docstring).
    needs_grad: whether autograd records the call (asked only when it matters)."""
    if kernel == "torch" or (kernel == "auto" and x.device.type != "cuda"):
        return False
    reason = unsupported(layer_type, head_dim, hidden, mini_batch_size, state_dtype, x.device,
                         layer_type == "mlp" and needs_grad())
    if reason is not None and kernel == "triton":
        raise ValueError(f"TTTConfig.kernel: 'triton' cannot run this layer: {reason}")
    return reason is None
