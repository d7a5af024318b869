"""The MoE flow: validate the config and models (no weights read), assemble the MoE in memory,
initialise its routers, optionally train them, measure routing, and write it atomically."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from evomerge.moe.assemble import MoeModel, assemble
from evomerge.moe.config import MoeConfig, MoeError, check_models, load_moe_config
from evomerge.moe.gates import GateContext, router_init
from evomerge.moe.prompts import ExpertPrompts, expert_prompts
from evomerge.moe.stats import router_statistics
from evomerge.moe.train import train_routers
from evomerge.moe.write import write_moe


@dataclass
class MoeBuild:
    """An assembled MoE with its tokenizer, config, routing prompts and report (layout, statistics)."""

    moe: MoeModel
    tokenizer: object
    config: MoeConfig
    prompts: list[ExpertPrompts]
    report: dict


def load_tokenizer(path: str):
    """The base model's tokenizer, with a pad token (its eos) if it has none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def assemble_moe(config: MoeConfig | str | Path | dict, *, log: Callable[[str], None] = lambda m: None) -> MoeBuild:
    """Validate, assemble and route: the live MoE and its report (nothing is written)."""
    cfg = config if isinstance(config, MoeConfig) else load_moe_config(config)
    arch, base_config = check_models(cfg)
    prompts = expert_prompts(cfg)
    tokenizer = load_tokenizer(cfg.base_model)
    t0 = time.perf_counter()
    moe = assemble(cfg, arch, base_config)
    log(f"assembled {arch} with {moe.num_experts} experts in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    ctx = GateContext(moe=moe, tokenizer=tokenizer, prompts=prompts, seed=cfg.seed, max_length=cfg.max_length,
                      base_model=cfg.base_model, float32_activations=cfg.activations == "float32")
    moe.set_router_weights(router_init(cfg.gate_mode).weights(ctx))
    log(f"routers initialised ({cfg.gate_mode}) in {time.perf_counter() - t0:.1f}s")
    has_prompts = all(p.positive for p in prompts)
    training = None
    if cfg.train.steps:
        training = train_routers(moe, tokenizer, prompts, cfg.train, experts_per_token=cfg.experts_per_token,
                                 seed=cfg.seed, max_length=cfg.max_length, log=log).to_dict()
    report = {
        "architecture": arch, "base_model": cfg.base_model, "non_expert": cfg.non_expert,
        "experts": [e.source_model for e in cfg.experts],
        "shared_expert": cfg.shared_experts[0].source_model if cfg.shared_experts else None,
        "gate_mode": cfg.gate_mode, "experts_per_token": cfg.experts_per_token, "seed": cfg.seed,
        "dtype": str(moe.dtype).removeprefix("torch."), "training": training,
        "router_statistics": router_statistics(moe, tokenizer, prompts, cfg.max_length) if has_prompts else [],
    }
    return MoeBuild(moe=moe, tokenizer=tokenizer, config=cfg, prompts=prompts, report=report)


def build_moe(config: MoeConfig | str | Path | dict, out_dir: str | Path, *, overwrite: bool = False,
              log: Callable[[str], None] = lambda m: None) -> Path:
    """Assemble the MoE that ``config`` describes and write it to ``out_dir`` (see :mod:`evomerge.moe.write`)."""
    if Path(out_dir).exists() and not overwrite:
        raise MoeError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    built = assemble_moe(config, log=log)
    extra_files = {}
    if built.config.search is not None:
        extra_files = adopt_search_winner(built, log)
    if built.config.evaluate is not None:
        from evomerge.moe.compare import compare_moe, render_comparison

        log(f"scoring on the {built.config.evaluate.split} split:")
        rows = compare_moe(built, log=log)
        built.report["comparison"] = [r.to_dict() for r in rows]
        built.report["comparison_table"] = render_comparison(rows, built.config.evaluate.split)
    return write_moe(built.moe, built.tokenizer, built.config, out_dir, built.report, overwrite=overwrite,
                     extra_files=extra_files)


NON_EXPERT_RECIPE = "non_expert_recipe.yaml"


def adopt_search_winner(built: MoeBuild, log: Callable[[str], None]) -> dict[str, str]:
    """Run the config's search, leave its winner in ``built`` (config, report, statistics) and return the
    files the output needs (the winner's non-expert recipe)."""
    import yaml

    from evomerge.moe.search import non_expert_recipe, search_moe

    cfg = built.config
    log(f"searching {cfg.search.trials} trials on the search split of {cfg.search.tasks}:")
    trials, best = search_moe(built, log=log)
    update = {"gate_mode": best["gate_mode"], "experts_per_token": best["experts_per_token"],
              "train": cfg.train.model_copy(update={"steps": best["train_steps"]}), "search": None}
    files = {}
    if cfg.search.non_expert_weights:
        weights = [best[f"w{i}"] for i in range(len(cfg.experts))]
        files[NON_EXPERT_RECIPE] = yaml.safe_dump(non_expert_recipe(built, weights), sort_keys=False)
        update["non_expert"] = NON_EXPERT_RECIPE
    built.config = cfg.model_copy(update=update)
    built.report.update(gate_mode=best["gate_mode"], experts_per_token=best["experts_per_token"],
                        non_expert=built.config.non_expert, training=None,
                        search={"trials": [t.__dict__ for t in trials], "best": best},
                        router_statistics=router_statistics(built.moe, built.tokenizer, built.prompts,
                                                            cfg.max_length) if built.report["router_statistics"] else [])
    return files
