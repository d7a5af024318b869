"""The candidate builder of ``kind: moe`` search spaces: one MoE resident, rewritten per candidate.

Built once (``moe.assemble``): every expert's MLPs as the routed experts, the base's non-expert weights,
the base's and each expert's non-expert tensors kept in float32 (``moe.search.non_expert_deltas``). A
candidate (``moe.space.MoeCandidate``) then only rewrites what it chooses, in this order, as
``evomerge moe`` builds the same config from scratch:

1. the non-expert weights: base + Σ w_i (expert_i − base) (``moe.search.set_non_expert``; this also
   restores norms a previous candidate's training changed);
2. experts per token (the config and every router's ``top_k``);
3. the routers, by the candidate's ``gate_mode`` (``moe.gates``). Router weights are cached per
   initialisation: data-free modes and those that read only the base (``cheap_embed``, ``hidden*``) once
   each; those fitted on the MoE's own router inputs (``MODEL_DEPENDENT_MODES``) per non-expert weights and
   experts per token;
4. optional router training (``moe.train.train_routers``, ``train_steps`` steps).

The MoE lives on the CPU whatever the run's ``device`` (router fitting and training run there).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from evomerge.checkpoint import ModelReader
from evomerge.engine import all_finite
from evomerge.moe.build import MoeBuild, load_tokenizer
from evomerge.moe.config import MoeConfig
from evomerge.moe.gates import GateContext, router_init
from evomerge.moe.search import non_expert_deltas, set_non_expert
from evomerge.search.builder import DTYPES, BuildStats

MODEL_DEPENDENT_MODES = ("router_input_mean", "router_input_lda", "supervised")  # fitted on the MoE's own router inputs


class MoeSpaceBuilder:
    """Builds MoE candidates over one resident MoE (see the module docstring)."""

    def __init__(self, template: MoeConfig, expert_names: list[str], *, device="auto"):
        """``template``: the ``evomerge moe`` config every candidate shares (experts, prompts, dtype, training
        options); ``expert_names``: the run's names of its experts, in order."""
        from evomerge.moe.assemble import assemble
        from evomerge.moe.config import check_models
        from evomerge.moe.prompts import expert_prompts

        self.device = torch.device("cpu")
        self.template = template
        self.expert_names = list(expert_names)
        arch, base_config = check_models(template)
        tokenizer = load_tokenizer(template.base_model)
        self.built = MoeBuild(moe=assemble(template, arch, base_config), tokenizer=tokenizer, config=template,
                              prompts=expert_prompts(template), report={})
        self.moe = self.built.moe
        self.dtype = self.moe.dtype
        self.base_weights, self.deltas = non_expert_deltas(self.built)
        self.ctx = GateContext(moe=self.moe, tokenizer=tokenizer, prompts=self.built.prompts, seed=template.seed,
                               max_length=template.max_length, base_model=template.base_model,
                               float32_activations=template.activations == "float32")
        self.routers: dict[tuple, torch.Tensor] = {}
        self.model: torch.nn.Module = self.moe.model
        self.num_layers = len(self.moe.blocks())
        # headers of base and experts: what the method baselines' merges plan over (``params``)
        self.readers = {p: ModelReader(p) for p in (template.base_model, *(e.source_model for e in template.experts))}
        self.dense: dict[str, torch.nn.Module] = {}  # whole models made live by ``load_model_weights``
        self.tokenizer_dir = Path(template.base_model)
        self.training: dict | None = None  # the live candidate's router training (``TrainingReport``)

    def precompute(self) -> float:
        """Nothing beyond assembly (done in ``__init__``)."""
        return 0.0

    def weights_of(self, candidate) -> list[float]:
        """The candidate's non-expert weight of each expert, in expert order."""
        return [float(candidate.non_expert_weights.get(m, 0.0)) for m in self.expert_names]

    def build(self, candidate) -> BuildStats:
        """Make ``candidate``'s MoE the live ``self.model``."""
        t0 = time.perf_counter()
        weights = self.weights_of(candidate)
        set_non_expert(self.built, self.base_weights, self.deltas, weights)
        k = candidate.experts_per_token
        self.moe.model.config.num_experts_per_tok = k
        for block in self.moe.blocks():
            block.gate.top_k = k
        t1 = time.perf_counter()
        key = (candidate.gate_mode, k, tuple(weights)) if candidate.gate_mode in MODEL_DEPENDENT_MODES \
            else (candidate.gate_mode,)
        cached = key in self.routers
        if not cached:
            self.routers[key] = router_init(candidate.gate_mode).weights(self.ctx)
        self.moe.set_router_weights(self.routers[key])
        t2 = time.perf_counter()
        if candidate.train_steps:
            from evomerge.moe.train import train_routers

            train = self.template.train.model_copy(update={"steps": candidate.train_steps})
            self.training = train_routers(self.moe, self.built.tokenizer, self.built.prompts, train, experts_per_token=k,
                          seed=self.template.seed, max_length=self.template.max_length).to_dict()
        else:
            self.training = None
        self.model = self.moe.model
        return BuildStats(plan=0.0, merge=time.perf_counter() - t0, tensors=len(self.base_weights),
                          extra={"non_expert_s": t1 - t0, "routers_s": t2 - t1, "routers_cached": cached,
                                 "train_s": time.perf_counter() - t2})

    def load_model_weights(self, path: str | None) -> None:
        """Make a whole dense model live: the base (None) or any model directory (loaded once)."""
        from transformers import AutoModelForCausalLM

        path = self.template.base_model if path is None else str(path)
        if path not in self.dense:
            self.dense[path] = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES.get(
                str(self.dtype).removeprefix("torch."), torch.float32)).eval()
        self.model = self.dense[path]

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        """The parameters of a scratch dense model (the base's architecture) into which
        ``search.baselines.build_into`` merges the dense method baselines; that model becomes the live one."""
        self.load_model_weights(self.template.base_model)
        if "scratch" not in self.dense:
            import copy

            self.dense["scratch"] = copy.deepcopy(self.model)
        self.model = self.dense["scratch"]
        return dict(self.model.named_parameters())

    def nonfinite_tensor(self) -> str | None:
        """The first router or non-expert tensor of the live MoE holding NaN or infinity, else None."""
        for name, tensor in self.moe.model.named_parameters():
            if (".gate." in name or ".mlp." not in name) and not all_finite(tensor.detach()):
                return name
        return None

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.dense.clear()
        self.routers.clear()
        self.model = None
