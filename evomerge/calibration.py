"""Calibration statistics for data-aware merge methods, computed once per model and cached on disk.

A recipe whose method needs data (RegMean) names its calibration set::

    calibration:
      tasks: tasks.yaml         # a task YAML (relative to the recipe's folder)
      split: search             # search | train: never validation or test
      examples: 64              # first N examples of the split, per task
      max_length: 256           # tokens per example (longer ones are cut)
      gram: full                # full | diagonal (RegMean; diagonal: O(in) memory per layer)
      model_tasks:              # optional: the tasks whose examples a model sees (default: every task)
        experts/rev: [rev]

Each example is its prompt followed by its gold continuation. RegMean's statistics come from forward
hooks on every ``nn.Linear`` (padding excluded), Fisher merging's from per-example gradients; both are
cached as safetensors under a key made of the
model's content hash, the calibration texts and the settings, so a second merge with the same
models and data reads them instead of running the models.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

CALIBRATION_SPLITS = ("search", "train")
STATISTICS_VERSION = 1  # bump when what is computed changes: old cache entries are then ignored


class CalibrationError(ValueError):
    """Calibration data that cannot be used; the message names the file and key."""


class Calibration(BaseModel):
    """The ``calibration:`` block of a recipe (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    tasks: str | None = None  # required in a recipe; a search space without it uses the run's tasks
    split: Literal["search", "train"] = "search"
    examples: int = Field(64, ge=1)
    max_length: int = Field(256, ge=2)
    gram: Literal["full", "diagonal"] = "full"
    model_tasks: dict[str, list[str]] | None = None


def own_tasks(models: dict[str, str], task_names: Sequence[str]) -> dict[str, list[str]]:
    """``model_tasks`` for fine-tunes named after the tasks they were tuned on: a model called ``rev`` (or
    ``rev+map``, tasks joined by ``+``) calibrates on those tasks alone; others on every task.
    Keys are the models' paths, as recipes name them."""
    out = {}
    for name, path in models.items():
        parts = name.split("+")
        if all(p in task_names for p in parts):
            out[path] = parts
    return out


def calibration_texts(calibration: Calibration, model_names: Sequence[str], base_dir: Path | None,
                      where: str = "<recipe>") -> dict[str, list[str]]:
    """Per model, its calibration texts (prompt + gold continuation), checked before any model is read."""
    from evomerge.evaluate import TaskError, load_tasks

    if calibration.tasks is None:
        raise CalibrationError(f"{where}: calibration.tasks: missing; name the task YAML of the calibration data")
    path = Path(calibration.tasks).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).is_file():
        path = base_dir / path
    if not path.is_file():
        raise CalibrationError(f"{where}: calibration.tasks: task file '{calibration.tasks}' not found"
                               + (f" (also looked in {base_dir})" if base_dir is not None else ""))
    try:
        specs = load_tasks(path)
    except TaskError as e:
        raise CalibrationError(f"{where}: calibration.tasks: {e}") from None
    by_name = {spec.name: spec for spec in specs}
    for model, names in (calibration.model_tasks or {}).items():
        if model not in model_names:
            raise CalibrationError(f"{where}: calibration.model_tasks: '{model}' is not an input model of the "
                                   f"recipe (inputs: {', '.join(model_names)})")
        unknown = [n for n in names if n not in by_name]
        if unknown or not names:
            raise CalibrationError(f"{where}: calibration.model_tasks.{model}: unknown task(s) {unknown or '[]'}; "
                                   f"tasks in {path}: {', '.join(by_name)}")
    texts: dict[str, list[str]] = {}
    for model in model_names:
        chosen = (calibration.model_tasks or {}).get(model) or list(by_name)
        out = []
        for name in chosen:
            spec = by_name[name]
            if not hasattr(spec, "has_split") or getattr(spec, "kind", "") == "lm_eval":
                raise CalibrationError(f"{where}: calibration: task '{name}' is an lm_eval task; calibration "
                                       f"needs a native task with its own examples")
            if not spec.has_split(calibration.split):
                raise CalibrationError(f"{where}: calibration.split: task '{name}' has no {calibration.split} split")
            examples = spec.examples(calibration.split)[: calibration.examples]
            out += [ex.prompt + ex.continuations[ex.label if ex.label < len(ex.continuations) else 0]
                    for ex in examples]
        texts[model] = out
    return texts


