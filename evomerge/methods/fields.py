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
element where it needs it instead of reading a stored field (``cuda_kernels``):
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
_CHUNK = 1 << 15  # elements per NumPy step: the temporaries stay in cache


def field_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """The tensor's 64-bit field key, from blake2b of (seed, tensor name, model index)."""
    message = b"\x00".join(
        [_DOMAIN, str(int(seed)).encode(), tensor_name.encode("utf-8"), str(int(model_index)).encode()]
    )
    return int.from_bytes(hashlib.blake2b(message, digest_size=8).digest(), "little")


def splitmix_uniform(key: int, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
    """Elements [start, start + count) of the field with this key (float32, NumPy's wrapping uint64
    arithmetic), into ``out`` if given: the definition, which ``backends.fields_host`` and the GPU
    kernels compute the same way.

    z = key + (j + 1)·γ; z = (z ⊕ z≫30)·M₁; z = (z ⊕ z≫27)·M₂; z ⊕= z≫31; u = (z≫40)·2⁻²⁴.
    """
    z = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z *= np.uint64(GOLDEN_GAMMA)
        z += np.uint64(key)
        for shift, multiplier in ((30, MIX_1), (27, MIX_2)):
            z ^= z >> np.uint64(shift)
            z *= np.uint64(multiplier)
        z ^= z >> np.uint64(31)
        z >>= np.uint64(40)
    out = np.empty(count, dtype=np.float32) if out is None else out
    np.multiply(z, 2.0 ** -24, out=out, casting="unsafe")  # exact: a 24-bit integer · 2⁻²⁴
    return out


def random_field(
    shape: Sequence[int] | torch.Size,
    *,
    seed: int,
    tensor_name: str,
    model_index: int,
    device: torch.device | str | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Uniform [0, 1) float32 field of ``shape`` (``splitmix_uniform`` over the flat index), on ``device``.

    Computed on the host, the values do not depend on the device: with NumPy in cache-sized chunks
    (``splitmix_uniform``), or with ``compiled`` by numba on its threads (``backends.fields_host``,
    for the compiled backends, which have numba loaded anyway).
    """
    field = torch.empty(int(np.prod(tuple(shape), dtype=np.int64)), dtype=torch.float32).numpy()  # torch's allocator
    key = field_seed(seed, tensor_name, model_index)
    if compiled:
        from evomerge.backends.fields_host import fill_uniform

        fill_uniform(np.uint64(key), field)
    else:
        for start in range(0, field.size, _CHUNK):
            splitmix_uniform(key, start, min(_CHUNK, field.size - start), out=field[start:start + _CHUNK])
    out = torch.from_numpy(field).reshape(tuple(shape))
    return out if device is None else out.to(device)


class RandomFields(Sequence):
    """The random fields of a tensor's ``count`` inputs (``model_index`` 0, 1, …), each drawn when it is
    indexed and not kept: a kernel that sparsifies one input at a time holds one field, not all."""

    def __init__(self, shape: Sequence[int] | torch.Size, *, seed: int, tensor_name: str, count: int,
                 device: torch.device | str | None = None):
        self.shape, self.seed, self.tensor_name, self.count, self.device = tuple(shape), seed, tensor_name, count, device

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.count:
            raise IndexError(i)
        return random_field(self.shape, seed=self.seed, tensor_name=self.tensor_name, model_index=i,
                            device=self.device)
