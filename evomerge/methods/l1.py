"""The L1 norm of a (masked) task vector, summed in one fixed order so every code path agrees bit for bit.

mergekit's rescale ``‖δ‖₁ / ‖m⊙δ‖₁`` (``rescaled_masked_tensor``) sums float32 magnitudes with
torch's reduction, whose order depends on the tensor's size, the CPU's vector width and the
thread count. Here the sum has one definition: float64 accumulation over blocks of
``L1_BLOCK`` elements (counted from the tensor's first element), eight interleaved lanes
inside a block, ``((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))`` per block, blocks added in order,
rounded once to the tensor's dtype. The engine (``apply_mask``, here in torch) and the search's
compiled candidate kernel (``backends.l1_host.lane_sum``, numba) follow this order exactly, so their
rescale factors, and so their merged tensors, are identical (tests compare). The result is more
accurate than a float32 sum and differs from mergekit's by at most a rounding of the norm (≤ 1
ulp of the factor).
"""

from __future__ import annotations

import torch

L1_BLOCK = 4096
CHUNK = L1_BLOCK * 256  # float64 scratch per step


def l1_norm(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """‖m⊙x‖₁ (‖x‖₁ without ``mask``) as a 0-d tensor of x's dtype, in the fixed order above.

    On the host each lane's sequential sum is the last entry of a float64 ``cumsum`` (the CPU's
    scan never regroups, unlike ``sum``), over scratch of at most ``CHUNK`` elements. A GPU's scan
    regroups, so on other devices the lanes are summed with elementwise additions
    (``lane_block_sums``) and the block sums added in order on the host: the same bits.
    """
    if x.device.type != "cpu":
        return _l1_norm_elementwise(x, mask)
    flat = x.detach().reshape(-1)
    keep = mask.reshape(-1) if mask is not None else None
    total = torch.zeros(1, dtype=torch.float64, device=x.device)
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start : start + CHUNK].abs().to(torch.float64)
        if keep is not None:
            part.masked_fill_(~keep[start : start + CHUNK], 0.0)
        blocks = -(-part.numel() // L1_BLOCK)
        padded = torch.zeros(blocks * L1_BLOCK, dtype=torch.float64, device=x.device)  # +0.0 adds nothing
        padded[: part.numel()] = part
        lanes = padded.view(blocks, L1_BLOCK // 8, 8).transpose(1, 2).cumsum(dim=2)[..., -1]  # (blocks, 8)
        sums = ((lanes[:, 0] + lanes[:, 1]) + (lanes[:, 2] + lanes[:, 3])) + \
            ((lanes[:, 4] + lanes[:, 5]) + (lanes[:, 6] + lanes[:, 7]))
        total = torch.cat([total, sums]).cumsum(0)[-1:]
    return total[0].to(x.dtype)


def lane_block_sums(mags: torch.Tensor) -> torch.Tensor:
    """Per 4096-element block of float64 magnitudes [..., blocks·4096]: its sum in ``l1_norm``'s order.

    Lane l holds the elements l, l+8, l+16, …, each summed sequentially (as a float64 ``cumsum``
    on the host does); the lanes combine as ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)). Only
    elementwise additions (511 of them): the same bits on every device, for any batch of blocks.
    """
    lanes = mags.view(*mags.shape[:-1], -1, L1_BLOCK // 8, 8)
    acc = lanes[..., 0, :].clone()
    for j in range(1, L1_BLOCK // 8):
        acc += lanes[..., j, :]
    a = acc.unbind(-1)
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))


DEVICE_CHUNK = L1_BLOCK * (1 << 14)  # 64M elements (512 MB of float64 scratch) per step on a GPU


def _l1_norm_elementwise(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``l1_norm`` with the lanes summed by ``lane_block_sums`` on x's device, the blocks on the host."""
    flat = x.detach().reshape(-1)
    keep = mask.reshape(-1) if mask is not None else None
    block_sums = []
    for start in range(0, flat.numel(), DEVICE_CHUNK):
        part = flat[start : start + DEVICE_CHUNK]
        blocks = -(-part.numel() // L1_BLOCK)
        padded = torch.zeros(blocks * L1_BLOCK, dtype=torch.float64, device=x.device)  # +0.0 adds nothing
        padded[: part.numel()] = part.abs()
        if keep is not None:
            padded[: part.numel()].masked_fill_(~keep[start : start + DEVICE_CHUNK], 0.0)
        block_sums.append(lane_block_sums(padded).cpu())
    sums = torch.cat([torch.zeros(1, dtype=torch.float64), *block_sums])
    return sums.cumsum(0)[-1].to(x.dtype).to(x.device)  # in order from +0.0, on the host
