"""Extract a LoRA adapter from a full fine-tune: ΔW = W_ft − W_base of each layer, factorised to rank r.

Every module of the model (found on the meta device from the config, so nothing is loaded) is
handled by what changed:
- a linear or embedding layer whose weight alone changed: the rank-r truncated SVD of ΔW
  (randomised, Halko, Martinsson & Tropp 2011, arXiv:0909.4061, via ``torch.svd_lowrank`` with
  ``niter`` power iterations; an exact SVD when r reaches the smaller dimension), written as
  B = U·S, A = Vᵀ with scaling 1 (``lora_alpha`` = ``r``). The energy kept, Σ_{i≤r} Sᵢ² / ‖ΔW‖²_F,
  is exact for the factors written (they are the projection of ΔW onto the found subspace);
- any other changed module (norms, a layer whose bias changed, modules of other types): saved whole
  as ``modules_to_save``, exactly;
- unchanged modules: nothing.

With ``lora_only`` the modules that would be saved whole are left out instead, and listed as dropped.

Tensors are read one pair at a time (``ModelReader``), so a 7B model's layers need only one layer's
memory beyond the factors kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from evomerge.checkpoint import ModelReader
from evomerge.lora.adapter import PEFT_PREFIX, AdapterError
from evomerge.lora.factor import DEFAULT_NITER, low_rank
from evomerge.lora.write import check_output, write_adapter

REPORT_NAME = "evomerge_extract_report.json"


@dataclass
class ExtractReport:
    """Per decomposed module the fraction of ‖ΔW‖² kept; the modules saved whole."""

    path: Path
    rank: int
    energy_kept: dict[str, float] = field(default_factory=dict)
    saved_whole: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # changed modules left out (lora_only)

    @property
    def overall_kept(self) -> float:
        """Mean energy fraction kept over the decomposed modules (1.0 when there are none)."""
        values = list(self.energy_kept.values())
        return sum(values) / len(values) if values else 1.0


def module_kinds(config_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """{module name: (kind, [its own parameter names])} of the model in ``config_dir``, built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out = {}
    for name, module in model.named_modules():
        params = [p for p, _ in module.named_parameters(recurse=False)]
        if params:
            kind = ("linear" if isinstance(module, torch.nn.Linear) else
                    "embedding" if isinstance(module, torch.nn.Embedding) else "other")
            out[name] = (kind, params)
    return out


def extract_lora(finetune: str | Path, base: str | Path, out_dir: str | Path, rank: int, *,
                 niter: int = DEFAULT_NITER, overwrite: bool = False, lora_only: bool = False,
                 progress=None) -> ExtractReport:
    """Write a PEFT adapter into ``out_dir`` that turns ``base`` into (approximately) ``finetune``; see the module doc.

    ``lora_only``: leave the modules that would be saved whole out (listed in the report as dropped).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    out_dir = check_output(out_dir, overwrite)
    ft, bs = ModelReader(finetune), ModelReader(base)
    _check_same_shapes(ft, bs)
    tied = [n for n in bs.tied_aliases.values() if not torch.equal(ft.get_tensor(n), bs.get_tensor(n))]
    if tied:
        raise AdapterError(f"{finetune}: {tied[0]} changed and is tied to the output embeddings; PEFT cannot apply "
                           f"one update to both, so extracting an adapter from this model is refused")
    kinds = module_kinds(bs.path)
    report = ExtractReport(out_dir, rank)
    tensors: dict[str, torch.Tensor] = {}
    targets = []
    for module, (kind, params) in kinds.items():
        names = [f"{module}.{p}" if module else p for p in params]
        stored = [n for n in names if ft.has_tensor(n)]
        changed = [n for n in stored if not torch.equal(ft.get_tensor(n), bs.get_tensor(n))]
        if not changed:
            continue
        if kind in ("linear", "embedding") and changed == [f"{module}.weight"]:
            delta = ft.get_tensor(changed[0], dtype=torch.float32) - bs.get_tensor(changed[0], dtype=torch.float32)
            if kind == "embedding":  # PEFT's embedding layout: ΔW = (B·A)ᵀ
                delta = delta.T
            b, a, kept = low_rank(delta, rank, niter=niter)
            parts = ("lora_embedding_B", "lora_embedding_A") if kind == "embedding" else ("lora_B.weight",
                                                                                           "lora_A.weight")
            tensors[f"{PEFT_PREFIX}{module}.{parts[0]}"] = b
            tensors[f"{PEFT_PREFIX}{module}.{parts[1]}"] = a
            report.energy_kept[module] = kept
            targets.append(module)
        elif lora_only:
            report.dropped.append(module)
        else:
            for n in stored:
                tensors[f"{PEFT_PREFIX}{n}"] = ft.get_tensor(n).contiguous()
            report.saved_whole.append(module)
        if progress:
            progress(module)
    if not tensors:
        raise AdapterError(f"{finetune}: identical to {base}; there is nothing to extract")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(bs.path), "r": rank,
        "lora_alpha": rank, "target_modules": targets, "modules_to_save": report.saved_whole or None,
        "use_rslora": False, "use_dora": False, "lora_bias": False, "bias": "none", "fan_in_fan_out": False,
        "lora_dropout": 0.0, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
        "inference_mode": True,
    }
    summary = {"rank": report.rank, "energy_kept": report.energy_kept, "saved_whole": report.saved_whole,
               "dropped": report.dropped}
    write_adapter(out_dir, tensors, config, {REPORT_NAME: json.dumps(summary, indent=2) + "\n",
                                             "README.md": card(report)}, overwrite)
    return report


def _check_same_shapes(ft: ModelReader, base: ModelReader) -> None:
    """Same architecture and the same tensors with the same shapes, from headers only."""
    if ft.architectures and base.architectures and ft.architectures != base.architectures:
        raise AdapterError(f"{ft.path}: architecture {ft.architectures} differs from the base's {base.architectures}")
    names, base_names = set(ft.tensor_names()), set(base.tensor_names())
    if names != base_names:
        diff = sorted(names ^ base_names)
        raise AdapterError(f"{ft.path}: tensors differ from the base {base.path}: {diff[:3]}")
    for n in sorted(names):
        if tuple(ft.shape(n)) != tuple(base.shape(n)):
            raise AdapterError(f"{ft.path}: tensor {n} is {list(ft.shape(n))}, the base's is {list(base.shape(n))}")


def card(report: ExtractReport) -> str:
    """The adapter's README: rank, the energy each decomposed module kept, the modules saved whole."""
    lines = ["# LoRA adapter extracted by evomerge", "", f"Rank {report.rank}; mean energy kept "
             f"{report.overall_kept:.4f}; saved whole: {', '.join(report.saved_whole) or 'none'}; changed but left "
             f"out: {', '.join(report.dropped) or 'none'}.", "",
             "| module | energy kept |", "|---|---:|"]
    lines += [f"| {m} | {k:.4f} |" for m, k in report.energy_kept.items()]
    return "\n".join(lines) + "\n"
