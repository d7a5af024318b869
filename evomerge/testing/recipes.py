"""Recipes that tests, the golden hashes (``benchmarks/golden.py``) and ``benchmarks/gpu_check.py`` share.

``variant_recipe`` exercises what the search spaces emit and more for a task-arithmetic variant:
per-model gradients, attention/MLP conditionals, a global lambda gradient, a negative weight,
density 1 next to sparse inputs, and (``flip``) the opposite of the method's normalize/rescale
defaults. ``default_recipe`` is the first recipe a user would try with any registry method.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from evomerge.methods.task_arithmetic import VARIANTS

VARIANT_NAMES = list(VARIANTS)


def variant_recipe(method: str, fam: Mapping[str, str | Path], *, flip: bool, scale: float = 1.0,
                   density0: float = 0.6) -> dict:
    """A recipe of ``method`` over ``fam``'s base and fine-tunes ft0, ft1, ft2 (see the module docstring)."""
    extra = {}
    if method.startswith("della"):
        extra = {"epsilon": [0.05, 0.1]}
    if method.startswith("breadcrumbs"):
        extra = {"gamma": 0.02}
    models = [
        {"model": str(fam["ft0"]), "parameters": {
            "weight": [0.9 * scale, 0.3, 1.2], "density": [{"filter": "self_attn", "value": density0},
                                                           {"value": [0.35, 0.7]}], **extra}},
        {"model": str(fam["ft1"]), "parameters": {"weight": -0.4 * scale, "density": 1.0, **extra}},
        {"model": str(fam["ft2"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.7}, {"value": 0.5}],
                                                  "density": 0.45, **extra}},
    ]
    params = {"lambda": [1.0, 0.8, 1.3]}
    if flip:  # the opposite of the method's defaults
        params.update({"normalize": method in ("task_arithmetic", "dare_ties", "dare_linear", "breadcrumbs",
                                               "breadcrumbs_ties", "della_linear"),
                       "rescale": method in ("ties", "task_arithmetic", "breadcrumbs", "breadcrumbs_ties")})
        if method == "task_arithmetic":
            params.pop("rescale")
    return {"merge_method": method, "base_model": str(fam["base"]), "models": models, "parameters": params,
            "dtype": "float32"}


def default_recipe(method: str, base: str, experts: list[str]) -> dict | None:
    """The recipe a user would try first with ``method`` over ``experts`` (None: passthrough, which
    stacks slices rather than merging models). Data-aware methods get no calibration section."""
    from evomerge.methods import get_method

    spec = get_method(method)
    if method == "passthrough":
        return None
    models = [{"model": p} for p in experts]
    if spec.max_others == 1 or spec.max_models == 2:  # slerp, nearswap, arcee_fusion: base and one expert
        models = models[:1]
    if spec.max_others == 2:  # nuslerp: two experts
        models = models[:2]
    for m in models:
        values = {}
        if spec.has_param("weight") and spec.param("weight").required:
            values["weight"] = 1.0
        if spec.has_param("density"):
            values["density"] = 0.5
        if values:
            m["parameters"] = values
    recipe: dict = {"merge_method": method, "dtype": "float32", "models": models}
    if spec.requires_base or not spec.uses_base_as_input:
        recipe["base_model"] = base
    if method == "slerp":
        recipe["parameters"] = {"t": 0.5}
    if method == "nearswap":
        recipe["parameters"] = {"t": 0.0001}
    return recipe