# ------------------------------------------------------------------------------------------------ statistics


def gram_hooks(model: torch.nn.Module, diagonal: bool, mask: list) -> tuple[dict, dict, list]:
    """Forward hooks accumulating Σ xᵀx (or Σ x²) and token counts of every nn.Linear's input (RegMean, Jin et al. 2023).

    ``mask[0]`` holds the current batch's attention mask: padded positions are left out.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook_for(name: str) -> Callable:
        def hook(module, args, output):
            x = args[0].detach()
            keep = mask[0].reshape(-1).bool().to(x.device) if mask[0] is not None and x.dim() == 3 else None
            x = x.reshape(-1, x.shape[-1]).float()
            if keep is not None and keep.numel() == x.shape[0]:
                x = x[keep]
            update = (x * x).sum(dim=0) if diagonal else x.T @ x
            sums[name] = update if name not in sums else sums[name] + update
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(hook_for(f"{name}.weight")))
    return sums, counts, handles


@torch.no_grad()
def gram_statistics(model: torch.nn.Module, tokenizer, texts: Sequence[str], *, diagonal: bool, max_length: int,
                    batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per linear weight name, the mean input Gram matrix XᵀX / n over the texts' tokens (its diagonal if ``diagonal``)."""
    if not texts:
        raise CalibrationError("calibration: no examples to compute statistics from")
    device = next(model.parameters()).device
    mask: list = [None]
    sums, counts, handles = gram_hooks(model, diagonal, mask)
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                              truncation=True, max_length=max_length)
            mask[0] = batch["attention_mask"]
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (total / max(counts[name], 1)).cpu() for name, total in sums.items()}


def fisher_statistics(model: torch.nn.Module, tokenizer, texts: Sequence[str], *, max_length: int
                      ) -> dict[str, torch.Tensor]:
    """Per parameter, the mean over examples of the squared gradient of the example's summed next-token loss.

    The empirical diagonal Fisher (Matena & Raffel 2022, arXiv:2111.09832) of the causal LM on the
    calibration texts, one example per backward pass (per-example gradients). Tied parameters appear
    once, under their first name.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    device = next(model.parameters()).device
    seen = 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"].to(device)
        if ids.shape[1] < 2:
            continue
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss * (ids.shape[1] - 1)  # mean -> sum over predicted tokens
        loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                sums[name] += p.grad.detach().float().square()
        seen += 1
    model.zero_grad(set_to_none=True)
    if seen == 0:
        raise CalibrationError("calibration: no example has two or more tokens to compute a Fisher from")
    return {name: (total / seen).cpu() for name, total in sums.items()}


# ------------------------------------------------------------------------------------------------ cache


def file_sha256(path: Path, memo: dict) -> str:
    """SHA-256 of a file's bytes, memoized by (path, size, mtime) so unchanged files are read once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if key not in memo:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        memo[key] = digest.hexdigest()
    return memo[key]


