"""Writing an assembled MoE: into a staging folder beside the target, verified by reloading the files and
comparing logits with the live model, then renamed into place. Beside the weights: ``moe.yaml`` (the
complete evomerge config), ``mergekit_moe.yaml`` where mergekit-moe can build the same layout, and
``moe_report.json`` + ``README.md`` (expert layout and per-layer router statistics)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from evomerge.checkpoint import staged
from evomerge.moe.assemble import MoeModel
from evomerge.moe.config import MERGEKIT_GATE_MODES, MoeConfig, MoeError

RELOAD_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
MERGEKIT_KEYS = ("base_model", "gate_mode", "dtype", "experts_per_token", "architecture", "experts", "shared_experts")


def mergekit_recipe(cfg: MoeConfig) -> dict | None:
    """The mergekit-moe config that builds the same layout (router tensors reproduced for the data-free
    modes), or None when an option has no mergekit equivalent."""
    uses_tasks = any(e.tasks for _, e in cfg.all_experts())
    if cfg.train.steps:
        return None
    if cfg.gate_mode not in MERGEKIT_GATE_MODES or cfg.non_expert != "base" or uses_tasks:
        return None
    doc = cfg.model_dump(include=set(MERGEKIT_KEYS), exclude_none=True)
    for group in ("experts", "shared_experts"):
        for e in doc.get(group, []):
            e.pop("tasks", None)
    return doc


@torch.no_grad()
def reload_difference(moe: MoeModel, path: Path) -> float:
    """Max |logit difference| between the live model and the one transformers reloads from ``path``
    (trust_remote_code off); MoeError if the files leave keys missing or unexpected."""
    from transformers import AutoModelForCausalLM

    loaded, info = AutoModelForCausalLM.from_pretrained(path, dtype=moe.dtype, trust_remote_code=False,
                                                        use_safetensors=True, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise MoeError(f"reloading the written MoE: {bad}")
    vocab = moe.model.config.vocab_size
    ids = torch.arange(2 * 16).remainder(vocab).reshape(2, 16)
    a = moe.model(input_ids=ids).logits.float()
    b = loaded.eval()(input_ids=ids).logits.float()
    return (a - b).abs().max().item()


def write_moe(moe: MoeModel, tokenizer, cfg: MoeConfig, out_dir: str | Path, report: dict,
              overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``moe`` to ``out_dir`` atomically (see the module docstring); returns ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise MoeError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out, "moe") as tmp:
        moe.model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        diff = reload_difference(moe, tmp)
        if not diff <= RELOAD_ATOL.get(moe.dtype, 1e-2):
            raise MoeError(f"the written MoE's logits differ from the in-memory model's by {diff:.3g}")
        report = {**report, "reload_max_logit_difference": diff}
        (tmp / "moe.yaml").write_text("# evomerge moe config (complete)\n"
                                      + yaml.safe_dump(cfg.model_dump(exclude_none=True), sort_keys=False))
        mk = mergekit_recipe(cfg)
        if mk is not None:
            (tmp / "mergekit_moe.yaml").write_text("# mergekit-moe config for the same layout\n"
                                                   + yaml.safe_dump(mk, sort_keys=False))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "moe_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "README.md").write_text(render_card(report))
    return out


def render_card(report: dict) -> str:
    """A short model card: the expert layout and the per-layer router statistics."""
    lines = ["---", "library_name: transformers", "tags: [moe, evomerge]", "---", "",
             f"# Mixture of experts ({report['architecture']}) built by evomerge", "",
             f"- base (non-expert weights: {report['non_expert']}): `{report['base_model']}`",
             f"- routers: `{report['gate_mode']}`, {report['experts_per_token']} expert(s) per token, seed {report['seed']}"]
    lines += [f"- expert {i}: `{src}`" for i, src in enumerate(report["experts"])]
    if report.get("shared_expert"):
        lines.append(f"- shared expert: `{report['shared_expert']}`")
    if report.get("training"):
        t = report["training"]
        lines.append(f"- router training: {t['steps']} steps, {t['trained_parameters']} parameters, "
                     f"loss {t['loss_before']:.4f} -> {t['loss_after']:.4f}")
    stats = report.get("router_statistics") or []
    if stats:
        n = len(report["experts"])
        lines += ["", "## Routing of the calibration tokens (top-1)", "",
                  "| layer | routed to own expert | " + " | ".join(f"share e{i}" for i in range(n)) + " |",
                  "|---|---|" + "---|" * n]
        for s in stats:
            lines.append(f"| {s['layer']} | {s['mean_accuracy']:.1%} | "
                         + " | ".join(f"{x:.1%}" for x in s["share"]) + " |")
    if report.get("comparison_table"):
        lines += ["", "## Scores beside the inputs and dense merges", "", report["comparison_table"].rstrip()]
    return "\n".join(lines) + "\n"
