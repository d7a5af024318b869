"""A merge of LoRA adapters written as one PEFT adapter: exact, re-factorised, or a sparse merge's low-rank update.

A recipe whose method is a linear combination of its inputs (``linear``, or ``task_arithmetic``
without sparsification) over adapters of one base gives every adapted module the update
ΔW = Σᵢ cᵢ·sᵢ·Bᵢ·Aᵢ, with cᵢ the coefficient the method gives input i for that tensor (weights,
``normalize``, ``lambda``, gradients and filters resolved by the engine's planner). It is written
from the factors alone (:mod:`evomerge.lora.factor`), never as a dense matrix: PEFT's ``cat`` when
no rank is asked for, else the best rank-k factors by QR + small SVD.

Any other method (TIES, DARE, DELLA, ...) gives full-rank updates: each adapted module is merged as
``evomerge merge`` merges it and its update factorised to the rank asked for (randomised SVD).
Either way each module's discarded energy fraction ‖ΔW − ΔW_k‖²_F / ‖ΔW‖²_F is reported.

The adapter has scaling 1 everywhere (``lora_alpha`` = ``r``; ``rank_pattern`` and ``alpha_pattern``
where a module's rank differs), ``use_rslora``, ``use_dora`` and ``lora_bias`` false, and the union
of the adapters' modules as ``target_modules``. Updates that no LoRA factors can carry (``lora_bias``,
``modules_to_save``; DoRA on the exact path) and full fine-tunes among the inputs are refused before
anything is written: merge those into a full model with ``evomerge merge``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from evomerge.engine import MergePlan, TensorTask, all_finite, compute_tensor, plan_merge, resolve_device
from evomerge.lora.adapter import PEFT_PREFIX, AdapterError, LoraModule
from evomerge.lora.factor import LowRank, concatenate, low_rank, truncate
from evomerge.lora.source import AdapterReader
from evomerge.lora.write import check_output, write_adapter
from evomerge.recipe import Recipe

LINEAR_METHODS = ("linear", "task_arithmetic")
DISCARDED_WARNING = 0.01  # a module losing more than this fraction of its update's energy is flagged
REPORT_NAME = "evomerge_lora_report.json"


@dataclass
class AdapterMergeReport:
    """What a merge into an adapter wrote: per module its rank and discarded energy fraction."""

    path: Path
    ranks: dict[str, int] = field(default_factory=dict)
    discarded: dict[str, float] = field(default_factory=dict)

    def flagged(self, threshold: float = DISCARDED_WARNING) -> dict[str, float]:
        """Modules whose truncation discarded more than ``threshold`` of their energy."""
        return {m: d for m, d in self.discarded.items() if d > threshold}


def coefficients(task: TensorTask, method: str) -> list[float]:
    """cᵢ with out = base + Σ cᵢ·ΔWᵢ for one tensor, or ValueError when the method is not of that form."""
    weights = [float(mp["weight"]) for mp in task.model_params]
    if method == "task_arithmetic":
        if any(float(mp.get("density", 1.0)) < 1 for mp in task.model_params):
            raise ValueError("density < 1 sparsifies the deltas, which is not a linear combination of adapters")
        total = sum(weights)
        scale = task.params.get("lambda", 1.0) / (total if task.params.get("normalize") and abs(total) >= 1e-8
                                                  else 1.0)
        return [w * scale for w in weights]
    if method == "linear":
        total = sum(weights)
        norm = total if task.params.get("normalize", True) else 1.0
        if norm == 0 or not math.isclose(total / norm, 1.0, rel_tol=1e-9):
            raise ValueError(f"linear weights {weights} without normalize sum to {total}, not 1: the base "
                             f"weights would be scaled, which an adapter cannot express")
        return [w / norm for w in weights]
    raise ValueError(f"merge_method {method} is not a linear combination of its inputs; an adapter output "
                     f"needs one of {', '.join(LINEAR_METHODS)} (write a full model with `evomerge merge`)")


def adapters_base(plan: MergePlan):
    """The one base reader every adapter of ``plan`` is applied to (AdapterError otherwise)."""
    bases = {id(r.base): r.base for r in plan.readers.values() if isinstance(r, AdapterReader)}
    if len(bases) != 1:
        raise AdapterError(f"{plan.where}: an adapter output needs LoRA adapters of one base model as inputs")
    return next(iter(bases.values()))


def _terms_by_module(plan: MergePlan) -> dict[str, tuple[LoraModule, list[tuple[float, AdapterReader, LoraModule]]]]:
    """For every adapted module: a module description and the (coefficient, source, module) terms."""
    base = adapters_base(plan)
    out: dict[str, tuple[LoraModule, list]] = {}
    for task in plan.tasks:
        readers = [plan.readers[ref.model] for ref in task.inputs]
        for ref, reader in zip(task.inputs, readers):
            if not isinstance(reader, AdapterReader) and reader is not base:
                raise AdapterError(f"{plan.where}: model '{ref.model}' is a full model; an adapter output can "
                                   f"only combine LoRA adapters (and the base)")
        changing = [(ref, r) for ref, r in zip(task.inputs, readers) if isinstance(r, AdapterReader)
                    and r.changes(ref.name)]
        if not changing:
            continue
        try:
            coefs = coefficients(task, plan.method.name)
        except ValueError as e:
            raise AdapterError(f"{plan.where}: tensor {task.name}: {e}") from None
        for c, ref, reader in zip(coefs, task.inputs, readers):
            if not isinstance(reader, AdapterReader) or not reader.changes(ref.name):
                continue
            module = reader.module_of(ref.name)
            if module is None or ref.name != task.name:
                why = ("its layers are moved by slices" if ref.name != task.name else
                       "DoRA, lora_bias or a tensor saved whole (modules_to_save) changes it")
                raise AdapterError(f"{reader.path}: tensor {ref.name}: no LoRA factors can carry this update "
                                   f"({why}); write a full model with `evomerge merge`")
            if c != 0:
                out.setdefault(module.name, (module, []))[1].append((c, reader, module))
    return out


def _module_factors(terms: list[tuple[float, AdapterReader, LoraModule]]) -> LowRank:
    """The exact ``cat`` factors of Σ cᵢ·sᵢ·Bᵢ·Aᵢ for one module."""
    stacked = []
    for c, reader, module in terms:
        with safe_open(reader.adapter.weights_file, framework="pt") as f:
            b, a = f.get_tensor(module.b_key), f.get_tensor(module.a_key)
        if not (all_finite(a) and all_finite(b)):
            raise AdapterError(f"{reader.adapter.weights_file}: module {module.name}: the factors contain NaN or "
                               f"infinite values")
        stacked.append((c * module.scale, b, a))
    return concatenate(stacked)


def adapter_config(modules: dict[str, LoraModule], ranks: dict[str, int], base_name: str | None,
                   fan_in_fan_out: bool, task_type: str | None) -> dict:
    """A PEFT LoRA configuration with scaling 1 for every module (lora_alpha = r, patterns where ranks differ)."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): rank for name, rank in sorted(ranks.items()) if rank != common}
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_name,
        "r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(modules), "use_rslora": False, "use_dora": False, "lora_bias": False,
        "bias": "none", "fan_in_fan_out": fan_in_fan_out, "lora_dropout": 0.0, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }


