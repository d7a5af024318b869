"""Reproducible random fields: the only source of randomness in the kernels.

DARE and DELLA draw their masks by comparing a uniform [0, 1) field with a keep
probability (``field < p`` is a Bernoulli(p) draw, as ``torch.bernoulli`` in
mergekit). The field depends only on ``(seed, tensor_name, model_index)``, so
the same recipe and seed give bit-identical masks on every device and in every
process, and a search can reuse one field per tensor for all candidates
(common random numbers: a candidate's mask depends only on its density).

Element j of a tensor's field is a pure function of j and the tensor's key: the
j-th output of SplitMix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom
number generators"; ``java.util.SplittableRandom``) seeded with the key, its top 24
bits as a float32 in [0, 1) (as ``torch.rand`` forms its float32). Because no
generator state is carried from element to element, a GPU kernel computes any
element where it needs it instead of reading a stored field (``device_kernels``):
the same integers, so the same bits as here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

_DOMAIN = b"evomerge.random_field.v2"
GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment
MIX_1, MIX_2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # its finalizer's multipliers (Stafford's variant 13)


def field_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """The tensor's 64-bit field key, from blake2b of (seed, tensor name, model index)."""
    message = b"\x00".join(
        [_DOMAIN, str(int(seed)).encode(), tensor_name.encode("utf-8"), str(int(model_index)).encode()]
    )
    return int.from_bytes(hashlib.blake2b(message, digest_size=8).digest(), "little")


def splitmix_uniform(key: int, start: int, count: int) -> np.ndarray:
    """Elements [start, start + count) of the field with this key (float32, NumPy's wrapping uint64
    arithmetic): the definition, which ``fields_host`` and the GPU kernels compute the same way.

    z = key + (j + 1)·γ; z = (z ⊕ z≫30)·M₁; z = (z ⊕ z≫27)·M₂; z ⊕= z≫31; u = (z≫40)·2⁻²⁴.
    """
    j = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(key) + j * np.uint64(GOLDEN_GAMMA)
        z ^= z >> np.uint64(30)
        z *= np.uint64(MIX_1)
        z ^= z >> np.uint64(27)
        z *= np.uint64(MIX_2)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)


def random_field(
    shape: Sequence[int] | torch.Size,
    *,
    seed: int,
    tensor_name: str,
    model_index: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform [0, 1) float32 field of ``shape`` (``splitmix_uniform`` over the flat index), on ``device``.

    Computed on the host (compiled, ``fields_host``); the values do not depend on the device.
    """
    from .fields_host import fill_uniform

    field = np.empty(int(np.prod(tuple(shape), dtype=np.int64)), dtype=np.float32)
    fill_uniform(np.uint64(field_seed(seed, tensor_name, model_index)), field)
    out = torch.from_numpy(field).reshape(tuple(shape))
    return out if device is None else out.to(device)
