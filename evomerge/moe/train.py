"""Short router training: every weight frozen but the routers (optionally the norms), a few steps of the
LM loss on the experts' prompts mixed, plus a load-balancing loss and an optional supervised routing loss.

Why top-k >= 2 (or soft routing) while training: Mixtral (and Qwen2-MoE with ``norm_topk_prob``)
renormalises the top-k softmax weights, so with k = 1 the one selected expert's weight is exactly 1 and
the LM loss does not depend on the router's logits at all; the top-k choice itself is not differentiable.
The router would get no gradient and training would silently do nothing. With k >= 2 the mixture weights
of the chosen experts depend on the logits; with ``soft`` every expert contributes by its softmax weight.
The MoE keeps its own ``experts_per_token`` for inference.

Load balancing follows Switch Transformer (Fedus et al., 2021): E · Σ_e f_e · P_e per layer, f_e the share
of tokens whose top-k includes e (divided by k), P_e the mean router probability; padding excluded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from evomerge.moe.activations import encode
from evomerge.moe.assemble import MoeModel
from evomerge.moe.config import RouterTraining
from evomerge.moe.prompts import ExpertPrompts


@dataclass
class TrainingReport:
    """What a router training run did."""

    steps: int
    top_k: int
    seconds: float
    trained_parameters: int
    loss_before: float
    loss_after: float

    def to_dict(self) -> dict:
        return asdict(self)


def training_top_k(cfg: RouterTraining, experts_per_token: int, num_experts: int,
                   log: Callable[[str], None]) -> int:
    """Experts per token while training: all of them if ``soft``, else ``top_k`` or max(2, experts_per_token)."""
    if cfg.soft:
        return num_experts
    if cfg.top_k is None and experts_per_token == 1:
        log("router training: top-1 routing with renormalised weights gives the router no gradient; "
            "training with top-2 (inference keeps top-1)")
    return cfg.top_k or max(2, experts_per_token)


def balance_loss(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss of one layer's router logits (tokens, experts)."""
    probs = logits.float().softmax(-1)
    chosen = torch.zeros_like(probs).scatter_(1, probs.topk(k, dim=-1).indices, 1.0)
    return probs.shape[1] * (chosen.mean(0) / k * probs.mean(0)).sum()


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens."""
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    return model(**batch, labels=labels).loss


@torch.no_grad()
def calibration_loss(model, enc: dict[str, torch.Tensor], batch_size: int) -> float:
    """Token-weighted LM loss over the whole calibration set."""
    total, count = 0.0, 0
    for i in range(0, len(enc["input_ids"]), batch_size):
        batch = {k: v[i:i + batch_size] for k, v in enc.items()}
        n = int(batch["attention_mask"][:, 1:].sum())
        total += lm_loss(model, batch).item() * n
        count += n
    return total / max(count, 1)


def train_routers(moe: MoeModel, tokenizer, prompts: list[ExpertPrompts], cfg: RouterTraining, *,
                  experts_per_token: int, seed: int, max_length: int,
                  log: Callable[[str], None] = lambda m: None) -> TrainingReport:
    """Train the routers of ``moe`` in place (see the module docstring); the model ends in eval mode."""
    model, blocks = moe.model, moe.blocks()
    texts = [t for p in prompts for t in p.positive]
    labels = [e for e, p in enumerate(prompts) for _ in p.positive]
    enc = encode(tokenizer, texts, max_length)
    k = training_top_k(cfg, experts_per_token, moe.num_experts, log)
    trainable = [b.gate.weight for b in blocks]
    if cfg.norms:
        trainable += [p for n, p in model.named_parameters() if "norm" in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    before = calibration_loss(model, enc, cfg.batch_size)
    captured: list[torch.Tensor] = []
    hooks = [b.gate.register_forward_hook(lambda _m, _a, out: captured.append(out[0])) for b in blocks]
    old_k = [b.gate.top_k for b in blocks]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    source = torch.tensor(labels)
    t0 = time.perf_counter()
    try:
        for b in blocks:
            b.gate.top_k = k
        for _ in range(cfg.steps):
            idx = torch.randint(len(texts), (min(cfg.batch_size, len(texts)),), generator=gen)
            batch = {key: v[idx] for key, v in enc.items()}
            mask = batch["attention_mask"].bool().reshape(-1)
            captured.clear()
            loss = lm_loss(model, batch)
            token_source = source[idx][:, None].expand_as(batch["attention_mask"]).reshape(-1)[mask]
            for logits in captured:
                real = logits[mask]
                loss = loss + cfg.balance * balance_loss(real, k) / len(blocks)
                if cfg.supervised:
                    loss = loss + cfg.supervised * torch.nn.functional.cross_entropy(real.float(), token_source) / len(blocks)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for h in hooks:
            h.remove()
        for b, old in zip(blocks, old_k):
            b.gate.top_k = old
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    seconds = time.perf_counter() - t0
    after = calibration_loss(model, enc, cfg.batch_size)
    report = TrainingReport(steps=cfg.steps, top_k=k, seconds=seconds,
                            trained_parameters=sum(p.numel() for p in trainable), loss_before=before, loss_after=after)
    log(f"router training: {cfg.steps} steps (top-{k}) in {seconds:.1f}s, {report.trained_parameters} parameters, "
        f"calibration loss {before:.4f} -> {after:.4f}")
    return report
