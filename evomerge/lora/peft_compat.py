"""PEFT compatibility mode: ``merge_method: peft`` runs the installed PEFT's ``add_weighted_adapter``.

For users who need PEFT's result exactly (to reproduce a published merge, or compare with it): the
recipe's adapters are loaded onto the base in one ``PeftModel``, the torch generator is seeded with the
recipe's ``seed`` (DARE's random masks draw from it), and PEFT's ``add_weighted_adapter`` merges them with
the recipe's ``combination_type`` and options; the merged adapter is written as PEFT writes it. The
output is therefore bit for bit what the installed PEFT makes (test, all eleven types).

These are approximations of Σ wᵢ·ΔWᵢ, not evomerge's delta-level merges (docs/adapters.md): ``linear``,
``ties``, ``dare_*`` and ``magnitude_prune`` combine the factors A and B separately (cross terms Bᵢ·Aⱼ;
PEFT's TIES elects signs on unweighted factors), the ``*_svd`` types truncate a dense merge to ``svd_rank``
without reporting what is lost, and the merged adapter copies the first adapter's config. Only ``cat``
is exact. Use another ``merge_method`` for evomerge's own semantics.

Recipe::

    merge_method: peft
    base_model: ./base
    parameters: {combination_type: ties, density: 0.5}   # and svd_rank, svd_clamp, majority_sign_method, ...
    seed: 0
    models:
      - {model: ./adapters/rev, parameters: {weight: 1.0}}
      - {model: ./adapters/map, parameters: {weight: 0.7}}
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.checkpoint import staged
from evomerge.lora.adapter import ADAPTER_CONFIG, AdapterError, is_adapter_dir
from evomerge.lora.write import check_output

COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                     "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
NEEDS_DENSITY = tuple(t for t in COMBINATION_TYPES if t.startswith(("ties", "dare", "magnitude")))
SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")  # PEFT concatenates nothing here
MERGED_NAME = "merged"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PeftWeight(_Strict):
    weight: float = 1.0

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"weight must be a finite number, got {v}")
        return v


class PeftInput(_Strict):
    model: str
    parameters: PeftWeight = Field(default_factory=PeftWeight)


class PeftOptions(_Strict):
    """``add_weighted_adapter``'s options (PEFT's names and defaults)."""

    combination_type: Literal[COMBINATION_TYPES] = "svd"  # type: ignore[valid-type]
    svd_rank: int | None = Field(None, ge=1)
    svd_clamp: int | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    density: float | None = Field(None, gt=0, le=1)
    majority_sign_method: Literal["total", "frequency"] = "total"


class PeftRecipe(_Strict):
    merge_method: Literal["peft"]
    base_model: str
    models: list[PeftInput] = Field(min_length=1)
    parameters: PeftOptions = Field(default_factory=PeftOptions)
    seed: int = 0
    name: str | None = None

    @model_validator(mode="after")
    def _check(self):
        kind = self.parameters.combination_type
        if kind in NEEDS_DENSITY and self.parameters.density is None:
            raise ValueError(f"combination_type {kind} needs parameters.density in (0, 1]")
        paths = [m.model for m in self.models]
        dup = sorted({p for p in paths if paths.count(p) > 1})
        if dup:
            raise ValueError(f"adapter {dup[0]} is listed twice")
        return self


def is_peft_recipe(data: Any) -> bool:
    """Whether a parsed recipe asks for the PEFT compatibility mode."""
    return isinstance(data, dict) and data.get("merge_method") == "peft"


def load_peft_recipe(data: dict[str, Any], where: str, root: Path | None = None) -> PeftRecipe:
    """The checked recipe, paths made absolute against ``root``; AdapterError naming ``where`` and the problem.

    Checks, before any weight is read: every model is an adapter directory, and the types that combine
    factors entry by entry get adapters of one rank."""
    from evomerge.recipe import pydantic_message

    try:
        recipe = PeftRecipe.model_validate(data)
    except ValidationError as e:
        raise AdapterError(pydantic_message(e, where)) from None

    def absolute(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() or root is None else (root / q).resolve())

    recipe.base_model = absolute(recipe.base_model)
    ranks = {}
    for m in recipe.models:
        m.model = absolute(m.model)
        if not is_adapter_dir(m.model):
            raise AdapterError(f"{where}: model {m.model} is not a LoRA adapter directory "
                               f"({ADAPTER_CONFIG} + adapter_model.safetensors)")
        config = json.loads((Path(m.model) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        ranks[m.model] = (config.get("r"), json.dumps(config.get("rank_pattern") or {}, sort_keys=True))
    if recipe.parameters.combination_type in SAME_RANK and len(set(ranks.values())) > 1:
        raise AdapterError(f"{where}: combination_type {recipe.parameters.combination_type} needs adapters of one "
                           f"rank; ranks: " + ", ".join(f"{p}: {r[0]}" for p, r in ranks.items()))
    return recipe


def peft_merged_model(recipe: PeftRecipe):
    """The base as a ``PeftModel`` with the recipe's adapters and PEFT's merge of them (adapter ``merged``) active."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = [f"adapter{i}" for i in range(len(recipe.models))]
    base = AutoModelForCausalLM.from_pretrained(recipe.base_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, recipe.models[0].model, adapter_name=names[0])
    for name, m in zip(names[1:], recipe.models[1:]):
        model.load_adapter(m.model, adapter_name=name)
    options = recipe.parameters.model_dump()
    kind = options.pop("combination_type")
    torch.manual_seed(recipe.seed)
    model.add_weighted_adapter(names, [m.parameters.weight for m in recipe.models], MERGED_NAME,
                               combination_type=kind, **options)
    model.set_adapter(MERGED_NAME)
    return model.eval()


def peft_merge(recipe: PeftRecipe, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write PEFT's merged adapter of ``recipe`` to ``out_dir`` (atomically); returns the directory."""
    out = check_output(out_dir, overwrite)
    model = peft_merged_model(recipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out) as tmp:
        model.save_pretrained(tmp / "peft", selected_adapters=[MERGED_NAME])
        for f in (tmp / "peft" / MERGED_NAME).iterdir():
            f.rename(tmp / f.name)
        shutil.rmtree(tmp / "peft")
    return out
