"""Router initialisations, one class per ``gate_mode``, behind one narrow interface.

Every mode returns the routers of all layers as one (layers, experts, hidden) float32 tensor, row e of
layer l being router l's weight for expert e (logit = row · router input). Random modes draw from a
generator seeded by the run seed.

- ``random``, ``uniform_random``: mergekit-moe 0.1.5's draws, reproduced exactly for the same seed
  (``torch.randn`` rows, unnormalised; ``nn.Linear``'s default uniform(-1/sqrt(H), 1/sqrt(H))).
- ``zero``: all-zero routers, i.e. uniform routing (ties go to the lowest expert indices).
- ``cheap_embed``: as mergekit-moe 0.1.5 (same tensors): per expert, the normalised sum of the base's token
  embeddings over its positive prompts (mergekit's tokenisation, padding excluded) minus that of its
  negative prompts, normalised, the same row for every layer.
- ``hidden_last``, ``hidden_avg``: mergekit-moe 0.1.5's modes of these names reproduced as they are
  (parity modes; see ``MergekitHidden``).
- ``hidden``: mergekit's idea (residual stream entering each layer, at each prompt's last token, of the
  base model; mean over prompts; positive minus negative; unit rows), but at the last *real* token and in
  the requested activation dtype (mergekit: always bfloat16, and the last position even when padded).
- ``router_input_mean``: the router's real input (the MoE block's input, i.e. the post-attention-norm
  activation), captured with hooks layer by layer in the assembled MoE (routers of earlier layers already
  set); row e = unit(mean over expert e's positive-prompt tokens − mean over its negative-prompt tokens,
  or, without negatives, the mean of all experts' positive means).
- ``router_input_lda``: the same class means, whitened by the pooled within-expert covariance of the
  captured inputs (Fisher's linear discriminant; ``whitened``), closed form like ``router_input_mean``.
- ``supervised``: per layer, a multinomial logistic regression without bias (the router has none) on the
  same captured inputs, labels = which expert's prompt the token came from, classes balanced, L2 penalty.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from evomerge.moe.activations import (block_inputs, encode, encode_like_mergekit, last_token_residuals,
                                      residuals_like_mergekit)
from evomerge.moe.assemble import MoeModel
from evomerge.moe.config import GATE_MODES
from evomerge.moe.prompts import ExpertPrompts

SUPERVISED_L2 = 1e-3  # logistic-regression penalty on the mean squared router weight
SUPERVISED_ITERS = 200
LDA_RIDGE = 1e-3  # router_input_lda: ridge on the within-expert covariance, relative to its mean variance


@dataclass
class GateContext:
    """What a router initialisation may use."""

    moe: MoeModel
    tokenizer: object
    prompts: list[ExpertPrompts]
    seed: int
    max_length: int
    base_model: str  # the dense base's directory (``hidden`` runs it)
    float32_activations: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        w = self.moe.blocks()[0].gate.weight
        return len(self.moe.blocks()), w.shape[0], w.shape[1]

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


class RouterInit(ABC):
    """One way to set every layer's router before (optional) training."""

    name: ClassVar[str]  # its gate_mode; which modes need prompts: config.DATA_FREE_MODES

    @abstractmethod
    def weights(self, ctx: GateContext) -> torch.Tensor:
        """Router weights of all layers, (layers, experts, hidden), float32."""


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` (last dim) scaled to unit L2 norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def contrast(pos: list[torch.Tensor], neg: list[torch.Tensor | None]) -> torch.Tensor:
    """Row e = unit(pos[e] − neg[e]), with the mean of all ``pos`` standing in for a missing ``neg[e]``."""
    centre = torch.stack(pos).mean(0)
    return unit_rows(torch.stack([p - (n if n is not None else centre) for p, n in zip(pos, neg)]))


class Random(RouterInit):
    name = "random"

    def weights(self, ctx):
        return torch.randn(ctx.shape, generator=ctx.generator())


class UniformRandom(RouterInit):
    name = "uniform_random"

    def weights(self, ctx):
        scale = math.sqrt(1.0 / ctx.shape[2])
        return torch.rand(ctx.shape, generator=ctx.generator()) * 2 * scale - scale


class Zero(RouterInit):
    name = "zero"

    def weights(self, ctx):
        return torch.zeros(ctx.shape)


class CheapEmbed(RouterInit):
    name = "cheap_embed"

    def weights(self, ctx):
        from evomerge.checkpoint import ModelReader

        with ModelReader(ctx.base_model) as reader:
            embed = reader.get_tensor("model.embed_tokens.weight").float()

        def summed(texts):
            enc = encode_like_mergekit(ctx.tokenizer, texts)
            ids = enc["input_ids"][enc["attention_mask"].bool()]
            return unit_rows(embed[ids].sum(0))

        rows = [summed(p.positive) - (summed(p.negative) if p.negative else 0) for p in ctx.prompts]
        return unit_rows(torch.stack(rows)).unsqueeze(0).expand(ctx.shape).clone()


class Hidden(RouterInit):
    name = "hidden"

    def weights(self, ctx):
        from transformers import AutoModelForCausalLM

        dtype = torch.float32 if ctx.float32_activations else ctx.moe.dtype
        base = AutoModelForCausalLM.from_pretrained(ctx.base_model, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=False).eval()

        def mean(texts):
            return last_token_residuals(base, encode(ctx.tokenizer, texts, ctx.max_length)).mean(1)

        rows = [mean(p.positive) - (mean(p.negative) if p.negative else 0) for p in ctx.prompts]
        return unit_rows(torch.stack(rows, dim=1))


def fit_layer_by_layer(ctx: GateContext, fit: Callable[[list[torch.Tensor], list[torch.Tensor | None]], torch.Tensor]
                       ) -> torch.Tensor:
    """For each layer in order: capture every expert's positive (and negative) router inputs in the MoE
    (earlier routers already set), fit that layer's (experts, hidden) router with ``fit(pos, neg)``, set it."""
    probe = ctx.moe.model
    if ctx.float32_activations and ctx.moe.dtype != torch.float32:
        probe = copy.deepcopy(ctx.moe.model).float()
    blocks = [layer.mlp for layer in probe.model.layers]
    pos_enc = [encode(ctx.tokenizer, p.positive, ctx.max_length) for p in ctx.prompts]
    neg_enc = [encode(ctx.tokenizer, p.negative, ctx.max_length) if p.negative else None for p in ctx.prompts]
    out = []
    for block in blocks:
        pos = [block_inputs(probe, block, e) for e in pos_enc]
        neg = [block_inputs(probe, block, e) if e is not None else None for e in neg_enc]
        w = fit(pos, neg)
        with torch.no_grad():
            block.gate.weight.copy_(w.to(block.gate.weight.dtype))
        out.append(w)
    return torch.stack(out)


class MergekitHidden(RouterInit):
    """mergekit-moe 0.1.5's ``hidden_last`` / ``hidden_avg`` reproduced as they are (parity modes): base model
    in bfloat16, mergekit's tokenisation, padding included, positive minus negative, unit rows."""

    average: ClassVar[bool]

    def weights(self, ctx):
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(ctx.base_model, dtype=torch.bfloat16, use_safetensors=True,
                                                    trust_remote_code=False).eval()

        def stats(texts):
            return residuals_like_mergekit(base, encode_like_mergekit(ctx.tokenizer, texts), self.average)

        rows = [stats(p.positive) - stats(p.negative) if p.negative else stats(p.positive) for p in ctx.prompts]
        return unit_rows(torch.stack(rows, dim=1)).float()


class HiddenLast(MergekitHidden):
    name, average = "hidden_last", False


class HiddenAvg(MergekitHidden):
    name, average = "hidden_avg", True


class RouterInputMean(RouterInit):
    name = "router_input_mean"

    def weights(self, ctx):
        return fit_layer_by_layer(ctx, lambda pos, neg: contrast([p.mean(0) for p in pos],
                                                                 [n.mean(0) if n is not None else None for n in neg]))


def whitened(rows: torch.Tensor, pos: list[torch.Tensor]) -> torch.Tensor:
    """Fisher's linear discriminant (LDA) from contrast rows: unit(Σ⁻¹ row) per row, Σ the pooled within-expert
    covariance of the positive tokens (each minus its expert's mean) plus a ridge of ``LDA_RIDGE`` times its
    mean variance. Directions that vary a lot inside every expert's tokens count less than the raw mean
    difference says."""
    within = torch.cat([p - p.mean(0) for p in pos])
    cov = within.T @ within / max(len(within), 1)
    cov = cov + LDA_RIDGE * cov.diagonal().mean().clamp(min=1e-8) * torch.eye(cov.shape[0])
    return unit_rows(torch.linalg.solve(cov, rows.T).T)


class RouterInputLda(RouterInit):
    name = "router_input_lda"

    def weights(self, ctx):
        return fit_layer_by_layer(ctx, lambda pos, neg: whitened(
            contrast([p.mean(0) for p in pos], [n.mean(0) if n is not None else None for n in neg]), pos))


def logistic_router(features: list[torch.Tensor], seed: int) -> torch.Tensor:
    """(experts, hidden) weights of a bias-free multinomial logistic regression separating the feature sets
    (class e = features[e]); classes weighted equally, L2 penalty ``SUPERVISED_L2``, L-BFGS."""
    x = torch.cat(features)
    y = torch.cat([torch.full((len(f),), e) for e, f in enumerate(features)])
    weight = torch.tensor([1.0 / len(f) for f in features]) / len(features)
    scale = x.norm(dim=1).mean().clamp(min=1e-8)  # fit on unit-scale inputs, well conditioned
    torch.manual_seed(seed)
    w = torch.zeros(len(features), x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=SUPERVISED_ITERS, line_search_fn="strong_wolfe")

    def loss_fn():
        opt.zero_grad()
        logits = (x / scale) @ w.T
        loss = (torch.nn.functional.cross_entropy(logits, y, reduction="none") * weight[y]).sum()
        loss = loss + SUPERVISED_L2 * w.pow(2).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(loss_fn)
    return w.detach() / scale


class Supervised(RouterInit):
    name = "supervised"

    def weights(self, ctx):
        return fit_layer_by_layer(ctx, lambda pos, neg: logistic_router(pos, ctx.seed))


GATES: dict[str, type[RouterInit]] = {c.name: c for c in (Random, UniformRandom, Zero, CheapEmbed, Hidden, HiddenLast,
                                                           HiddenAvg, RouterInputMean, RouterInputLda, Supervised)}


def router_init(name: str) -> RouterInit:
    """The router initialisation called ``name`` (a ``gate_mode``)."""
    if name not in GATES:
        raise ValueError(f"unknown gate_mode {name!r}; expected one of {', '.join(GATES)}")
    return GATES[name]()
assert set(GATES) == set(GATE_MODES), "every gate_mode in config.GATE_MODES needs exactly one RouterInit"
