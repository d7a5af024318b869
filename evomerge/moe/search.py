"""Searching MoE options with Optuna over one MoE built once: each trial rewrites the non-expert weights
(task arithmetic over the experts' attention, norms and embeddings: base + Σ w_i (expert_i − base)), sets
experts per token, re-initialises the routers (data-driven modes capture activations of the trial's own
model) and optionally trains them, then scores the model on the search split (smooth proxy metrics, as a
merge search does). The first trial is the config's own setting (non-expert weights all 0: the base).
The ``rerank`` best trials are re-scored on the validation split and the best there wins, as in
``evomerge search``; it is left in the model and its parameters returned."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from evomerge.checkpoint import ModelReader
from evomerge.moe.build import MoeBuild
from evomerge.moe.gates import GateContext, router_init
from evomerge.moe.train import train_routers


@dataclass
class MoeTrial:
    """One trial's settings, score and time."""

    number: int
    params: dict
    score: float
    seconds: float
    validation: float | None = None  # the finalists' score on the validation split


def non_expert_deltas(built: MoeBuild) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The base's non-expert tensors and each expert's difference to them (float32), keyed by MoE name."""
    names = [n for n in built.moe.model.state_dict() if ".mlp." not in n]
    base, deltas = {}, []
    with ModelReader(built.config.base_model) as r:
        for n in names:
            base[n] = r.get_tensor(r.resolve_tied(n), dtype=torch.float32)
    for e in built.config.experts:
        with ModelReader(e.source_model) as r:
            deltas.append({n: r.get_tensor(r.resolve_tied(n), dtype=torch.float32) - base[n] for n in names})
    return base, deltas


@torch.no_grad()
def set_non_expert(built: MoeBuild, base: dict, deltas: list[dict], weights: list[float]) -> None:
    """Write base + Σ w_i δ_i into the model's non-expert tensors."""
    state = built.moe.model.state_dict()
    for n, b in base.items():
        state[n].copy_((b + sum(w * d[n] for w, d in zip(weights, deltas) if w)).to(state[n].dtype))


def non_expert_recipe(built: MoeBuild, weights: list[float]) -> dict:
    """The evomerge (mergekit) task-arithmetic recipe of the non-expert weights ``weights``."""
    return {"merge_method": "task_arithmetic", "base_model": built.config.base_model,
            "dtype": str(built.moe.dtype).removeprefix("torch."),
            "models": [{"model": e.source_model, "parameters": {"weight": float(w)}}
                       for e, w in zip(built.config.experts, weights)]}


def search_moe(built: MoeBuild, *, log: Callable[[str], None] = lambda m: None) -> tuple[list[MoeTrial], dict]:
    """Run ``built.config.search``; returns the trials and the winner's params, applied to the model."""
    import optuna

    from evomerge.evaluate import Evaluator

    cfg, sc = built.config, built.config.search
    n = len(cfg.experts)
    evaluator = Evaluator(sc.tasks, built.tokenizer, split="search", batch_size=sc.batch_size,
                          bootstrap_iters=0, seed=cfg.seed, proxy=True)
    base, deltas = non_expert_deltas(built)
    ctx = GateContext(moe=built.moe, tokenizer=built.tokenizer, prompts=built.prompts, seed=cfg.seed,
                      max_length=cfg.max_length, base_model=cfg.base_model,
                      float32_activations=cfg.activations == "float32")
    norms = {k: v.detach().clone() for k, v in built.moe.model.named_parameters() if "norm" in k}

    def apply(params: dict) -> None:
        weights = [params.get(f"w{i}", 0.0) for i in range(n)]
        set_non_expert(built, base, deltas, weights)
        built.moe.model.config.num_experts_per_tok = params["experts_per_token"]
        for block in built.moe.blocks():
            block.gate.top_k = params["experts_per_token"]
        built.moe.set_router_weights(router_init(params["gate_mode"]).weights(ctx))
        if params["train_steps"]:
            train = cfg.train.model_copy(update={"steps": params["train_steps"]})
            train_routers(built.moe, built.tokenizer, built.prompts, train, experts_per_token=params["experts_per_token"],
                          seed=cfg.seed, max_length=cfg.max_length)

    def suggest(trial) -> dict:
        params = {"gate_mode": trial.suggest_categorical("gate_mode", sc.gate_modes),
                  "experts_per_token": trial.suggest_categorical("experts_per_token", sc.experts_per_token),
                  "train_steps": trial.suggest_categorical("train_steps", sc.train_steps)}
        if sc.non_expert_weights:
            params.update({f"w{i}": trial.suggest_float(f"w{i}", 0.0, 1.0) for i in range(n)})
        return params

    sampler = (optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=min(8, sc.trials))
               if sc.sampler == "tpe" else optuna.samplers.RandomSampler(seed=cfg.seed))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    first = {"gate_mode": cfg.gate_mode if cfg.gate_mode in sc.gate_modes else sc.gate_modes[0],
             "experts_per_token": cfg.experts_per_token if cfg.experts_per_token in sc.experts_per_token
             else sc.experts_per_token[0],
             "train_steps": cfg.train.steps if cfg.train.steps in sc.train_steps else sc.train_steps[0]}
    if sc.non_expert_weights:
        first.update({f"w{i}": 0.0 for i in range(n)})
    study.enqueue_trial(first)
    def restore_norms() -> None:
        with torch.no_grad():
            for k, v in built.moe.model.named_parameters():
                if k in norms:
                    v.copy_(norms[k])

    trials = []
    for _ in range(sc.trials):
        trial = study.ask()
        params = suggest(trial)
        t0 = time.perf_counter()
        restore_norms()
        apply(params)
        score = evaluator.evaluate(built.moe.model).aggregate
        study.tell(trial, score)
        trials.append(MoeTrial(trial.number, params, score, time.perf_counter() - t0))
        log(f"  trial {trial.number:>3}  {score:.4f}  " + ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()))
    finalists = sorted(trials, key=lambda t: -t.score)[:sc.rerank]
    if sc.rerank > 1 and any(spec.has_split("validation") for spec in evaluator.specs if hasattr(spec, "has_split")):
        validation = Evaluator(sc.tasks, built.tokenizer, split="validation", batch_size=sc.batch_size,
                               bootstrap_iters=0, seed=cfg.seed, proxy=True)
        for t in finalists:
            restore_norms()
            apply(t.params)
            t.validation = validation.evaluate(built.moe.model).aggregate
            log(f"  re-rank trial {t.number:>3} on validation: {t.validation:.4f}")
        best = max(finalists, key=lambda t: t.validation)
    else:
        best = finalists[0]
    restore_norms()
    apply(best.params)
    return trials, best.params