def model_fingerprint(model_dir: Path, memo: dict) -> str:
    """A hash of a model directory's contents: every file but README.md, by name and SHA-256."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).iterdir() if p.is_file() and p.name != "README.md"):
        digest.update(f"{path.name}:{file_sha256(path, memo)}\n".encode())
    return digest.hexdigest()


def statistics_key(fingerprint: str, texts: Sequence[str], calibration: Calibration, kind: str) -> str:
    """The cache key of one model's statistics: its content hash, the exact texts and the settings that change them."""
    settings = {"version": STATISTICS_VERSION, "kind": kind, "gram": calibration.gram if kind == "gram" else None,
                "max_length": calibration.max_length, "model": fingerprint,
                "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def _read_memo(cache_dir: Path) -> dict:
    try:
        return json.loads((cache_dir / "file_hashes.json").read_text())
    except (OSError, ValueError):
        return {}


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_statistics(model_dir: Path, texts: Sequence[str], calibration: Calibration, *, kind: str = "gram",
                     cache_dir: Path | None = None, device: str | torch.device = "cpu",
                     progress: Callable[[str], None] | None = None, base_dir: Path | None = None
                     ) -> dict[str, torch.Tensor]:
    """One model's calibration statistics: read from ``cache_dir`` when present, else computed and stored there.

    With ``base_dir``, ``model_dir`` is a LoRA adapter of that base (see ``load_calibration_model``)."""
    from safetensors.torch import load_file, save_file

    memo = _read_memo(cache_dir) if cache_dir is not None else {}
    path = None
    if cache_dir is not None:
        fingerprint = model_fingerprint(model_dir, memo)
        if base_dir is not None:
            fingerprint += "+" + model_fingerprint(base_dir, memo)
        key = statistics_key(fingerprint, texts, calibration, kind)
        path = Path(cache_dir) / f"{kind}-{key}.safetensors"
        if path.is_file():
            if progress:
                progress(f"statistics of {model_dir}: cached ({path.name})")
            return load_file(path)
    if progress:
        progress(f"statistics of {model_dir}: {len(texts)} examples")
    stats = compute_model_statistics(model_dir, texts, calibration, kind=kind, device=device, base_dir=base_dir)
    if path is not None:
        _write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in stats.items()}, tmp,
                                                  metadata={"model": str(model_dir), "kind": kind}))
        _write_atomic(Path(cache_dir) / "file_hashes.json", lambda tmp: Path(tmp).write_text(json.dumps(memo)))
    return stats


def load_calibration_model(model_dir: Path, dtype, base_dir: Path | None = None):
    """The model and tokenizer calibration runs on: ``model_dir`` (safetensors, no remote code), or with
    ``base_dir`` the base's weights with the LoRA adapter in ``model_dir`` merged in (PEFT's
    ``merge_and_unload``, the tensors an adapter source gives a merge) and the base's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model_dir if base_dir is None else base_dir
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    if base_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
    return model, tokenizer


def compute_model_statistics(model_dir: Path, texts: Sequence[str], calibration: Calibration, *, kind: str,
                             device: str | torch.device = "cpu", base_dir: Path | None = None
                             ) -> dict[str, torch.Tensor]:
    """Load a model (``load_calibration_model``) and compute its ``kind`` statistics on the texts."""
    if kind not in ("gram", "fisher"):
        raise ValueError(f"unknown statistics kind {kind!r}")
    # gradients in float32: squared bf16 gradients underflow
    model, tokenizer = load_calibration_model(model_dir, "auto" if kind == "gram" else torch.float32, base_dir)
    model = model.to(device).eval()
    try:
        if kind == "fisher":
            return fisher_statistics(model, tokenizer, texts, max_length=calibration.max_length)
        return gram_statistics(model, tokenizer, texts, diagonal=calibration.gram == "diagonal",
                               max_length=calibration.max_length)
    finally:
        del model


def collect_statistics(calibration: Calibration, model_dirs: Mapping[str, Path], texts: Mapping[str, list[str]], *,
                       kind: str = "gram", cache_dir: Path | None = None, device: str | torch.device = "cpu",
                       progress: Callable[[str], None] | None = None,
                       base_dirs: Mapping[str, Path] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per model name, its statistics (``model_statistics`` for each model directory; a name in
    ``base_dirs`` is a LoRA adapter of that base)."""
    base_dirs = base_dirs or {}
    return {name: model_statistics(Path(model_dirs[name]), texts[name], calibration, kind=kind, cache_dir=cache_dir,
                                   device=device, progress=progress, base_dir=base_dirs.get(name))
            for name in model_dirs}
