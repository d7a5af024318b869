"""The candidate builder's device path: one candidate as batched torch operations over the flat buffers.

On a GPU, merging tensor by tensor costs a few dozen kernel launches per tensor and input, so a
candidate of a small model is launch-bound (~15 ms for the demo zoo's TIES, against 0.04 ms of
memory traffic). Here every resident buffer is one flat array (``CandidateBuilder`` lays each
tensor out from a multiple of ``L1_BLOCK`` elements, zeros between), and a candidate is a fixed
number of whole-buffer operations per chunk of elements, however many tensors the model has:
per-element settings come from the candidate's per-tensor tables (``flat_kernel.segment_tables``)
through the element → tensor index ``seg_of``.

Bit for bit the engine's result (``task_arithmetic.merge_task_vectors``): every step is the same
float32 operation on the same operands in the same order, elementwise, so the batching changes no
bit. δ·keep, × the rescale factor, × w; the sign election and sums in input order
(``consensus.input_sum``); the disjoint merge and its divisor; ÷ Σw; × λ; + base. The rescale
norms follow ``l1.l1_norm``'s fixed order: eight lanes per 4096-element block summed with one
elementwise float64 addition per step (``l1.lane_block_sums``), then the blocks of each tensor added
in order on the host. Multiplying by 1 and adding +0 change no bit, which lets one batched
operation serve tensors that do not rescale, or have fewer inputs (weight 0).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from evomerge.methods.consensus import input_sum, signed_unit
from evomerge.search import flat_kernel as fk



@njit(cache=True)
def segment_totals(block_sums: np.ndarray, first_block: np.ndarray, n_blocks: np.ndarray) -> np.ndarray:
    """float32 L1 norm per input and segment: its blocks' sums added in order from +0.0, then rounded."""
    k, n_seg = block_sums.shape[0], first_block.shape[0]
    out = np.empty((k, n_seg), dtype=np.float32)
    for i in range(k):
        for s in range(n_seg):
            total = 0.0
            for b in range(first_block[s], first_block[s] + n_blocks[s]):
                total += block_sums[i, b]
            out[i, s] = np.float32(total)
    return out


def rule_tables(rule: int, mode: np.ndarray, lo: np.ndarray, hi: np.ndarray, thr: np.ndarray, dme: np.ndarray,
                eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per input slot and segment ([slots, segments]), the constants of the method's one keep rule.

    Keep-all and keep-none inputs are folded into the rule: a rank window [0, 2³¹−1) or [0, 0);
    a field threshold 2 or −1 (the field lies in [0, 1)); DELLA's p = q·0 + 2 or −1. Returns
    (int32 [2, slots, segments]: lo, hi; float32 [2, slots, segments]: thr or dme, eps).
    """
    ints = np.zeros((2, *mode.T.shape), dtype=np.int32)
    floats = np.zeros((2, *mode.T.shape), dtype=np.float32)
    keep_all, keep_none = mode.T == fk.MODE_ALL, mode.T == fk.MODE_NONE
    if rule in (fk.RULE_TOP, fk.RULE_MAGNITUDE):
        ints[0], ints[1] = lo.T, hi.T
        ints[0][keep_all | keep_none] = 0
        ints[1][keep_all] = np.iinfo(np.int32).max
        ints[1][keep_none] = 0
    elif rule == fk.RULE_FIELD:
        floats[0] = thr.T
    else:  # DELLA: p = q·ε + (density − ε); one-element rows (MODE_FIELD) keep with p = density
        field_rows = mode.T == fk.MODE_FIELD
        floats[0] = np.where(field_rows, thr.T, dme.T)
        floats[1] = np.where(field_rows, 0, eps.T)
        floats[1][keep_all | keep_none] = 0
    if rule in (fk.RULE_FIELD, fk.RULE_DELLA):
        floats[0][keep_all] = 2.0
        floats[0][keep_none] = -1.0
    return ints, floats


def keep_mask(rule: int, stat: torch.Tensor | None, field: torch.Tensor | None, ints: torch.Tensor,
              floats: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """One input's keep mask on a chunk: the engine's comparison with this candidate's constants.

    ``stat`` is the input's stable ranks (magnitude rules) or DELLA's q = (r/(n−1))·2; ``field`` its
    random field; ``ints`` / ``floats`` the slot's rows of ``rule_tables`` on the device; ``seg``
    the chunk's element → segment index.
    """
    if rule in (fk.RULE_TOP, fk.RULE_MAGNITUDE):
        return (stat >= ints[0].index_select(0, seg)) & (stat < ints[1].index_select(0, seg))
    if rule == fk.RULE_FIELD:
        return field < floats[0].index_select(0, seg)
    p = torch.mul(stat, floats[1].index_select(0, seg)).add_(floats[0].index_select(0, seg))  # (d − ε) + q·ε
    return field < p


def mix(weighted: torch.Tensor, weights: torch.Tensor, *, consensus: bool, normalize: torch.Tensor | None,
        total: torch.Tensor | None) -> torch.Tensor:
    """The engine's mix of the weighted inputs Dᵢ [k, C]: disjoint merge (``consensus.disjoint_merge``)
    or sum (``consensus.weighted_sum``), with per-element weights, normalize flags and Σw.

    ``normalize`` (bool [C]) is None when no element normalizes; ``total`` (float32 [C]) is Σw
    where the sum is normalized and 1 elsewhere.
    """
    if not consensus:
        mixed = input_sum(weighted)
        if total is not None:
            mixed /= total
        return mixed
    unit = signed_unit(input_sum(weighted) >= 0, weighted.dtype)
    mixed = torch.zeros_like(unit)
    divisor = torch.zeros_like(unit) if normalize is not None else None
    for i in range(weighted.shape[0]):
        agreeing = torch.mul(weighted[i], unit).clamp_(min=0)
        mixed += agreeing
        if divisor is not None:
            divisor.addcmul_(agreeing.sign_(), weights[i])  # sign ∈ {0, 1}: the product is exact, as alpha=w
    mixed *= unit
    if divisor is not None:
        mixed /= divisor.masked_fill_((divisor == 0) | ~normalize, 1)
    return mixed
