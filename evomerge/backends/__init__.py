"""Candidate backends: how a recipe is merged into one resident model (``base.Backend``).

``reference`` (torch, every method, tensor by tensor), ``cpu`` (numba, the task-arithmetic
family in one compiled pass) and ``cuda`` (Triton, the task-arithmetic family in fused kernels).
``resolve_backend`` turns the public ``backend="auto" | "reference" | "cpu" | "cuda"`` argument
into one of them; ``tensor_kernel`` says how ``evomerge merge`` merges each tensor. Modules are
imported lazily: a merge loads numba only for the compiled pass, and Triton never.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

BackendName = Literal["auto", "reference", "cpu", "cuda"]
BACKEND_NAMES = ("auto", "reference", "cpu", "cuda")


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton's kernels can run on ``device``: CUDA with Triton installed, or the CPU in
    Triton's interpreter (``TRITON_INTERPRET=1``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def resolve_backend(backend: str, device: torch.device, method: str) -> str:
    """The backend that merges ``method``'s candidates on ``device``.

    "auto": the task-arithmetic family on ``cpu`` on the CPU and ``cuda`` on a GPU with Triton,
    ``reference`` otherwise. Methods outside that family always take ``reference``. An explicit
    backend that cannot run there is an error naming why.
    """
    from evomerge.methods.task_arithmetic import VARIANTS

    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}, got {backend!r}")
    if method not in VARIANTS:
        return "reference"
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        return "cuda" if device.type == "cuda" and triton_runs_on(device) else "reference"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"the cpu backend merges on the CPU only (device {device})")
    if backend == "cuda" and not triton_runs_on(device):
        raise ValueError(f"the cuda backend needs Triton and a CUDA device (or, on the CPU, Triton's interpreter: "
                         f"TRITON_INTERPRET=1); device {device}")
    return backend


def backend_class(name: str):
    """The ``Backend`` subclass called ``name`` (imported on first use)."""
    if name == "reference":
        from evomerge.backends.reference import ReferenceBackend

        return ReferenceBackend
    if name == "cpu":
        from evomerge.backends.cpu import CpuBackend

        return CpuBackend
    from evomerge.backends.cuda import CudaBackend

    return CudaBackend


def tensor_kernel(backend: str, device: torch.device, method: str):
    """How ``evomerge merge`` (``engine.run_merge``) merges each tensor of ``method`` on ``device``.

    The cpu backend's compiled pass, one tensor at a time (a new ``cpu_stream.StreamKernel``), where
    ``resolve_backend`` picks ``cpu`` (the task-arithmetic family on the CPU); else None: the
    reference kernels (``MergeMethod.merge``), tensor by tensor on any device. "auto" leaves the
    variant without a sparsifier (task_arithmetic) to the reference kernels: with no mask to compute
    they are faster than the compiled pass with its float32 buffers (results/bench/merge_speed.md).
    """
    from evomerge.methods.task_arithmetic import VARIANTS

    if resolve_backend(backend, device, method) != "cpu":
        return None
    if backend == "auto" and VARIANTS[method].sparsification is None:
        return None
    from evomerge.backends.cpu_stream import StreamKernel

    return StreamKernel()
