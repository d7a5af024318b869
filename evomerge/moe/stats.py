"""Router statistics on the calibration prompts: per layer, the share of tokens whose top-1 expert is
each expert, and how often an expert's own prompts' tokens go to it (routing accuracy)."""

from __future__ import annotations

import torch

from evomerge.moe.activations import all_block_inputs, encode
from evomerge.moe.assemble import MoeModel
from evomerge.moe.prompts import ExpertPrompts


def confusion(logits: list[torch.Tensor], num_experts: int) -> torch.Tensor:
    """(sources, experts) counts: row s counts source s's tokens by their top-1 expert."""
    return torch.stack([torch.bincount(l.argmax(-1), minlength=num_experts) for l in logits]).float()


@torch.no_grad()
def router_statistics(moe: MoeModel, tokenizer, prompts: list[ExpertPrompts], max_length: int) -> list[dict]:
    """Per layer: ``share`` (fraction of all calibration tokens per top-1 expert), ``accuracy`` (fraction
    of expert e's positive-prompt tokens routed top-1 to e, per expert) and ``mean_accuracy``."""
    blocks = moe.blocks()
    per_source = [all_block_inputs(moe.model, blocks, encode(tokenizer, p.positive, max_length)) for p in prompts]
    out = []
    for l, block in enumerate(blocks):
        w = block.gate.weight.float()
        counts = confusion([x[l] @ w.T for x in per_source], moe.num_experts)
        acc = (counts.diagonal() / counts.sum(1).clamp(min=1)).tolist()
        out.append({"layer": l, "share": (counts.sum(0) / counts.sum()).tolist(), "accuracy": acc,
                    "mean_accuracy": sum(acc) / len(acc)})
    return out
