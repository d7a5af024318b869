"""Assembling the MoE model in memory from dense models (transformers' own Mixtral / Qwen2-MoE / Qwen3-MoE
classes).

Each layer's MLP of expert e becomes routed expert e of that layer (``gate_up_proj[e]`` = gate rows then
up rows, ``down_proj[e]`` = down); attention, norms, embeddings and lm_head ("non-expert" weights) come
from the base (mergekit's behaviour), are the experts' element-wise average, or come from a dense
evomerge recipe merged first (e.g. TIES over the experts). Routers start at zero (uniform routing) until a
router initialisation writes them. A Qwen2-MoE built without a shared expert gets a width-1 shared expert
of zeros (it adds nothing); with one (a model directory or a dense recipe: a merged MLP), the shared
expert's sigmoid gate starts at zero, i.e. a constant factor 1/2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.checkpoint import ModelReader
from evomerge.moe.config import MoeConfig, is_recipe

# dense config keys carried over unchanged to the MoE config
CARRIED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                "tie_word_embeddings", "initializer_range", "attention_dropout", "pad_token_id", "bos_token_id",
                "eos_token_id", "sliding_window", "use_sliding_window", "max_window_layers")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def moe_config(arch: str, base: dict, num_experts: int, experts_per_token: int, shared: bool, dtype: str):
    """The transformers config of the MoE: the base's shape with one routed expert per dense model."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    carried = {k: base[k] for k in CARRIED_KEYS if k in base and base[k] is not None}
    if arch == "mixtral":
        return MixtralConfig(**carried, intermediate_size=base["intermediate_size"], num_local_experts=num_experts,
                             num_experts_per_tok=experts_per_token, router_jitter_noise=0.0, dtype=dtype)
    if arch == "qwen3":
        return Qwen3MoeConfig(**carried, moe_intermediate_size=base["intermediate_size"],
                              intermediate_size=base["intermediate_size"], num_experts=num_experts,
                              num_experts_per_tok=experts_per_token, norm_topk_prob=True, decoder_sparse_step=1,
                              mlp_only_layers=[], dtype=dtype)
    return Qwen2MoeConfig(**carried, moe_intermediate_size=base["intermediate_size"],
                          intermediate_size=base["intermediate_size"],
                          shared_expert_intermediate_size=base["intermediate_size"] if shared else 1,
                          num_experts=num_experts, num_experts_per_tok=experts_per_token, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], dtype=dtype)


@dataclass
class MoeModel:
    """A live MoE model and what it was built from."""

    model: torch.nn.Module
    arch: str
    num_experts: int
    dtype: torch.dtype

    def blocks(self) -> list[torch.nn.Module]:
        """The sparse MoE block of every layer (``.gate`` is its router, ``.gate.weight`` (E, H))."""
        return [layer.mlp for layer in self.model.model.layers]

    def router_weights(self) -> torch.Tensor:
        """Every layer's router weight as one (L, E, H) tensor (a copy)."""
        return torch.stack([b.gate.weight.detach().clone() for b in self.blocks()])

    @torch.no_grad()
    def set_router_weights(self, weights: torch.Tensor) -> None:
        """Write (L, E, H) router weights into the model (cast to its dtype)."""
        for block, w in zip(self.blocks(), weights):
            block.gate.weight.copy_(w.to(block.gate.weight.dtype))


def dense_mlp_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def non_expert_tensor(name: str, readers: list[ModelReader], dtype: torch.dtype) -> torch.Tensor:
    """The tensor ``name`` of the one reader given, or the float32 mean over several, cast to ``dtype``."""
    if len(readers) == 1:
        return readers[0].get_tensor(readers[0].resolve_tied(name), dtype=dtype)
    total = sum(r.get_tensor(r.resolve_tied(name), dtype=torch.float32) for r in readers)
    return (total / len(readers)).to(dtype)


def dense_merge(recipe: str, seed: int):
    """Run an evomerge dense recipe file to file into ``TMP/merged`` of a temporary directory TMP (removed by
    its ``.cleanup()``)."""
    import tempfile

    from evomerge.engine import run_merge

    tmp = tempfile.TemporaryDirectory(prefix="evomerge-moe-nonexpert-")
    run_merge(recipe, Path(tmp.name) / "merged", seed=seed, where=f"non_expert ({recipe})")
    return tmp


def assemble(cfg: MoeConfig, arch: str, base_config: dict) -> MoeModel:
    """Build the MoE in memory (routers at zero), reading base, experts and shared expert tensor by tensor."""
    from transformers import AutoModelForCausalLM

    dtype_name = cfg.dtype or str(base_config.get("dtype") or base_config.get("torch_dtype") or "float32")
    dtype = DTYPES.get(dtype_name, torch.float32)
    n, layers = len(cfg.experts), base_config["num_hidden_layers"]
    shared = bool(cfg.shared_experts)
    mcfg = moe_config(arch, base_config, n, cfg.experts_per_token, shared, dtype_name if dtype_name in DTYPES else "float32")
    torch.manual_seed(cfg.seed)  # from_config's initial weights are all overwritten; seeded anyway
    model = AutoModelForCausalLM.from_config(mcfg, dtype=dtype).eval()  # buffers (rotary) as from_pretrained keeps them
    experts = [ModelReader(e.source_model) for e in cfg.experts]
    base = ModelReader(cfg.base_model)
    merged_dirs = []

    def source(path: str) -> ModelReader:
        if not is_recipe(path):
            return ModelReader(path)
        merged_dirs.append(dense_merge(path, cfg.seed))
        return ModelReader(Path(merged_dirs[-1].name) / "merged")

    shared_reader = source(cfg.shared_experts[0].source_model) if shared else None
    non_expert = {"base": [base], "average": experts}.get(cfg.non_expert) or [source(cfg.non_expert)]
    state, own = {}, model.state_dict()
    try:
        for name in own:
            if ".mlp." not in name:
                state[name] = non_expert_tensor(name, non_expert, dtype)
        for l in range(layers):
            p = f"model.layers.{l}.mlp"
            mlps = [{proj: r.get_tensor(dense_mlp_name(l, proj), dtype=dtype) for proj in MLP_PROJ} for r in experts]
            state[f"{p}.experts.gate_up_proj"] = torch.stack([torch.cat([m["gate_proj"], m["up_proj"]]) for m in mlps])
            state[f"{p}.experts.down_proj"] = torch.stack([m["down_proj"] for m in mlps])
            state[f"{p}.gate.weight"] = torch.zeros(n, base_config["hidden_size"], dtype=dtype)
            if arch == "qwen":
                for proj in MLP_PROJ:
                    key = f"{p}.shared_expert.{proj}.weight"
                    state[key] = (shared_reader.get_tensor(dense_mlp_name(l, proj), dtype=dtype) if shared
                                  else torch.zeros_like(own[key]))
                state[f"{p}.shared_expert_gate.weight"] = torch.zeros_like(own[f"{p}.shared_expert_gate.weight"])
    finally:
        for r in {id(r): r for r in [base, *experts, *non_expert, *([shared_reader] if shared_reader else [])]}.values():
            r.close()
        for tmp in merged_dirs:
            tmp.cleanup()
    model.load_state_dict(state, strict=True)
    if getattr(mcfg, "tie_word_embeddings", False):
        model.tie_weights()
    return MoeModel(model=model, arch=arch, num_experts=n, dtype=dtype)
