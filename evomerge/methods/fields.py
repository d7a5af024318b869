"""Reproducible random fields: the only source of randomness in the kernels.

DARE and DELLA draw their masks by comparing a uniform [0, 1) field with a keep
probability (``field < p`` is a Bernoulli(p) draw, as ``torch.bernoulli`` in
mergekit). The field depends only on ``(seed, tensor_name, model_index)``, so
the same recipe and seed give bit-identical masks on every device and in every
process, and a search can reuse one field per tensor for all candidates
(common random numbers: a candidate's mask depends only on its density).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

_DOMAIN = b"evomerge.random_field.v1"


def field_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """Stable 63-bit generator seed from blake2b of (seed, tensor name, model index)."""
    message = b"\x00".join(
        [_DOMAIN, str(int(seed)).encode(), tensor_name.encode("utf-8"), str(int(model_index)).encode()]
    )
    digest = hashlib.blake2b(message, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def random_field(
    shape: Sequence[int] | torch.Size,
    *,
    seed: int,
    tensor_name: str,
    model_index: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform [0, 1) float32 field drawn on a host generator, then moved to ``device``.

    Drawing on the host generator makes the values independent of the device
    the merge runs on.
    """
    generator = torch.Generator()
    generator.manual_seed(field_seed(seed, tensor_name, model_index))
    field = torch.rand(tuple(shape), generator=generator, dtype=torch.float32)
    return field if device is None else field.to(device)