def is_linear_combination(plan: MergePlan) -> bool:
    """True when the plan's method adds the inputs' updates with coefficients (no sparsification, no sign election)."""
    if plan.method.name not in LINEAR_METHODS:
        return False
    return all(float(mp.get("density", 1.0)) >= 1 for task in plan.tasks for mp in task.model_params)


def _exact_factors(plan: MergePlan, rank: int | None) -> dict[str, tuple[LoraModule, LowRank]]:
    """Every adapted module's Σ cᵢ·sᵢ·Bᵢ·Aᵢ from the factors: ``cat``, or truncated to ``rank`` by QR + SVD."""
    out = {}
    for name, (module, terms) in _terms_by_module(plan).items():
        factors = _module_factors(terms)
        out[name] = (module, factors if rank is None else truncate(factors, rank))
    return out


def _dense_factors(plan: MergePlan, rank: int, device, seed: int) -> dict[str, tuple[LoraModule, LowRank]]:
    """Every adapted module's merged update (the engine's tensor minus the base), factorised to ``rank``."""
    base = adapters_base(plan)
    dev = resolve_device(device)
    out = {}
    for task in plan.tasks:
        module = None
        for ref in task.inputs:
            reader = plan.readers[ref.model]
            if not isinstance(reader, AdapterReader):
                if reader is not base:
                    raise AdapterError(f"{plan.where}: model '{ref.model}' is a full model; an adapter output can "
                                       f"only combine LoRA adapters (and the base)")
                continue
            if not reader.changes(ref.name):
                continue
            found = reader.weight_module(ref.name)
            if found is None or ref.name != task.name:
                raise AdapterError(f"{reader.path}: tensor {ref.name}: no LoRA factors can carry this update "
                                   f"(lora_bias, a tensor saved whole, or layers moved by slices); write a full "
                                   f"model with `evomerge merge`")
            module = module or found
        if module is None:
            continue
        delta = compute_tensor(plan, task, dev, seed).float().cpu() - base.get_tensor(task.name, dtype=torch.float32)
        if not delta.any():
            continue
        b, a, kept = low_rank(delta.T if module.transpose else delta, rank)
        out[module.name] = (module, LowRank(b, a, max(0.0, 1.0 - kept)))
    return out


