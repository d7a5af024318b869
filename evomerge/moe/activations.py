"""Capturing what routers see: each MoE block's input (the post-attention-norm activation, the router's
real input) and, for mergekit's ``hidden`` mode, a dense model's residual stream before each layer.

Only real tokens count: padding positions are dropped using the attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the wanted layer has been seen."""


def encode(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded, truncated input ids and attention mask for ``texts``."""
    return dict(tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                          padding_side="right"))


def encode_like_mergekit(tokenizer, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """mergekit-moe's tokenisation of prompts: the bos token's text prepended, no other special tokens,
    padded on the tokenizer's own side, no truncation."""
    return dict(tokenizer([(tokenizer.bos_token or "") + t for t in texts], return_tensors="pt", padding=True,
                          add_special_tokens=False))


def _batches(enc: dict[str, torch.Tensor], batch_size: int):
    n = enc["input_ids"].shape[0]
    for i in range(0, n, batch_size):
        yield {k: v[i:i + batch_size] for k, v in enc.items()}


@torch.no_grad()
def block_inputs(model: torch.nn.Module, block: torch.nn.Module, enc: dict[str, torch.Tensor],
                 batch_size: int = 32) -> torch.Tensor:
    """Every real token's input to ``block`` (a module of ``model``) as (tokens, hidden) float32 rows;
    each forward pass stops at that block."""
    rows = []

    def hook(_module, args):
        captured.append(args[0])
        raise _Stop

    handle = block.register_forward_pre_hook(hook)
    try:
        for batch in _batches(enc, batch_size):
            captured: list[torch.Tensor] = []
            try:
                model(**batch)
            except _Stop:
                pass
            x = captured[0].reshape(*batch["attention_mask"].shape, -1)
            rows.append(x[batch["attention_mask"].bool()].float())
    finally:
        handle.remove()
    return torch.cat(rows)


@torch.no_grad()
def all_block_inputs(model: torch.nn.Module, blocks: Sequence[torch.nn.Module], enc: dict[str, torch.Tensor],
                     batch_size: int = 32) -> list[torch.Tensor]:
    """Like :func:`block_inputs` for every block at once, with one full forward pass per batch."""
    per_block: list[list[torch.Tensor]] = [[] for _ in blocks]
    current: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_pre_hook(lambda _m, args, i=i: current.__setitem__(i, args[0]))
               for i, b in enumerate(blocks)]
    try:
        for batch in _batches(enc, batch_size):
            model(**batch)
            mask = batch["attention_mask"].bool()
            for i in range(len(blocks)):
                per_block[i].append(current[i].reshape(*mask.shape, -1)[mask].float())
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(rows) for rows in per_block]


@torch.no_grad()
def residuals_like_mergekit(model: torch.nn.Module, enc: dict[str, torch.Tensor], average: bool) -> torch.Tensor:
    """mergekit-moe's ``hidden`` statistics: the residual stream entering each layer, averaged over every
    position (padding included) or taken at the last position (padded or not), then averaged over prompts:
    (layers, hidden), in the model's dtype."""
    hs = torch.stack(model(**enc, output_hidden_states=True).hidden_states[:-1])
    hs = hs.sum(dim=2) / hs.shape[2] if average else hs[:, :, -1, :]
    return hs.sum(dim=1) / hs.shape[1]


@torch.no_grad()
def last_token_residuals(model: torch.nn.Module, enc: dict[str, torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """The residual stream entering each layer at each prompt's last real token: (layers, prompts, hidden)."""
    out = []
    for batch in _batches(enc, batch_size):
        hs = model(**batch, output_hidden_states=True).hidden_states[:-1]  # inputs of layers 0..L-1
        last = batch["attention_mask"].sum(dim=1) - 1
        out.append(torch.stack([h[torch.arange(h.shape[0]), last] for h in hs]).float())
    return torch.cat(out, dim=1)
