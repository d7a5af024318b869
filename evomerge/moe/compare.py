"""Scoring an MoE like any merge: the same tasks, split and bootstrap CIs as dense candidates, side by side
with the base, each expert, dense merges (a model directory or a recipe) and the MoE under other router
initialisations (same experts; only the routers are rewritten, then trained again if ``train.steps``).
Each row also gives the active parameters per token and the forward throughput (tokens/s)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.moe.build import MoeBuild
from evomerge.moe.gates import GateContext, router_init
from evomerge.moe.train import train_routers

THROUGHPUT_SHAPE = (8, 64)  # batch, tokens of the throughput forward passes
THROUGHPUT_REPS = 3


@dataclass
class ComparisonRow:
    """One model's scores, size and speed."""

    label: str
    aggregate: float
    ci: tuple[float, float] | None
    per_task: dict[str, float]
    active_parameters: int
    total_parameters: int
    tokens_per_second: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def active_parameters(model: torch.nn.Module) -> int:
    """Parameters a token passes through: all, less the routed experts it is not sent to."""
    total = sum(p.numel() for p in model.parameters())
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            e, k = experts.gate_up_proj.shape[0], layer.mlp.gate.top_k
            total -= (experts.gate_up_proj.numel() + experts.down_proj.numel()) * (e - k) // e
    return total


@torch.no_grad()
def tokens_per_second(model: torch.nn.Module) -> float:
    """Forward-pass throughput on a fixed batch of token ids (one warm-up pass, then timed passes)."""
    batch, length = THROUGHPUT_SHAPE
    length = min(length, model.config.max_position_embeddings)
    ids = torch.arange(batch * length).remainder(model.config.vocab_size).reshape(batch, length)
    model(input_ids=ids)
    t0 = time.perf_counter()
    for _ in range(THROUGHPUT_REPS):
        model(input_ids=ids)
    return batch * length * THROUGHPUT_REPS / (time.perf_counter() - t0)


def load_dense(path: str | dict, seed: int):
    """A dense model from a model directory, or merged from a recipe (YAML file or mapping) in a temporary
    directory."""
    from transformers import AutoModelForCausalLM

    from evomerge.engine import run_merge

    if isinstance(path, str) and Path(path).is_dir():
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False).eval()
    with tempfile.TemporaryDirectory(prefix="evomerge-moe-dense-") as tmp:
        out = run_merge(path, Path(tmp) / "merged", seed=seed)
        return AutoModelForCausalLM.from_pretrained(out, use_safetensors=True, trust_remote_code=False).eval()


def moe_label(mode: str, steps: int) -> str:
    return f"moe {mode}" + (f" + {steps} steps" if steps else "")


def compare_moe(built: MoeBuild, *, log: Callable[[str], None] = lambda m: None) -> list[ComparisonRow]:
    """Score everything ``built.config.evaluate`` asks for; the MoE is left with its own routers."""
    from transformers import AutoModelForCausalLM

    from evomerge.evaluate import Evaluator

    cfg, ev = built.config, built.config.evaluate
    evaluator = Evaluator(ev.tasks, built.tokenizer, split=ev.split, batch_size=ev.batch_size,
                          bootstrap_iters=ev.bootstrap_iters, seed=cfg.seed)
    rows: list[ComparisonRow] = []

    def score(label: str, model) -> None:
        res = evaluator.evaluate(model)
        rows.append(ComparisonRow(label, res.aggregate, res.ci, dict(res.per_task), active_parameters(model),
                                  sum(p.numel() for p in model.parameters()), tokens_per_second(model)))
        log(f"  {label:<32} {res.aggregate:.3f}")

    if ev.inputs:
        score("base", AutoModelForCausalLM.from_pretrained(cfg.base_model, trust_remote_code=False).eval())
        for i, e in enumerate(cfg.experts):
            score(f"expert {i} ({Path(e.source_model).name})",
                  AutoModelForCausalLM.from_pretrained(e.source_model, trust_remote_code=False).eval())
    for label, path in ev.dense.items():
        score(label, load_dense(path, cfg.seed))
    score(moe_label(cfg.gate_mode, cfg.train.steps), built.moe.model)
    own = {n: p.detach().clone() for n, p in built.moe.model.named_parameters()
           if n.endswith("mlp.gate.weight") or "norm" in n}  # what router init and training change
    ctx = GateContext(moe=built.moe, tokenizer=built.tokenizer, prompts=built.prompts, seed=cfg.seed,
                      max_length=cfg.max_length, base_model=cfg.base_model,
                      float32_activations=cfg.activations == "float32")
    try:
        for mode in ev.gate_modes:
            with torch.no_grad():
                for n, p in built.moe.model.named_parameters():
                    if n in own:
                        p.copy_(own[n])
            built.moe.set_router_weights(router_init(mode).weights(ctx))
            if cfg.train.steps:
                train_routers(built.moe, built.tokenizer, built.prompts, cfg.train, experts_per_token=cfg.experts_per_token,
                              seed=cfg.seed, max_length=cfg.max_length)
            score(moe_label(mode, cfg.train.steps), built.moe.model)
    finally:
        with torch.no_grad():
            for n, p in built.moe.model.named_parameters():
                if n in own:
                    p.copy_(own[n])
    return rows


def render_comparison(rows: list[ComparisonRow], split: str) -> str:
    """A markdown table of the rows: per-task scores, aggregate with its 95% CI, active parameters, tokens/s."""
    tasks = list(rows[0].per_task) if rows else []
    lines = [f"| model ({split} split) | " + " | ".join(tasks) + " | mean [95% CI] | active params | tokens/s |",
             "|---|" + "---:|" * (len(tasks) + 3)]
    for r in rows:
        ci = f" [{r.ci[0]:.3f}, {r.ci[1]:.3f}]" if r.ci else ""
        lines.append(f"| {r.label} | " + " | ".join(f"{r.per_task[t]:.3f}" for t in tasks)
                     + f" | {r.aggregate:.3f}{ci} | {r.active_parameters:,} | {r.tokens_per_second:,.0f} |")
    return "\n".join(lines) + "\n"
