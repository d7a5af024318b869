"""The floor of one candidate build, for the benchmarks: read every resident input once, write every parameter once.

On the cpu backend, one compiled pass base + Σδ over the same blocks as a candidate, on the
candidates' threads (or ``threads`` threads). On the cuda backend, Σδ and + base over the flat
buffers (two torch kernels). Otherwise eager torch, tensor by tensor.
"""

from __future__ import annotations

import time

import torch


@torch.inference_mode()
def floor(builder, threads: int | None = None) -> float:
    """Seconds of one floor pass of ``builder`` (a ``CandidateBuilder``); its live model then holds base + Σδ."""
    from evomerge.backends import cpu_kernel as fk

    b = builder.backend
    if b.name == "cpu":
        cuts = b.cuts if threads is None else fk.segment_cuts(b.numel, threads)
        args = (b.flat_inputs.numpy(), b.flat_base.numpy(), b.flat_out.numpy(), b.blocks, b.seg_blocks)
        t0 = time.perf_counter()
        if len(cuts) > 2:
            fk.floor_parallel(*args, cuts)
        else:
            fk.floor_segments(*args, 0, len(b.names))
        return time.perf_counter() - t0
    if b.name == "cuda":
        out = torch.empty_like(b.flat_base)
        b.sync()
        t0 = time.perf_counter()
        torch.sum(b.flat_inputs, dim=0, dtype=torch.float32, out=out)
        out.add_(b.flat_base)
        b.sync()
        return time.perf_counter() - t0
    t0 = time.perf_counter()
    for name, base in b.base.items():
        acc = base.clone()
        for inputs in b.inputs.values():
            acc.add_(inputs[name])
        b.params[name].copy_(acc)
    return time.perf_counter() - t0
