"""Method baselines scored beside a search's winner: what a user gets from a method's defaults, no search.

A search report's test table lists, besides the default recipe of the searched space, the defaults
of data-free subspace merging (TSV-M, Iso-CTS) and of data-aware RegMean over the same models, so a
user sees whether the search beat them. RegMean calibrates each fine-tune on the search split of the
run's tasks (its own tasks when the fine-tune is named after them, as the demo zoo's experts are:
``evomerge.calibration.own_tasks``);
its statistics are cached in the run directory. When every model is a LoRA adapter, the table also lists
what PEFT's own ``add_weighted_adapter`` makes of them (``PEFT_COMBINATIONS``, weights 1): ``cat``, exact,
and ``ties``, which trims and elects signs on the factors A and B separately (docs/adapters.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from evomerge.calibration import own_tasks
from evomerge.engine import iter_merged, plan_merge, prepare_statistics
from evomerge.recipe import Recipe, load_recipe

BASELINE_METHODS = ("tsv_m", "iso_cts", "regmean")
CALIBRATION_EXAMPLES = 64  # per task, from the search split
PEFT_COMBINATIONS = {"cat": {}, "ties": {"density": 0.5}}  # add_weighted_adapter types and their options


def baseline_recipe(method: str, base: str, models: dict[str, str], tasks: Any, task_names: Sequence[str]
                    ) -> Recipe | None:
    """The default recipe of ``method`` over the search's models (None: RegMean without a task file)."""
    data: dict[str, Any] = {"merge_method": method, "base_model": base,
                            "models": [{"model": path} for path in models.values()],
                            "name": f"{method} defaults"}
    if method == "regmean":
        if not isinstance(tasks, (str, Path)):
            return None
        data["calibration"] = {"tasks": str(Path(tasks).resolve()), "split": "search",
                               "examples": CALIBRATION_EXAMPLES}
        own = own_tasks(models, task_names)
        if own:
            data["calibration"]["model_tasks"] = own
    return load_recipe(data)


def build_into(builder, recipe: Recipe, statistics_cache: Path | None) -> None:
    """Merge ``recipe`` with the engine from the builder's model files into the builder's live model."""
    plan = plan_merge(recipe, readers=builder.readers)
    prepare_statistics(plan, device=builder.device, cache_dir=statistics_cache)
    with torch.inference_mode():
        for name, tensor in iter_merged(plan, device=builder.device):
            if name in builder.params:
                builder.params[name].copy_(tensor.to(builder.params[name].dtype))


def peft_merged_models(base: str, models: dict[str, str], dtype: torch.dtype, device):
    """Yield (label, model): the base with PEFT's ``add_weighted_adapter`` of every adapter (weights 1) active,
    one combination type of ``PEFT_COMBINATIONS`` after another (the same live model, re-targeted)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = {path: f"adapter{i}" for i, path in enumerate(models.values())}
    paths = list(names)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), paths[0],
                                      adapter_name=names[paths[0]])
    for path in paths[1:]:
        model.load_adapter(path, adapter_name=names[path])
    model = model.eval().to(device)
    for kind, options in PEFT_COMBINATIONS.items():
        model.add_weighted_adapter(list(names.values()), [1.0] * len(names), f"peft_{kind}", combination_type=kind,
                                   **options)
        model.set_adapter(f"peft_{kind}")
        detail = "".join(f", {k} {v}" for k, v in options.items())
        yield f"PEFT add_weighted_adapter {kind} (weights 1{detail})", model