def merge_to_adapter(recipe: Recipe | str | Path | dict, out_dir: str | Path, *, rank: int | None = None,
                     overwrite: bool = False, where: str | None = None, device="cpu", seed: int = 0
                     ) -> AdapterMergeReport:
    """Merge the LoRA adapters of ``recipe`` into one PEFT adapter in ``out_dir``.

    A linear combination (``linear``, ``task_arithmetic`` without sparsification) is written from the
    factors: exactly (``cat``) without ``rank``, else re-factorised to ``rank``. Any other method (TIES,
    DARE, DELLA, ...) is merged tensor by tensor as ``evomerge merge`` does (same ``seed``) and each
    adapted module's update factorised to ``rank`` (required) by a randomised SVD. Each module's
    discarded energy fraction is reported. Checks come first; the adapter appears atomically.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    out_dir = check_output(out_dir, overwrite)
    plan = recipe if isinstance(recipe, MergePlan) else plan_merge(recipe, where=where)
    adapters_base(plan)
    if is_linear_combination(plan):
        by_module = _exact_factors(plan, rank)
    elif rank is None:
        raise AdapterError(f"{plan.where}: merge_method {plan.method.name} is not a linear combination of the "
                           f"adapters, so its update has full rank: give a rank (--rank) to factorise it to, or "
                           f"write a full model with `evomerge merge`")
    else:
        by_module = _dense_factors(plan, rank, device, seed)
    if not by_module:
        raise AdapterError(f"{plan.where}: no adapter contributes anything (every weight is 0?)")
    fan_in = {m.transpose for m, _ in by_module.values() if m.kind == "linear"}
    if len(fan_in) > 1:
        raise AdapterError(f"{plan.where}: the adapters disagree on fan_in_fan_out")
    report = AdapterMergeReport(out_dir)
    tensors = {}
    for name, (module, factors) in by_module.items():
        report.ranks[name] = factors.rank
        report.discarded[name] = factors.discarded
        a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if module.kind == "embedding" else \
            ("lora_A.weight", "lora_B.weight")
        tensors[f"{PEFT_PREFIX}{name}.{a_part}"] = factors.a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.{b_part}"] = factors.b.contiguous()
    first = next(r.adapter for r in plan.readers.values() if isinstance(r, AdapterReader))
    base_name = first.base_model_name or str(getattr(adapters_base(plan), "path", "") or "") or None
    config = adapter_config({n: m for n, (m, _) in by_module.items()}, report.ranks, base_name,
                            bool(fan_in and fan_in.pop()), first.config.get("task_type"))
    summary = {"ranks": report.ranks, "discarded_energy": report.discarded}
    write_adapter(out_dir, tensors, config, {"evomerge_recipe.yml": plan.recipe.to_yaml(),
                                             REPORT_NAME: json.dumps(summary, indent=2) + "\n",
                                             "README.md": adapter_card(plan.recipe, report)}, overwrite)
    return report


def adapter_card(recipe: Recipe, report: AdapterMergeReport) -> str:
    """A short model card: what was merged and, per module, the rank and the energy a truncation discarded."""
    lines = ["---", "library_name: peft", "tags: [merge, lora, evomerge]", "---", "",
             "# Merged LoRA adapter", "", f"Merged with evomerge ({recipe.merge_method}) from:", ""]
    lines += [f"- `{m}`" for m in recipe.referenced_models()]
    worst = max(report.discarded.values(), default=0.0)
    lines += ["", f"{len(report.ranks)} modules; ranks {sorted(set(report.ranks.values()))}; largest discarded "
              f"energy fraction {worst:.3g} (0 = exact).", "", "| module | rank | discarded energy |", "|---|---|---|"]
    lines += [f"| {m} | {report.ranks[m]} | {report.discarded[m]:.3g} |" for m in report.ranks]
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)
